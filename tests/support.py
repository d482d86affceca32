"""Test plumbing: configs, and the gateway served by real HTTP servers.

`LiveServer` runs the app in this process under Werkzeug's threaded server (fast to
start, and the ledger can be inspected directly); `Gunicorn` runs `gunicorn -c
gunicorn.conf.py app:app` as a subprocess, as the Procfile does, for tests where the
production HTTP layer matters (streaming, disconnects, several workers).
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import requests
import tomli_w
from werkzeug.serving import make_server

from keymeai.ledger.db import connection
from keymeai.ledger.journal import catch_up
from keymeai.ledger.models import UsageRecord

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_KEY = "sk-fake-upstream"
PROVIDER_ENV = {
    "DEEPSEEK_API_KEY": UPSTREAM_KEY,
    "DASHSCOPE_API_KEY": UPSTREAM_KEY,
    "ARK_API_KEY": UPSTREAM_KEY,
}
PRICES = {
    "deepseek-chat": {"input": 0.27, "cached_input": 0.07, "output": 1.10},
    "deepseek-reasoner": {"input": 0.55, "cached_input": 0.14, "output": 2.19},
    "doubao-pro-32k": {"input": 0.11, "cached_input": 0.022, "output": 0.28},
    "qwen-max": {"input": 1.6, "cached_input": 0.64, "output": 6.4},
    "qwen-plus": {"input": 0.4, "cached_input": 0.16, "output": 1.2},
}


def base_config(fake_url: str, database_url: str) -> dict[str, Any]:
    """The five public models of config.toml, their providers pointed at the fake."""
    return copy.deepcopy(
        {
            "gateway": {"key_cache_seconds": 1, "stream_keepalive_seconds": 10},
            "database": {"url": database_url},
            "ratelimit": {"storage_uri": "memory://"},
            "routing": {"failure_threshold": 3, "cooldown_seconds": 30},
            "tiers": {
                "free": {"requests": ["100 per day"]},
                "hobby": {"requests": ["600 per minute"], "tokens_per_month": 5_000_000},
                "standard": {"requests": ["3000 per minute"]},
                "scale": {"requests": ["10000 per minute"]},
            },
            "providers": {
                "deepseek": {
                    "base_url": f"{fake_url}/deepseek/ok/v1",
                    "api_key_env": "DEEPSEEK_API_KEY",
                    "connect_timeout": 2,
                    "read_timeout": 10,
                },
                "dashscope": {
                    "base_url": f"{fake_url}/dashscope/ok/compatible-mode/v1",
                    "api_key_env": "DASHSCOPE_API_KEY",
                    "connect_timeout": 2,
                    "read_timeout": 10,
                },
                "ark": {
                    "base_url": f"{fake_url}/ark/ok/api/v3",
                    "api_key_env": "ARK_API_KEY",
                    "connect_timeout": 2,
                    "read_timeout": 10,
                },
            },
            "models": {
                "deepseek-chat": {
                    "owned_by": "deepseek",
                    "upstreams": [{"provider": "deepseek", "model": "deepseek-chat"}],
                    "price": PRICES["deepseek-chat"],
                },
                "deepseek-reasoner": {
                    "owned_by": "deepseek",
                    "upstreams": [{"provider": "deepseek", "model": "deepseek-reasoner"}],
                    "price": PRICES["deepseek-reasoner"],
                },
                "doubao-pro-32k": {
                    "owned_by": "bytedance",
                    "upstreams": [{"provider": "ark", "model": "doubao-pro-32k-241215"}],
                    "price": PRICES["doubao-pro-32k"],
                },
                "qwen-max": {
                    "owned_by": "alibaba",
                    "upstreams": [{"provider": "dashscope", "model": "qwen-max"}],
                    "price": PRICES["qwen-max"],
                },
                "qwen-plus": {
                    "owned_by": "alibaba",
                    "upstreams": [{"provider": "dashscope", "model": "qwen-plus"}],
                    "price": PRICES["qwen-plus"],
                },
            },
        }
    )


def add_provider(data: dict[str, Any], name: str, base_url: str, **options: Any) -> None:
    """Add a provider (e.g. one in a fault mode of the fake) using the deepseek key."""
    data["providers"][name] = {
        "base_url": base_url,
        "api_key_env": "DEEPSEEK_API_KEY",
        "connect_timeout": 2,
        "read_timeout": 10,
        **options,
    }


def add_model(data: dict[str, Any], model_id: str, upstreams: list[tuple[str, str]]) -> None:
    data["models"][model_id] = {
        "upstreams": [{"provider": p, "model": m} for p, m in upstreams],
        "price": PRICES["deepseek-chat"],
    }


def write_toml(data: dict[str, Any], path: Path) -> Path:
    path.write_text(tomli_w.dumps(data))
    return path


JOURNALS: list[Path] = []  # the usage journals of the test's gateways (see conftest)


def apply_journals() -> None:
    """Apply what the test's gateways journaled, as `GET /v1/usage` and the reports do
    before they read (keymeai.ledger.journal.catch_up): the ledger then holds every request
    answered so far, and no reservation of one."""
    for directory in JOURNALS:
        catch_up(directory)


def usage_records() -> list[UsageRecord]:
    """Every usage record in the ledger, oldest first (journals applied)."""
    apply_journals()
    with connection():
        return list(UsageRecord.select().order_by(UsageRecord.id))


def wait_for_records(count: int, timeout: float = 5.0) -> list[UsageRecord]:
    """The ledger's records once there are at least `count` (or whatever is there)."""
    deadline = time.monotonic() + timeout
    while True:
        records = usage_records()
        if len(records) >= count or time.monotonic() > deadline:
            return records
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class InFlight:
    """WSGI middleware counting the requests still being served (a stream until its
    body is exhausted or closed), so that a test's server can wait for them before the
    next test's ledger takes the global database: a request that ended late would
    otherwise write its record into the next test's ledger (seen: 102 records for 100
    requests, and 4 for 1). A body counts out when it is exhausted, not only when it is
    closed: Werkzeug's server skips `close()` when the client resets the connection
    while the server drains it after the response."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.count = 0
        self.idle = threading.Condition()

    def __call__(self, environ: Any, start_response: Any) -> Any:
        with self.idle:
            self.count += 1
        try:
            body = self.app(environ, start_response)
        except BaseException:
            self.done()
            raise
        return _Counted(body, self.done)

    def done(self) -> None:
        with self.idle:
            self.count -= 1
            self.idle.notify_all()

    def wait(self, timeout: float) -> bool:
        with self.idle:
            return self.idle.wait_for(lambda: self.count == 0, timeout)


class _Counted:
    """A response body that calls `done` once: when exhausted or closed."""

    def __init__(self, body: Any, done: Callable[[], None]) -> None:
        self.body = body
        self._done: Callable[[], None] | None = done

    def __iter__(self) -> Iterator[bytes]:
        yield from self.body
        self._count_out()

    def close(self) -> None:
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            self._count_out()

    def _count_out(self) -> None:
        done, self._done = self._done, None
        if done is not None:
            done()


class LiveServer:
    """The app under Werkzeug's threaded server, in a background thread."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.in_flight = InFlight(app)
        self._server = make_server("127.0.0.1", 0, self.in_flight, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        # stop() waits for the serving loop to look: up to poll_interval, after every test.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )

    def start(self) -> LiveServer:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.in_flight.wait(timeout)


class Gunicorn:
    """`gunicorn -c gunicorn.conf.py app:app` in a subprocess, as the Procfile runs it."""

    def __init__(
        self,
        config_path: Path,
        log_path: Path,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        inherited = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
        self.env = {
            **inherited,
            **PROVIDER_ENV,
            "KEYMEAI_CONFIG": str(config_path),
            "PORT": str(self.port),
            **(env or {}),
        }
        self.args = args or []
        self.worker_class = self.env.get("KEYMEAI_WORKER_CLASS", "gevent")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20, wait: bool = True) -> Gunicorn:
        """Launch gunicorn; with `wait`, return once it serves (else call `ready()`:
        servers launched together boot together)."""
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "-c",
                "gunicorn.conf.py",
                # Idle keep-alive connections of a test's clients would hold a stopping
                # worker for the whole keep-alive time (5 s); a test may ask for more.
                "--keep-alive",
                "1",
                *self.args,
                "app:app",
            ],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        return self.ready(timeout) if wait else self

    def ready(self, timeout: float = 20) -> Gunicorn:
        """Return once /healthz answers 200; stopped and raised if it does not in time."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        moves = 2  # another process may take the free port before gunicorn binds it
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = self.log_path.read_text()
                if moves and f"Connection in use: ('0.0.0.0', {self.port})" in log:
                    moves -= 1
                    self._move(free_port())
                    self.start(wait=False)
                    deadline = time.monotonic() + timeout
                    continue
                raise RuntimeError(f"gunicorn exited: {log[-3000:]}")
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except (requests.ConnectionError, requests.Timeout):
                pass  # not listening yet, or a worker still booting on a busy machine
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gunicorn did not start: {self.log_path.read_text()[-3000:]}")

    def _move(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env["PORT"] = str(port)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(sig)
        return self.wait(timeout)

    def send(self, sig: int) -> None:
        """Send `sig` to the master, if it still runs."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def wait(self, timeout: float = 30) -> int | None:
        """The exit status; killed when it takes longer than `timeout` seconds."""
        if self.process is None:
            return None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text()


def add_route(
    data: dict[str, Any], fake_url: str, model_id: str, modes: list[str], **options: Any
) -> list[str]:
    """Give `model_id` one upstream per fake mode, tried in order (e.g. ["503", "ark/ok"]).

    Each upstream gets its own provider `<model_id>-<i>` (so its own breaker and pool);
    a mode may name the provider shape as `shape/mode` (default deepseek). `options` are
    provider settings such as `read_timeout`. Returns the provider names.
    """
    base_paths = {"deepseek": "v1", "dashscope": "compatible-mode/v1", "ark": "api/v3"}
    names = []
    for i, spec in enumerate(modes):
        shape, _, mode = spec.rpartition("/")
        shape = shape or "deepseek"
        name = f"{model_id}-{i}"
        add_provider(data, name, f"{fake_url}/{shape}/{mode}/{base_paths[shape]}", **options)
        names.append(name)
    add_model(data, model_id, [(name, f"{name}-upstream") for name in names])
    return names


class Blackhole:
    """A TCP port whose accept queue is full: connecting to it hangs until a timeout.

    The kernel drops SYNs to a full listen backlog, which is what an unreachable
    provider looks like from here.
    """

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(0)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._fillers = []
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            # A non-blocking connect goes on in the background: that fills the queue.
            filler.connect_ex(self._listener.getsockname())
            self._fillers.append(filler)

    def close(self) -> None:
        for sock in [*self._fillers, self._listener]:
            sock.close()


def assert_no_secrets(text: str, fake_url: str, *keys: str) -> None:
    """`text` (an error, a stream, a log) names no provider key, provider address or km- key."""
    host = fake_url.removeprefix("http://")
    for secret in (UPSTREAM_KEY, host, *keys):
        assert secret not in text, f"{secret!r} leaked"
    assert "Traceback" not in text


def log_text(caplog: Any) -> str:
    """Captured log records as the JSON lines production writes (message and extras)."""
    from keymeai.ops.logs import JsonFormatter

    formatter = JsonFormatter()
    return "\n".join(formatter.format(record) for record in caplog.records)


ROUTED_MODEL = "resilient"  # the model `add_route` tests give their fault-mode upstreams
FAST_TIMEOUTS = {"connect_timeout": 0.5, "read_timeout": 0.5}
# A wait that FAST_TIMEOUTS (or no timeout at all) bounds ends well within this, even on a
# busy machine; one they fail to bound lasts the client's 15 s (a hanging fake: 60 s).
SOON = 6.0


class ManualClock:
    """The monotonic clock, which a test can move on: cooldowns end without waiting them out."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class Routed:
    """A gateway started by the `route` fixture: an SDK client, the model's providers, and
    the clock of its breakers (`clock.advance(s)` moves the cooldowns on)."""

    def __init__(self, client: Any, providers: list[str], key: str, clock: ManualClock) -> None:
        self.client = client  # openai.OpenAI
        self.providers = providers
        self.key = key
        self.clock = clock


def timed_chat(client: Any, **extra: Any) -> tuple[Any, float]:
    """A completion of the routed model, or the SDK's exception; and the seconds it took."""
    import openai

    started = time.monotonic()
    try:
        result: Any = client.chat.completions.create(
            model=ROUTED_MODEL, messages=[{"role": "user", "content": "hello there"}], **extra
        )
    except openai.APIError as exc:
        result = exc
    return result, time.monotonic() - started
