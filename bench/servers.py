"""The processes under test: the fast fake upstream, the gateway and the passthrough.

The gateway runs exactly as the Procfile says (`gunicorn -c gunicorn.conf.py app:app`)
from the repository root, with a temporary config whose only provider is the fake, a
temporary SQLite ledger, a real key created by the CLI, real limits and metering. The
passthrough runs under the same config file and the same command-line overrides.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tomli_w
from loadgen import children

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
UPSTREAM_KEY = "sk-bench-upstream"
MODEL = "deepseek-chat"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """A server subprocess on a loopback port, logging to a file, stopped by its pid."""

    def __init__(self, name: str, command: list[str], port: int, env: dict[str, str], log: Path):
        self.name = name
        self.port = port
        self.log = log
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def workers(self) -> list[int]:
        """gunicorn's worker pids (the fake upstream is its own single process)."""
        return children(self.pid) or [self.pid]

    def wait_ready(self, body: bytes, key: str | None, timeout: float = 30) -> None:
        """Until a real request is answered 200 (gunicorn binds before workers boot)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                status, _ = post(self.port, body, key)
                if status == 200:
                    return
                last = status
            except OSError as exc:
                last = exc
            time.sleep(0.1)
        tail = self.log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{self.name} did not come up ({last}); log tail:\n{tail}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def post(port: int, body: bytes, key: str | None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        conn.request("POST", "/v1/chat/completions", body, headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def start_fake(tmp: Path) -> Server:
    port = free_port()
    command = [sys.executable, str(BENCH / "fastfake.py"), "--port", str(port)]
    return Server("fake upstream", command, port, dict(os.environ), tmp / "fastfake.log")


def write_config(tmp: Path, upstream_port: int, storage_uri: str) -> Path:
    """One model on one provider (the fake); the standard tier with a limit never hit."""
    data = {
        "database": {"url": f"sqlite:///{tmp / 'ledger.db'}"},
        "ratelimit": {"storage_uri": storage_uri},
        "tiers": {"standard": {"requests": ["10000000 per minute"]}},
        "providers": {
            "deepseek": {
                "base_url": f"http://127.0.0.1:{upstream_port}/v1",
                "api_key_env": "DEEPSEEK_API_KEY",
            }
        },
        "models": {
            MODEL: {
                "owned_by": "deepseek",
                "upstreams": [{"provider": "deepseek", "model": MODEL}],
                "price": {"input": 0.27, "cached_input": 0.07, "output": 1.10},
            }
        },
    }
    path = tmp / "keymeai.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def gateway_env(config: Path, upstream_port: int) -> dict[str, str]:
    env = {
        **os.environ,
        "KEYMEAI_CONFIG": str(config),
        "DEEPSEEK_API_KEY": UPSTREAM_KEY,
        "BENCH_UPSTREAM_URL": f"http://127.0.0.1:{upstream_port}/v1",
    }
    for name in ("PROMETHEUS_MULTIPROC_DIR", "DATABASE_URL", "REDIS_URL", "RATELIMIT_STORAGE_URI"):
        env.pop(name, None)
    return env


def create_key(env: dict[str, str]) -> str:
    """A standard-tier key, created by the operator's CLI; its last line is the key."""
    out = subprocess.run(
        [
            str(VENV_BIN / "flask"),
            "--app",
            "app",
            *("keys", "create", "--name", "bench"),
            "--tier",
            "standard",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.strip().splitlines()[-1]


def start_gunicorn(
    name: str, app: str, env: dict[str, str], overrides: list[str], log: Path
) -> Server:
    port = free_port()
    command = [str(VENV_BIN / "gunicorn"), "-c", "gunicorn.conf.py", *overrides]
    if app.startswith("passthrough"):
        command += ["--pythonpath", str(BENCH)]
    command.append(app)
    return Server(name, command, port, {**env, "PORT": str(port)}, log)


def stats(port: int, reset: bool) -> dict[str, Any]:
    """The fake upstream's counters (and its own send lag); `reset` zeroes them after."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/stats?reset=1" if reset else "/stats")
        data: dict[str, Any] = json.loads(conn.getresponse().read())
        return data
    finally:
        conn.close()
