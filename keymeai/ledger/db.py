"""The ledger's database connection: one peewee database per process, pooled.

`DATABASE_URL` may be sqlite:///, postgres:// or postgresql:// (Heroku's spelling);
`playhouse.db_url` parses all three. Connections come from a pool, so a request that
touches the ledger pays for a checkout, not for a connect, and no connection is tied to
the thread (or greenlet) that happened to open it. A worker holds at most
`DATABASE_POOL_SIZE` connections (default 10) and a thread that finds them all busy
waits for one: small hosted PostgreSQL plans allow only 20 connections in all, so
instances x workers x pool size must stay below the plan's limit.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peewee import Database, DatabaseProxy, OperationalError, PostgresqlDatabase, SqliteDatabase
from playhouse.db_url import connect
from playhouse.migrations import Runner

from ..config import ConfigError
from ..ops.diagnostics import without_password

log = logging.getLogger(__name__)

db = DatabaseProxy()
_sqlite_writer = threading.RLock()  # one SQLite writer per process at a time

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
POOL_SIZE = 10
POOL_WAIT_SECONDS = 30
SQLITE_PRAGMAS = {
    # WAL lets readers run beside the one writer; NORMAL syncs at checkpoints, which
    # survives a crash of the process (not necessarily a power cut) and is much faster.
    "journal_mode": "wal",
    "synchronous": "normal",
    "busy_timeout": 30_000,
    "foreign_keys": 1,
}


def pooled_url(url: str) -> str:
    """Turn sqlite:// and postgres(ql):// into their pooled playhouse schemes."""
    scheme, sep, rest = url.partition("://")
    if not sep or "+" in scheme:
        return url
    return f"{scheme}+pool://{rest}"


def open_database(url: str) -> Database:
    """Connect the process-wide `db` proxy to the ledger at `url`."""
    options: dict[str, Any] = {
        "max_connections": pool_size(),
        "timeout": POOL_WAIT_SECONDS,
        "stale_timeout": 300,
        "autoconnect": False,
    }
    if url.startswith("sqlite"):
        options.update(pragmas=SQLITE_PRAGMAS, check_same_thread=False)
    else:
        # Credentials in a URL are percent-encoded (a "/" or "@" in a password).
        options.update(unquote_password=True, unquote_user=True)
    database = connect(pooled_url(url), **options)
    db.initialize(database)
    return database


def pool_size() -> int:
    raw = os.environ.get("DATABASE_POOL_SIZE", "")
    if not raw:
        return POOL_SIZE
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"DATABASE_POOL_SIZE: expected a positive integer, got {raw!r}")
    return int(raw)


def is_sqlite() -> bool:
    return isinstance(db.obj, SqliteDatabase)


@contextmanager
def write_transaction() -> Iterator[None]:
    """A transaction that takes SQLite's write lock at BEGIN.

    A deferred SQLite transaction that reads and then writes fails with "database is
    locked" when another process wrote in between; IMMEDIATE waits for the lock instead.
    The threads of one process queue on a lock of their own first: SQLite's busy handler
    sleeps in growing steps, so threads racing for its lock would stall for up to
    seconds (a p99 of over a second at 32 clients, measured).
    """
    if not is_sqlite():
        with db.atomic():
            yield
        return
    with _sqlite_writer, db.atomic("IMMEDIATE"):
        yield


@contextmanager
def connection() -> Iterator[None]:
    """Hold a pooled connection for the block, and give it back afterwards.

    Nested use keeps the outer connection open, unlike peewee's connection_context.
    """
    if not db.is_closed():
        yield
        return
    db.connect()
    try:
        yield
    finally:
        db.close()


def check_reachable(url: str) -> None:
    """One clear line, not a driver's traceback, when the ledger cannot be opened (most
    often a PostgreSQL database that was never created)."""
    try:
        with connection():
            pass
    except OperationalError as exc:
        reason = (str(exc).strip().splitlines() or ["no reason given"])[0]
        raise ConfigError(
            f"database {without_password(url)}: cannot connect ({reason}). Check DATABASE_URL; "
            "a PostgreSQL database must exist first (createdb NAME)."
        ) from None


_applied_here: weakref.WeakKeyDictionary[Database, list[str]] = weakref.WeakKeyDictionary()


def upgrade() -> list[str]:
    """Apply pending schema migrations; idempotent and safe to run concurrently.

    Returns every migration this process has applied, not only in this call:
    `create_app()` upgrades at start-up, so by the time `flask db upgrade` runs its
    command the work is done, and the command should still say what it did.
    """
    database = db.obj
    with connection(), _migration_lock(database):
        applied: list[str] = Runner(database, directory=str(MIGRATIONS_DIR)).up()
    for name in applied:
        log.info("applied migration %s", name)
    done = _applied_here.setdefault(database, [])
    done.extend(applied)
    return list(done)


@contextmanager
def _migration_lock(database: Database) -> Iterator[None]:
    """Serialise migrations across processes (and machines, for PostgreSQL)."""
    if isinstance(database, PostgresqlDatabase):
        lock_id = int.from_bytes(hashlib.sha256(b"keymeai-migrations").digest()[:7], "big")
        database.execute_sql("SELECT pg_advisory_lock(%s)", (lock_id,))
        try:
            yield
        finally:
            database.execute_sql("SELECT pg_advisory_unlock(%s)", (lock_id,))
        return
    # SQLite: an exclusive lock file next to the database, held for the whole run.
    path = Path(str(database.database))
    if str(path) == ":memory:":
        yield
        return
    with open(f"{path}.migrate-lock", "a+") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
