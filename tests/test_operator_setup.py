"""What an operator sees of the setup: which config and ledger a command uses, one clear
line for a ledger that cannot be opened, and warnings about missing provider keys once
per server start instead of on every command."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from tests.helpers.cli import cli_env, flask_cli
from tests.helpers.config import ROOT
from tests.helpers.servers import Gunicorn, free_port
from tests.helpers.services import require_postgres

WARNING = "has no API key"


def test_info_names_the_config_the_ledger_and_unservable_models(
    config_data: dict[str, Any], tmp_path: Path
) -> None:
    env = cli_env(config_data, tmp_path)
    del env["DASHSCOPE_API_KEY"]
    result = flask_cli(env, "info")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"config:  {tmp_path / 'cli-config.toml'}"
    assert lines[1] == f"ledger:  {config_data['database']['url']}"
    assert "model:   qwen-plus -> dashscope/qwen-plus (no provider key set)" in lines
    assert "model:   deepseek-chat -> deepseek/deepseek-chat (ready)" in lines
    assert WARNING not in result.stderr  # commands do not warn; `info` says it


def test_an_unreachable_ledger_is_one_line_without_its_password(
    config_data: dict[str, Any], tmp_path: Path
) -> None:
    require_postgres()
    missing = "postgresql://postgres:pa55word@127.0.0.1:5432/keymeai_never_created"
    refused = f"postgresql://postgres:pa55word@127.0.0.1:{free_port()}/keymeai"
    for url, reason in ((missing, 'database "keymeai_never_created" does not exist'),
                        (refused, "Connection refused")):  # fmt: skip
        result = flask_cli(cli_env(config_data, tmp_path, DATABASE_URL=url), "keys", "list")
        assert result.returncode == 1
        [line] = result.stderr.strip().splitlines()
        assert line.startswith("keymeai: database postgresql://postgres:***@127.0.0.1:")
        assert reason in line and "createdb" in line
        assert "pa55word" not in result.stderr and "Traceback" not in result.stderr


def test_the_server_warns_once_at_start_about_missing_provider_keys(
    start_gunicorn: Callable[..., Gunicorn],
) -> None:
    server = start_gunicorn(env={"ARK_API_KEY": ""}, args=["--workers", "1"])
    log = server.log()
    assert log.count("provider ark has no API key: ARK_API_KEY is not set") == 1
    assert log.count("model doubao-pro-32k cannot be served") == 1
    assert log.count(WARNING) == 1  # the other providers have their keys


def test_gunicorn_users_choose_the_worker_class_as_gunicorn_users_do(
    start_gunicorn: Callable[..., Gunicorn], config_data: dict[str, Any], tmp_path: Path
) -> None:
    """`-k gthread` on the command line or in GUNICORN_CMD_ARGS, KEYMEAI_WORKER_CLASS, or
    gevent by default; gevent patched exactly when it is the one chosen; others refused."""
    by_flag = start_gunicorn(args=["-k", "gthread"])
    by_env = start_gunicorn(env={"GUNICORN_CMD_ARGS": "--worker-class=gthread --threads 8"})
    by_default = start_gunicorn()
    for server, chosen in ((by_flag, "gthread"), (by_env, "gthread"), (by_default, "gevent")):
        assert f"Using worker: {chosen}" in server.log()
        assert requests.get(f"{server.url}/healthz", timeout=5).status_code == 200
    refused = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-k", "sync", "app:app"],
        cwd=ROOT,
        env=cli_env(config_data, tmp_path, PORT=str(free_port())),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode != 0
    assert "the gateway runs on gevent (default) or gthread" in refused.stderr
