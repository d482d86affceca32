"""The Procfile as a Heroku-style host runs it: `release:` then `web:`, configured by env.

No KEYMEAI_CONFIG: the shipped config.toml, with DATABASE_URL (postgres://), REDIS_URL,
PORT and WEB_CONCURRENCY from the environment, as the platform sets them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.helpers import services
from tests.helpers.cli import OVERRIDES
from tests.helpers.config import ROOT
from tests.helpers.servers import free_port

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip())


def platform_env(database_url: str, redis_url: str, port: int) -> dict[str, str]:
    inherited = {
        k: v for k, v in os.environ.items() if k not in OVERRIDES and k != "KEYMEAI_CONFIG"
    }
    return {
        **inherited,
        # The slug's virtualenv is on PATH, as on the host.
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        "DATABASE_URL": database_url.replace("postgresql://", "postgres://", 1),
        "REDIS_URL": redis_url,
        "PORT": str(port),
        "WEB_CONCURRENCY": "2",
        "KEYMEAI_ADMIN_TOKEN": "procfile-admin-token",
    }


def test_release_then_web_on_postgres_and_redis(redis_url: str, tmp_path: Path) -> None:
    commands = procfile()
    assert set(commands) == {"web", "release"}
    port = free_port()
    with services.postgres_database() as database_url:
        env = platform_env(database_url, redis_url, port)
        release = subprocess.run(
            ["bash", "-c", commands["release"]],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert release.returncode == 0, release.stderr
        assert release.stdout.startswith("Applied 0001_initial")

        log_path = tmp_path / "web.log"
        with log_path.open("wb") as log:
            web = subprocess.Popen(
                ["bash", "-c", f"exec {commands['web']}"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, web, log_path)
            assert requests.get(f"{url}/readyz", timeout=5).status_code == 200
            create = subprocess.run(
                ["bash", "-c", "flask --app app keys create --name dyno --tier standard"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert create.returncode == 0, create.stderr
            key = create.stdout.strip().splitlines()[-1]
            models = requests.get(
                f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5
            )
            assert models.status_code == 200
            assert "deepseek-chat" in [m["id"] for m in models.json()["data"]]
            assert requests.get(f"{url}/metrics", timeout=5).status_code == 401
            log = log_path.read_text()
            assert f"Listening at: http://0.0.0.0:{port}" in log
            assert len(re.findall("Booting worker", log)) == 2
        finally:
            web.send_signal(signal.SIGTERM)
            assert web.wait(30) == 0


def wait_healthy(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, log_path.read_text()[-3000:]
        try:
            if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):
            pass
        time.sleep(0.1)
    raise AssertionError(f"web did not start: {log_path.read_text()[-3000:]}")
