"""The real PostgreSQL and Redis servers the tests use, and their clean-up.

PostgreSQL: every test that runs on it gets a fresh database named `keymeai_t_<8 hex>`,
created from the `postgres` maintenance database and dropped (with its leftover
connections) afterwards. Redis: a test claims one of the databases 1-10 (a lock file
per number keeps concurrent test runs on one machine apart) and it is flushed before
and after. Where a server is absent its tests skip, unless KEYMEAI_REQUIRE_SERVICES=1
(CI), which turns the skip into a failure.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
import redis

# The maintenance database (trust auth on loopback); override for another server.
POSTGRES_URL = os.environ.get(
    "KEYMEAI_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("KEYMEAI_TEST_REDIS_URL", "redis://127.0.0.1:6379")
REDIS_DATABASES = range(1, 11)  # the numbers these tests may use (and flush)
DATABASE_PREFIX = "keymeai_t_"


def services_required() -> bool:
    return os.environ.get("KEYMEAI_REQUIRE_SERVICES") == "1"


def unavailable(reason: str) -> None:
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
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
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
    url = create_postgres_database()
    try:
        yield url
    finally:
        drop_postgres_database(url)


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
            client = redis.Redis.from_url(url)
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


class PrivateRedis:
    """A redis-server of the test's own on a free port, which the test may stop.

    `tls` serves TLS only, with a fresh self-signed certificate (`cert_path`), as
    hosted Redis add-ons do behind rediss:// URLs.
    """

    def __init__(self, directory: Path, port: int, tls: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            unavailable("redis-server is not installed")
        self.port = port
        self.cert_path = directory / "redis-cert.pem"
        if tls:
            key_path = directory / "redis-key.pem"
            openssl = "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=127.0.0.1"
            subprocess.run(
                [
                    *openssl.split(),
                    *["-addext", "subjectAltName=IP:127.0.0.1"],
                    *["-keyout", str(key_path), "-out", str(self.cert_path)],
                ],
                check=True,
                capture_output=True,
            )
            listen = ["--port", "0", "--tls-port", str(port), "--tls-auth-clients", "no"]
            listen += ["--tls-cert-file", str(self.cert_path), "--tls-key-file", str(key_path)]
            listen += ["--tls-ca-cert-file", str(self.cert_path)]
        else:
            listen = ["--port", str(port)]
        self.url = f"{'rediss' if tls else 'redis'}://127.0.0.1:{port}/6"
        self.process = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", *listen],
            cwd=directory,
            stdout=subprocess.DEVNULL,
        )

    def client(self, url: str | None = None) -> redis.Redis:
        return redis.Redis.from_url(url or self.url, socket_connect_timeout=2)

    def wait_ready(self, url: str | None = None, timeout: float = 10) -> None:
        client = self.client(url)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
