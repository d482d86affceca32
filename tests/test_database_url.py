"""DATABASE_URL: the SQLite and PostgreSQL spellings operators and hosts use."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from playhouse.pool import PooledPostgresqlDatabase, PooledSqliteDatabase

from keymeai.config import ConfigError
from keymeai.ledger import db
from tests.helpers import services
from tests.helpers.cli import cli_env, flask_cli

AWKWARD_PASSWORD = "p@ss/w:rd%?#"


def test_sqlite_relative_path_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    database = db.open_database("sqlite:///relative.db")
    assert isinstance(database, PooledSqliteDatabase)
    db.upgrade()
    assert (tmp_path / "relative.db").exists()
    with db.connection():
        assert database.execute_sql("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert database.execute_sql("PRAGMA busy_timeout").fetchone()[0] == 30_000
    database.close_all()


def test_sqlite_absolute_path_has_four_slashes(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "absolute.db"
    path.parent.mkdir()
    db.open_database(f"sqlite:///{path}")  # "sqlite:////tmp/.../absolute.db"
    db.upgrade()
    assert path.exists()
    db.db.obj.close_all()


@pytest.mark.postgres
@pytest.mark.parametrize("scheme", ["postgres", "postgresql"])
@pytest.mark.parametrize("database_backend", ["postgres"], indirect=True)
def test_postgres_urls_with_an_url_encoded_password(database_url: str, scheme: str) -> None:
    parts = urlsplit(database_url)
    user = parts.username or "postgres"
    netloc = f"{user}:{quote(AWKWARD_PASSWORD, safe='')}@{parts.hostname}:{parts.port or 5432}"
    url = f"{scheme}://{netloc}{parts.path}?connect_timeout=5"
    database = db.open_database(url)
    assert isinstance(database, PooledPostgresqlDatabase)
    assert database.connect_params["password"] == AWKWARD_PASSWORD
    assert database.connect_params["user"] == user
    assert database.connect_params["connect_timeout"] == 5
    assert database.database == parts.path.lstrip("/")
    with db.connection():
        name = database.execute_sql("SELECT current_database()").fetchone()[0]
    assert name == parts.path.lstrip("/")


@pytest.mark.postgres
def test_database_url_from_the_environment_wins_over_the_config_file(
    config_data: dict[str, Any], tmp_path: Path
) -> None:
    config_data["database"]["url"] = f"sqlite:///{tmp_path / 'from-file.db'}"
    with services.postgres_database() as url:
        heroku_style = url.replace("postgresql://", "postgres://", 1)
        result = flask_cli(
            cli_env(config_data, tmp_path, DATABASE_URL=heroku_style), "db", "upgrade"
        )
        assert result.returncode == 0, result.stderr
        database = db.open_database(url)
        with db.connection():
            assert "usage_record" in database.get_tables()
        database.close_all()
    assert not (tmp_path / "from-file.db").exists()


def test_pool_size_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_POOL_SIZE", "3")
    database = db.open_database(f"sqlite:///{tmp_path / 'p.db'}")
    assert database._max_connections == 3
    monkeypatch.setenv("DATABASE_POOL_SIZE", "zero")
    with pytest.raises(ConfigError, match="DATABASE_POOL_SIZE"):
        db.open_database(f"sqlite:///{tmp_path / 'p.db'}")
