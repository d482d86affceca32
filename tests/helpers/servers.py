"""The gateway served by real HTTP servers, and ports and processes around them.

`LiveServer` runs the app in this process under Werkzeug's threaded server (fast to
start, and the ledger can be inspected directly); `Gunicorn` runs `gunicorn -c
gunicorn.conf.py app:app` as a subprocess, as the Procfile does, for tests where the
production HTTP layer matters (streaming, disconnects, several workers).
"""

from __future__ import annotations

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
from openai import OpenAI
from werkzeug.serving import make_server

from keymeai.ledger import keys
from tests.helpers.clients import sdk
from tests.helpers.config import PROVIDER_ENV, ROOT


def free_port() -> int:
    """A TCP port free on loopback now (another process may take it before it is used)."""
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


class Gateway:
    """The gateway app served by Werkzeug in this process (the `start_gateway` fixture)."""

    def __init__(self, server: LiveServer) -> None:
        self.server = server
        self.app = server.app
        self.url = server.url

    def create_key(self, tier: str = "standard", name: str = "test") -> str:
        return keys.create_key(name, tier)[1]

    def client(self, key: str, **options: Any) -> OpenAI:
        return sdk(self.url, key, **options)


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


def worker_pids(master_pid: int) -> list[int]:
    """The gunicorn master's worker processes."""
    with open(f"/proc/{master_pid}/task/{master_pid}/children") as fh:
        return [int(pid) for pid in fh.read().split()]
