"""The real PostgreSQL and Redis servers the tests use, and their clean-up.

PostgreSQL: every test that runs on it gets a fresh database named `keymeai_t_<8 hex>`,
created from the `postgres` maintenance database and dropped (with its leftover
connections) afterwards. Redis: a test claims one of the databases 1-10 of the shared
server (a lock file per number keeps concurrent test runs on one machine apart) and it
is flushed before and after; a test that stops, freezes or kills Redis runs a
`RedisServer` of its own. Where a server is absent its tests skip, unless
KEYMEAI_REQUIRE_SERVICES=1 (CI), which turns the skip into a failure.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
import redis

from tests.helpers.servers import free_port

# The maintenance database (trust auth on loopback); override for another server.
POSTGRES_URL = os.environ.get(
    "KEYMEAI_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("KEYMEAI_TEST_REDIS_URL", "redis://127.0.0.1:6379")
REDIS_DATABASES = range(1, 11)  # the numbers these tests may use (and flush)
DATABASE_PREFIX = "keymeai_t_"
TIMEOUT = 10  # seconds for any answer of PostgreSQL, Redis or a helper command


def services_required() -> bool:
    return os.environ.get("KEYMEAI_REQUIRE_SERVICES") == "1"


def unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it where the services are mandatory (CI)."""
    if services_required():
        pytest.fail(f"{reason} (KEYMEAI_REQUIRE_SERVICES=1)", pytrace=False)
    pytest.skip(reason)


@functools.cache
def postgres_problem() -> str | None:
    try:
        psycopg2.connect(POSTGRES_URL, connect_timeout=3).close()
    except psycopg2.Error as exc:
        return f"PostgreSQL unreachable at {_safe(POSTGRES_URL)}: {str(exc).strip()}"
    return None


@functools.cache
def redis_problem() -> str | None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3, socket_timeout=3).ping()
    except redis.RedisError as exc:
        return f"Redis unreachable at {_safe(REDIS_URL)}: {exc}"
    return None


def require_postgres() -> None:
    problem = postgres_problem()
    if problem:
        unavailable(problem)


def require_redis() -> None:
    problem = redis_problem()
    if problem:
        unavailable(problem)


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _admin() -> psycopg2.extensions.connection:
    conn = psycopg2.connect(POSTGRES_URL, connect_timeout=5)
    conn.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
    return conn


def postgres_url(name: str) -> str:
    """The URL of database `name` on the test server."""
    return urlunsplit(urlsplit(POSTGRES_URL)._replace(path=f"/{name}"))


def create_postgres_database() -> str:
    """A new, empty, uniquely named database; returns its URL."""
    name = f"{DATABASE_PREFIX}{uuid.uuid4().hex[:8]}"
    with contextlib.closing(_admin()) as conn, conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    return postgres_url(name)


def drop_postgres_database(url: str) -> None:
    """Drop a database made by `create_postgres_database`, ending its connections."""
    name = urlsplit(url).path.lstrip("/")
    if not name.startswith(DATABASE_PREFIX):
        raise ValueError(f"refusing to drop {name!r}: not a test database")
    with contextlib.closing(_admin()) as conn, conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A new database on the test server (skipped where it is unreachable), dropped after."""
    require_postgres()
    url = create_postgres_database()
    try:
        yield url
    finally:
        drop_postgres_database(url)


def redis_client(url: str) -> redis.Redis:
    """A client of `url` whose every wait is bounded: a test never hangs on Redis."""
    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=TIMEOUT)


@contextlib.contextmanager
def redis_database() -> Iterator[str]:
    """The URL of a Redis database from 1-10 that no other test holds, flushed."""
    lock_dir = Path(tempfile.gettempdir())
    while True:
        for number in REDIS_DATABASES:
            lock = (lock_dir / f"keymeai-test-redis-{number}.lock").open("a")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            url = f"{REDIS_URL}/{number}"
            client = redis_client(url)
            try:
                client.flushdb()
                yield url
            finally:
                client.flushdb()
                client.close()
                lock.close()
            return
        # All are held by concurrent runs: wait for the first.
        with (lock_dir / f"keymeai-test-redis-{REDIS_DATABASES[0]}.lock").open("a") as first:
            fcntl.flock(first, fcntl.LOCK_EX)


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (`<name>-cert.pem`, `<name>-key.pem`)."""
    cert, key = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
    openssl = "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=127.0.0.1"
    command = [*openssl.split(), "-addext", "subjectAltName=IP:127.0.0.1"]
    command += ["-keyout", str(key), "-out", str(cert)]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    return cert, key


class RedisServer:
    """A redis-server of the test's own on a free port, which the test may stop, kill,
    freeze (a hung Redis) or thaw.

    `tls` serves TLS only, with a fresh self-signed certificate (`cert_path`), as
    hosted Redis add-ons do behind rediss:// URLs.
    """

    def __init__(self, directory: Path, tls: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server is not installed")
        self.port = free_port()
        self.directory = directory
        self.cert_path = directory / "redis-cert.pem"
        self.url = f"{'rediss' if tls else 'redis'}://127.0.0.1:{self.port}/0"
        listen = ["--port", str(self.port)]
        if tls:
            self.cert_path, key_path = self_signed(directory, "redis")
            listen = ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            listen += ["--tls-cert-file", str(self.cert_path), "--tls-key-file", str(key_path)]
            listen += ["--tls-ca-cert-file", str(self.cert_path)]
        self.command = [binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.command += listen
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        """Launch it; return once it answers (stopped and raised if it does not)."""
        self.process = subprocess.Popen(self.command, cwd=self.directory, stdout=subprocess.DEVNULL)
        try:
            self.wait_ready(f"{self.url}?ssl_cert_reqs=none" if self.tls else None)
        except BaseException:
            self.kill()
            raise
        return self

    def client(self, url: str | None = None) -> redis.Redis:
        return redis_client(url or self.url)

    def wait_ready(self, url: str | None = None, timeout: float = 10) -> None:
        assert self.process is not None
        client = self.client(url)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return
            except (redis.ConnectionError, redis.TimeoutError):
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        """Stop it as an operator would (SIGTERM), waiting (bounded) for it to go."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(TIMEOUT)

    def kill(self) -> None:
        """Kill it (a frozen one too)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(TIMEOUT)

    def freeze(self) -> None:
        """Stop the process: connections still open, nothing ever answers (a hung Redis)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def commands(self) -> dict[str, int]:
        """Calls per command since start (INFO commandstats), e.g. {"evalsha": 10}."""
        with self.client() as client:
            stats = client.info("commandstats")
        return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
