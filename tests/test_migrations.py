"""`flask --app app db upgrade`: creates and evolves the schema, twice or concurrently."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from peewee import Database
from playhouse.migrations import Runner

from keymeai.ledger import db
from keymeai.ledger.models import ApiKey, QuotaReservation, UsageDaily
from tests.helpers.cli import cli_env, flask_cli, run_together

pytestmark = pytest.mark.both_databases

ALL = [
    "0001_initial",
    "0002_usage_daily_day_index",
    "0003_drop_usage_record_key_index",
    "0004_hardening",
    "0005_reservation_ids_never_reused",
    "0006_stored_responses",
    "0007_signup",
]


def history(database_url: str) -> list[str]:
    database = db.open_database(database_url)
    with db.connection():
        if not database.table_exists("schema_migration"):
            return []
        cursor = database.execute_sql("SELECT name FROM schema_migration ORDER BY name")
        return [row[0] for row in cursor.fetchall()]


def index_names(database: Database, table: str) -> set[str]:
    with db.connection():
        return {index.name for index in database.get_indexes(table)}


def test_upgrade_creates_the_schema_and_a_second_run_is_a_no_op(
    config_data: dict[str, Any], database_url: str, tmp_path: Path
) -> None:
    env = cli_env(config_data, tmp_path)
    first = flask_cli(env, "db", "upgrade")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == f"Applied {', '.join(ALL)}."
    second = flask_cli(env, "db", "upgrade")
    assert second.returncode == 0, second.stderr
    assert second.stdout.strip() == "Schema is up to date."
    assert history(database_url) == ALL
    database = db.db.obj
    with db.connection():
        assert {
            "api_key",
            "usage_record",
            "usage_daily",
            "quota_reservation",
            "dashboard_session",
            "stored_response",
            "invite_code",
        } <= set(database.get_tables())
    assert "usage_daily_day" in index_names(database, "usage_daily")
    assert "usage_record_record_id" in index_names(database, "usage_record")


def test_four_concurrent_upgrades_apply_each_migration_once(
    config_data: dict[str, Any], database_url: str, tmp_path: Path
) -> None:
    env = cli_env(config_data, tmp_path)
    done = run_together(env, [["db", "upgrade"]] * 4)
    results = [(result.returncode, result.stdout, result.stderr) for result in done]
    assert [code for code, _, _ in results] == [0, 0, 0, 0], [err for _, _, err in results]
    outputs = sorted(out.strip() for _, out, _ in results)
    assert outputs == [f"Applied {', '.join(ALL)}."] + ["Schema is up to date."] * 3
    # Each migration ran in exactly one process: one log line each across all four.
    logged = [
        json.loads(line)["message"]
        for _, _, err in results
        for line in err.splitlines()
        if line.startswith("{") and "applied migration" in line
    ]
    assert sorted(logged) == [f"applied migration {name}" for name in ALL]
    assert history(database_url) == ALL
    assert "usage_daily_day" in index_names(db.db.obj, "usage_daily")


def test_upgrade_evolves_a_ledger_created_at_0001_and_keeps_its_data(
    config_data: dict[str, Any], database_url: str, tmp_path: Path
) -> None:
    database = db.open_database(database_url)
    with db.connection():
        applied = Runner(database, directory=str(db.MIGRATIONS_DIR)).up(target="0001_initial")
        assert applied == ["0001_initial"]
        key = ApiKey.create(name="old", prefix="km-old00000", key_hash="0" * 64, tier="standard")
        today = dt.datetime.now(dt.UTC).date()
        UsageDaily.create(key=key.id, day=today, model="deepseek-chat", requests=3, total_tokens=30)
        database.execute_sql(
            "INSERT INTO quota_reservation (id, key_id, tokens, expires_at) "
            f"VALUES (7, {key.id}, 70, {database.param})",
            (dt.datetime(2030, 1, 1),),
        )
    assert "usage_daily_day" not in index_names(database, "usage_daily")
    assert "usage_record_key_id" in index_names(database, "usage_record")

    env = cli_env(config_data, tmp_path)
    upgraded = flask_cli(env, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert upgraded.stdout.strip() == f"Applied {', '.join(ALL[1:])}."
    assert history(database_url) == ALL
    assert "usage_daily_day" in index_names(db.db.obj, "usage_daily")
    assert "usage_record_key_id" not in index_names(db.db.obj, "usage_record")
    assert "usage_record_key_id_created_at" in index_names(db.db.obj, "usage_record")
    with db.connection():  # the hold in flight survives the table's rebuild (SQLite)
        [hold] = QuotaReservation.select()
        assert (hold.id, hold.tokens, hold.cost_units) == (7, 70, 0)

    report = flask_cli(env, "usage", "report", "--format", "json")
    assert report.returncode == 0, report.stderr
    rows = json.loads(report.stdout)
    assert [(r["key_name"], r["model"], r["requests"], r["total_tokens"]) for r in rows] == [
        ("old", "deepseek-chat", 3, 30)
    ]
