"""Configuration: the shipped file, environment overrides, and start-up refusals that name
the bad key."""

from __future__ import annotations

import os
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from keymeai.config import ConfigError, load_config, parse_config
from tests.helpers.cli import flask_command
from tests.helpers.config import PROVIDER_ENV, ROOT, base_config, write_toml

SHIPPED = ROOT / "config.toml"


def test_the_shipped_config_has_the_five_chat_models_on_real_providers() -> None:
    config = load_config(SHIPPED, environ={})
    assert list(config.models) == [
        "deepseek-chat",
        "deepseek-reasoner",
        "doubao-pro-32k",
        "qwen-max",
        "qwen-plus",
        "text-embedding-v4",
        "doubao-embedding-text",
    ]
    kinds = {m: c.kind for m, c in config.models.items()}
    assert [m for m, kind in kinds.items() if kind == "embedding"] == list(config.models)[5:]
    upstream = {m: (u.provider, u.model) for m, c in config.models.items() for u in c.upstreams}
    assert upstream["doubao-pro-32k"] == ("ark", "doubao-pro-32k-241215")
    assert upstream["qwen-plus"] == ("dashscope", "qwen-plus")
    assert upstream["text-embedding-v4"] == ("dashscope", "text-embedding-v4")
    assert upstream["doubao-embedding-text"] == ("ark", "doubao-embedding-text-240715")
    assert config.models["text-embedding-v4"].price.output == 0
    assert config.providers["deepseek"].base_url == "https://api.deepseek.com/v1"
    assert config.providers["ark"].base_url == "https://ark.cn-beijing.volces.com/api/v3"
    assert config.providers["dashscope"].api_key_env == "DASHSCOPE_API_KEY"
    assert config.models["deepseek-chat"].price.cached_input == Decimal("0.07")
    assert config.tiers["free"].requests == ("100 per day",)
    assert config.tiers["hobby"].tokens_per_month == 5_000_000
    assert config.database_url == "sqlite:///keymeai.db"
    assert config.ratelimit.storage_uri == "memory://"
    assert config.admin_token is None


def test_environment_wins_over_the_file() -> None:
    env = {
        "DATABASE_URL": "postgres://u:p@db.example:5432/ledger",
        "REDIS_URL": "redis://cache.example:6379/0",
        "KEYMEAI_ADMIN_TOKEN": "admin-secret",
        "DEEPSEEK_API_KEY": "sk-from-env",
    }
    config = load_config(SHIPPED, environ=env)
    assert config.database_url == env["DATABASE_URL"]
    assert config.ratelimit.storage_uri == env["REDIS_URL"]
    assert config.admin_token == "admin-secret"
    assert config.providers["deepseek"].api_key == "sk-from-env"
    assert "sk-from-env" not in repr(config) and "admin-secret" not in repr(config)
    env["RATELIMIT_STORAGE_URI"] = "redis://other.example:6379/2"
    assert load_config(SHIPPED, environ=env).ratelimit.storage_uri == "redis://other.example:6379/2"


def test_keymeai_config_names_the_file(tmp_path: Path) -> None:
    data = base_config("http://127.0.0.1:9", "sqlite:///x.db")
    data["tiers"]["gold"] = {"requests": ["5 per second"]}
    path = write_toml(data, tmp_path / "custom.toml")
    assert "gold" in load_config(environ={"KEYMEAI_CONFIG": str(path)}).tiers


def broken(edit: Any) -> str:
    """The message of the ConfigError raised for the base config after `edit`."""
    data = base_config("http://127.0.0.1:9", "sqlite:///x.db")
    edit(data)
    with pytest.raises(ConfigError) as caught:
        parse_config(data, PROVIDER_ENV)
    return str(caught.value)


@pytest.mark.parametrize(
    ("edit", "names"),
    [
        (
            lambda d: d["models"]["qwen-max"]["upstreams"][0].update(provider="dashscop"),
            "models.qwen-max.upstreams[0].provider: unknown provider 'dashscop'",
        ),
        (
            lambda d: d["tiers"]["free"].update(requests=["100 per fortnight"]),
            "tiers.free.requests: invalid limit '100 per fortnight'",
        ),
        (lambda d: d["providers"]["ark"].pop("base_url"), "providers.ark.base_url: missing"),
        (
            lambda d: d["providers"]["ark"].update(base_url="ark.example.com"),
            "providers.ark.base_url: expected an http(s) URL",
        ),
        (
            lambda d: d["providers"]["deepseek"].update(read_timout=5),
            "providers.deepseek.read_timout: unknown key",
        ),
        (lambda d: d.update(gatway={}), "gatway: unknown key"),
        (
            lambda d: d["models"]["qwen-plus"]["price"].update(input=0.123456),
            "models.qwen-plus.price.input: at most 4 decimal places",
        ),
        (
            lambda d: d["models"]["qwen-plus"]["price"].update(output=-1),
            "models.qwen-plus.price.output: must not be negative",
        ),
        (lambda d: d["models"]["qwen-plus"].pop("price"), "models.qwen-plus.price.input: missing"),
        (
            lambda d: d["models"]["qwen-plus"].update(upstreams=[]),
            "models.qwen-plus.upstreams: at least one upstream",
        ),
        (
            lambda d: d["providers"]["ark"].update(connect_timeout="5"),
            "providers.ark.connect_timeout: expected an integer or a number",
        ),
        (
            lambda d: d["tiers"]["hobby"].update(tokens_per_month=0),
            "tiers.hobby.tokens_per_month: must be at least 1",
        ),
        (
            lambda d: d["ratelimit"].update(on_storage_error="maybe"),
            'ratelimit.on_storage_error: must be "allow" or "deny"',
        ),
        (
            lambda d: d["ratelimit"].update(storage_uri="memcached://x"),
            "ratelimit.storage_uri: unsupported scheme",
        ),
        (
            lambda d: d["ratelimit"].update(concurrency_lease_seconds=0),
            "ratelimit.concurrency_lease_seconds: must be greater than 0",
        ),
        (
            lambda d: d["gateway"].update(key_cache_seconds=30),
            "gateway.key_cache_seconds: at most 5",
        ),
        (lambda d: d["database"].update(url="mysql://x/y"), "database.url: unsupported scheme"),
        (
            lambda d: d["models"].update({"bad,id": d["models"]["qwen-max"]}),
            "models.bad,id: a model id is",
        ),
        (lambda d: d.update(models={}), "models: at least one model"),
    ],
)
def test_a_bad_config_is_refused_naming_the_key(edit: Any, names: str) -> None:
    assert names in broken(edit)


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[tiers.free\nrequests = 1\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(path, environ={})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.toml", environ={})


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"],
        flask_command("keys", "list"),
    ],
    ids=["gunicorn", "flask-cli"],
)
def test_start_up_stops_with_one_clear_line(command: list[str], tmp_path: Path) -> None:
    data = base_config("http://127.0.0.1:9", f"sqlite:///{tmp_path / 'l.db'}")
    data["tiers"]["free"]["requests"] = ["a lot"]
    path = write_toml(data, tmp_path / "bad.toml")
    env = {**os.environ, "KEYMEAI_CONFIG": str(path), "PORT": "0"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "tiers.free.requests: invalid limit 'a lot'" in done.stderr
    assert "Traceback" not in done.stderr
