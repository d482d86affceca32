"""Helpers for the limit, quota and /v1/usage tests: clients in parallel, CLI, Redis."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import redis
from click.testing import Result
from flask import Flask
from openai import OpenAI

from keymeai.ledger.db import connection
from keymeai.ledger.models import QuotaReservation
from tests.support import apply_journals, free_port

MODEL = "deepseek-chat"
HI = [{"role": "user", "content": "hi"}]  # the fake counts 4 prompt tokens; so does the gateway


def sdk(base_url: str, key: str, **options: Any) -> OpenAI:
    """The openai SDK pointed at a gateway (no retries unless asked)."""
    return OpenAI(
        base_url=f"{base_url}/v1", api_key=key, **{"max_retries": 0, "timeout": 60, **options}
    )


def ask(client: OpenAI, knobs: dict[str, Any] | None = None, **options: Any) -> Any:
    """One chat completion; the raw response (headers and `.parse()`)."""
    return client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=HI,
        extra_body={"fake": knobs} if knobs else None,
        **options,
    )


def outcome(call: Callable[[], Any]) -> str:
    """ "ok", or the error code of a refused request (e.g. "rate_limit_exceeded")."""
    try:
        call()
    except openai.APIStatusError as exc:
        return f"{exc.status_code} {exc.code}"
    return "ok"


def hammer(
    base_urls: list[str],
    key: str,
    clients: int = 16,
    attempts: int = 8,
    knobs: dict[str, Any] | None = None,
    **options: Any,
) -> collections.Counter[str]:
    """`clients` threads, each with its own SDK client (to the base URLs in turn),
    sending `attempts` requests as fast as they are answered; outcomes counted."""
    start = threading.Barrier(clients)

    def run(n: int) -> list[str]:
        with sdk(base_urls[n % len(base_urls)], key) as client:
            start.wait()
            return [outcome(lambda: ask(client, knobs, **options)) for _ in range(attempts)]

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(run, range(clients)))
    return collections.Counter(item for result in results for item in result)


def cli(app: Flask, *args: str) -> Result:
    """Run `flask keys ...` against the app, then drop its key cache (as the cache's
    few seconds would on a real instance)."""
    result = app.test_cli_runner().invoke(args=list(args))
    app.extensions["keymeai"].keys.clear()
    return result


def reservations() -> int:
    """Reservations of requests in flight (the journals applied first)."""
    apply_journals()
    with connection():
        return int(QuotaReservation.select().count())


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def worker_pids(master_pid: int) -> list[int]:
    """The gunicorn master's worker processes."""
    with open(f"/proc/{master_pid}/task/{master_pid}/children") as fh:
        return [int(pid) for pid in fh.read().split()]


class RedisServer:
    """A throw-away `redis-server` on a free port, to stop, freeze and restart in tests."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        options = {"port": str(self.port), "bind": "127.0.0.1", "save": "", "appendonly": "no"}
        args = [item for name, value in options.items() for item in (f"--{name}", value)]
        self.process = subprocess.Popen(
            ["redis-server", *args, "--daemonize", "no"], stdout=subprocess.DEVNULL
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        if not wait_until(lambda: _answers(client)):
            raise RuntimeError(f"redis-server on port {self.port} did not start")
        client.close()
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # in case it was frozen
            self.process.kill()
            self.process.wait(10)

    def freeze(self) -> None:
        """Stop the process: connections still open, nothing ever answers (a hung Redis)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def commands(self) -> dict[str, int]:
        """Calls per command since start (INFO commandstats), e.g. {"evalsha": 10}."""
        client = redis.Redis(port=self.port)
        stats = client.info("commandstats")
        client.close()
        return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
