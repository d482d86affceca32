"""Per-key concurrency: at most `max_concurrent` requests of one key in flight at once.

A chat completion takes a slot after the request limits and before anything costly (its
body, the quota, the upstream), and gives it back once: when its meter finishes (before
the client sees the end of the answer, so a client sending one request after another is
never refused), or, for a request that ends before it has a meter or whose response is
never iterated, when the response is closed or the error raised.

Slots live where the request limits live. With `memory://` a count per key under a lock.
With Redis a sorted set per key: its members are the requests in flight, scored by the
end of their lease in Redis's own clock, so instances' clocks need not agree. One Lua
script drops lapsed leases, counts and adds, so every worker and instance sharing the
Redis admits exactly the bound. Each process renews the leases of its requests in flight
every lease/3 seconds from one background thread (a greenlet under gevent): a process
killed by SIGKILL holds its slots only until their leases lapse.

When Redis cannot be reached, `ratelimit.on_storage_error` decides as for the request
limits: "allow" counts in this process's memory for a while, "deny" answers 503.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from flask import Flask, Response, current_app, g
from flask_limiter import Limiter
from limits.errors import StorageError
from limits.storage import RedisStorage, Storage

from ..config import Config, Tier
from ..errors import ApiError
from ..ledger.keys import KeyInfo
from ..ops import metrics

log = logging.getLogger(__name__)

MAX_CONCURRENT = 2**31 - 1  # the ledger's INTEGER column
RETRY_AFTER = 1  # seconds: a slot frees when any of the key's requests ends
REDIS_RETRY_SECONDS = 5.0  # "allow": how long to count in memory before trying Redis again
EXTENSION = "keymeai.concurrency"

# KEYS[1]: the key's set; ARGV: lease (ms), bound, member. Returns {admitted, in flight}.
# A bound of 0 only counts. TIME before writes needs effects replication (the default
# from Redis 5; asked for explicitly on older servers).
_ACQUIRE = b"""
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call("time")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call("zremrangebyscore", KEYS[1], "-inf", now)
local n = redis.call("zcard", KEYS[1])
if n >= tonumber(ARGV[2]) then
    return {0, n}
end
redis.call("zadd", KEYS[1], now + tonumber(ARGV[1]), ARGV[3])
redis.call("pexpire", KEYS[1], ARGV[1])
return {1, n + 1}
"""
# KEYS[1]: the key's set; ARGV: lease (ms), then the members to renew. A member whose
# lease has already lapsed (and was dropped) is not brought back: its place may be taken.
_RENEW = b"""
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call("time")
local ends = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
    redis.call("zadd", KEYS[1], "XX", ends, ARGV[i])
end
redis.call("pexpire", KEYS[1], ARGV[1])
return 0
"""


def bound(key: KeyInfo, tier: Tier) -> int | None:
    """The key's own bound, else its tier's; None: unbounded."""
    return key.max_concurrent if key.max_concurrent is not None else tier.max_concurrent


class _Store(Protocol):
    def acquire(self, key_id: int, limit: int, member: str) -> tuple[bool, int]: ...
    def release(self, key_id: int, member: str) -> None: ...


class MemorySlots:
    """Counts per key in this process (memory:// storage, and "allow"'s fallback)."""

    def __init__(self) -> None:
        self._counts: dict[int, int] = {}
        self._lock = threading.Lock()

    def acquire(self, key_id: int, limit: int, member: str) -> tuple[bool, int]:
        with self._lock:
            held = self._counts.get(key_id, 0)
            if held >= limit:
                return False, held
            self._counts[key_id] = held + 1
            return True, held + 1

    def release(self, key_id: int, member: str) -> None:
        with self._lock:
            held = self._counts.get(key_id, 0) - 1
            if held > 0:
                self._counts[key_id] = held
            else:
                self._counts.pop(key_id, None)


class RedisSlots:
    """Leased slots in Redis, shared by every process that uses the same database."""

    def __init__(self, storage: RedisStorage, lease_seconds: float) -> None:
        self._storage: Any = storage
        self._client: Any = storage.get_connection()
        self._acquire = self._client.register_script(_ACQUIRE)
        self._renew = self._client.register_script(_RENEW)
        self.lease_ms = max(1, int(lease_seconds * 1000))
        self._held: dict[str, set[str]] = {}  # this process's requests in flight
        self._lock = threading.Lock()
        self._renewer: tuple[int, threading.Thread] | None = None

    def _name(self, key_id: int) -> str:
        return str(self._storage.prefixed_key(f"concurrency:key:{key_id}"))

    def _call(self, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except self._storage.base_exceptions as exc:
            raise StorageError(exc) from exc

    def acquire(self, key_id: int, limit: int, member: str) -> tuple[bool, int]:
        name = self._name(key_id)
        admitted, count = self._call(lambda: self._acquire([name], [self.lease_ms, limit, member]))
        if admitted:
            with self._lock:
                self._held.setdefault(name, set()).add(member)
            self._start_renewer()
        return bool(admitted), int(count)

    def release(self, key_id: int, member: str) -> None:
        """Give the slot back; if Redis cannot be told, its lease lapses on its own."""
        name = self._name(key_id)
        with self._lock:
            members = self._held.get(name, set())
            members.discard(member)
            if not members:
                self._held.pop(name, None)
        try:
            self._call(lambda: self._client.zrem(name, member))
        except StorageError as exc:
            log.warning(
                "concurrency slot not released (its lease will lapse): %s",
                type(exc.storage_error).__name__,
            )

    def _start_renewer(self) -> None:
        """One renewing thread per process, started by its first slot (after a fork)."""
        pid = os.getpid()
        if self._renewer is not None and self._renewer[0] == pid:
            return
        with self._lock:
            if self._renewer is not None and self._renewer[0] == pid:
                return
            thread = threading.Thread(target=self._renew_forever, name="slot-leases", daemon=True)
            self._renewer = (pid, thread)
        thread.start()

    def _renew_forever(self) -> None:
        while True:
            time.sleep(self.lease_ms / 3000)
            self.renew()

    def renew(self) -> None:
        """Extend the lease of every request of this process still in flight."""
        with self._lock:
            held = [(name, sorted(members)) for name, members in self._held.items() if members]
        if not held:
            return
        try:
            pipe = self._client.pipeline(transaction=False)
            for name, members in held:
                self._renew([name], [self.lease_ms, *members], client=pipe)
            self._call(pipe.execute)
        except StorageError as exc:
            log.warning("concurrency leases not renewed: %s", type(exc.storage_error).__name__)


class Slot:
    """One request's place among its key's requests in flight; released once.

    Once without a lock: the store is popped from the slot's attributes, which only one
    caller can do (a lock per request costs several microseconds under gevent)."""

    def __init__(self, store: _Store | None, key_id: int = 0, member: str = "") -> None:
        if store is not None:
            self._store = store
        self._key_id = key_id
        self._member = member

    def release(self) -> None:
        store: _Store | None = self.__dict__.pop("_store", None)
        if store is not None:
            store.release(self._key_id, self._member)


UNBOUNDED = Slot(None)  # the slot of a key without a bound: nothing to give back


class Concurrency:
    """The app's slots: in Redis when the limits are, else in this process."""

    def __init__(self, storage: Storage, lease_seconds: float, fail_open: bool) -> None:
        self.memory = MemorySlots()
        self.redis = (
            RedisSlots(storage, lease_seconds) if isinstance(storage, RedisStorage) else None
        )
        self.fail_open = fail_open
        self._memory_until = 0.0  # "allow": Redis failed; count in memory until then

    def _store(self) -> _Store:
        if self.redis is None or time.monotonic() < self._memory_until:
            return self.memory
        return self.redis

    def _use(self, key_id: int, limit: int, member: str) -> tuple[_Store, bool, int]:
        store = self._store()
        try:
            return store, *store.acquire(key_id, limit, member)
        except StorageError as exc:
            if not self.fail_open:
                raise  # answered 503 by the limits' StorageError handler
            log.warning(
                "concurrency storage unreachable, counting in this process for %ss: %s",
                REDIS_RETRY_SECONDS,
                type(exc.storage_error).__name__,
            )
            self._memory_until = time.monotonic() + REDIS_RETRY_SECONDS
            return self.memory, *self.memory.acquire(key_id, limit, member)

    def acquire(self, key: KeyInfo, tier: Tier) -> Slot:
        """A slot for a request of `key`; 429 when its requests in flight are at the bound."""
        limit = bound(key, tier)
        if limit is None:
            return UNBOUNDED
        member = uuid.uuid4().hex
        store, admitted, _ = self._use(key.id, limit, member)
        if not admitted:
            metrics.REJECTIONS.labels("concurrency").inc()
            raise ApiError(
                429,
                f"Too many concurrent requests for this key: at most {limit} at once. "
                "Wait for one of them to finish, then retry.",
                type="requests",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(RETRY_AFTER)},
            )
        return Slot(store, key.id, member)

    def in_flight(self, key: KeyInfo) -> int:
        """The key's requests in flight now (StorageError if Redis cannot be read)."""
        store = self._store()
        return store.acquire(key.id, 0, "")[1]


def standing(key: KeyInfo, tier: Tier) -> dict[str, Any] | None:
    """The key's bound and its requests in flight now, for `GET /v1/usage`; None when
    unbounded. `in_flight` and `remaining` are None when the storage cannot be read."""
    limit = bound(key, tier)
    if limit is None:
        return None
    try:
        in_flight: int | None = current().in_flight(key)
    except StorageError as exc:
        log.warning("usage: concurrency storage unreachable: %s", type(exc.storage_error).__name__)
        in_flight = None
    remaining = None if in_flight is None else max(0, limit - in_flight)
    return {"max_concurrent": limit, "in_flight": in_flight, "remaining": remaining}


def init_app(app: Flask, config: Config, limiter: Limiter) -> None:
    """Keep the app's slots in its limiter's storage."""
    settings = config.ratelimit
    app.extensions[EXTENSION] = Concurrency(
        limiter.storage, settings.concurrency_lease_seconds, settings.on_storage_error == "allow"
    )


def current() -> Concurrency:
    concurrency: Concurrency = current_app.extensions[EXTENSION]
    return concurrency


def current_slot() -> Slot:
    """The request's slot (a no-op slot outside `holding_slot`)."""
    slot: Slot = g.get("concurrency_slot") or UNBOUNDED
    return slot


def holding_slot(view: Callable[..., Response]) -> Callable[..., Response]:
    """Run `view` in a slot of the request's key (`g.api_key`, `g.tier`).

    The slot is released when the view fails, else when its response is closed (which
    the server does however the response ends, iterated or not), unless the view's meter
    released it earlier through `current_slot()`.
    """

    @functools.wraps(view)
    def held(*args: Any, **kwargs: Any) -> Response:
        slot = current().acquire(g.api_key, g.tier)
        g.concurrency_slot = slot
        try:
            response = view(*args, **kwargs)
        except BaseException:
            slot.release()
            raise
        response.call_on_close(slot.release)
        return response

    return held
