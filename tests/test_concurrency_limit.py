"""Per-key concurrency: at most `max_concurrent` requests of a key in flight, over real
HTTP with slow streams from the fake provider; set by tier or per key (CLI, admin API,
dashboard); exact across gunicorn workers and instances sharing Redis; a SIGKILLed
worker's slots lapse with their lease."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from threading import Barrier
from typing import Any

import openai
import pytest
import redis
import requests
from openai import OpenAI, Stream

from keymeai.ledger import keys
from tests.helpers.admin import admin_gateway
from tests.helpers.browser import field, screenshot, sign_in
from tests.helpers.cli import invoke
from tests.helpers.clients import HI, sdk, wait_until
from tests.helpers.config import MODEL
from tests.helpers.fake_upstream import FakeUpstream
from tests.helpers.ledger import usage_records, wait_for_records
from tests.helpers.routing import ROUTED_MODEL, add_route
from tests.helpers.servers import Gateway, Gunicorn, free_port, worker_pids
from tests.helpers.services import RedisServer, redis_client

SLOW = {"words": 400, "interval": 0.05}  # a stream of about 20 s, unless closed


@pytest.fixture
def bounded(config_data: dict[str, Any]) -> dict[str, Any]:
    """The test config with the shipped bounds of free (2) and standard (32)."""
    config_data["tiers"]["free"]["max_concurrent"] = 2
    config_data["tiers"]["standard"]["max_concurrent"] = 32
    return config_data


def hold(client: OpenAI, model: str = MODEL, **knobs: Any) -> Stream[Any]:
    """A stream, admitted (its first chunk read) and left open."""
    stream = client.chat.completions.create(
        model=model, messages=HI, stream=True, extra_body={"fake": {**SLOW, **knobs}}
    )
    next(iter(stream))
    return stream


def refusal(client: OpenAI) -> openai.RateLimitError:
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=MODEL, messages=HI)
    return info.value


def admitted_within(client: OpenAI, seconds: float = 5.0, **knobs: Any) -> Stream[Any]:
    """A stream admitted once a slot frees (the gateway notices a hang-up within ~1 s)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return hold(client, **knobs)
        except openai.RateLimitError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def in_flight(url: str, key: str) -> int:
    """The key's requests in flight, as `GET /v1/usage` tells its holder."""
    usage = requests.get(f"{url}/v1/usage", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    return int(usage.json()["limits"]["concurrency"]["in_flight"])


def test_beyond_the_bound_a_429_that_names_concurrency(
    start_gunicorn: Callable[..., Gunicorn],
    bounded: dict[str, Any],
    ledger: None,
    upstream: FakeUpstream,
) -> None:
    server = start_gunicorn(bounded)
    key = keys.create_key("two at once", "free")[1]
    with sdk(server.url, key, timeout=30) as client:
        streams = [hold(client), hold(client)]
        exc = refusal(client)
        assert exc.code == "rate_limit_exceeded" and exc.type == "requests"
        assert "Too many concurrent requests for this key: at most 2 at once" in exc.message
        assert exc.response.headers["Retry-After"] == "1"
        assert exc.response.headers["x-ratelimit-limit-requests"] == "100"  # counted first
        assert upstream.count() == 2  # the refused request reached no provider
        with sdk(server.url, keys.create_key("other", "free")[1]) as other:
            other.chat.completions.create(model=MODEL, messages=HI)  # another key's own slots

        usage = requests.get(
            f"{server.url}/v1/usage", headers={"Authorization": f"Bearer {key}"}, timeout=10
        ).json()
        assert usage["limits"]["concurrency"] == {
            "max_concurrent": 2,
            "in_flight": 2,
            "remaining": 0,
        }
        for stream in streams:
            stream.close()
    records = wait_for_records(3, timeout=10)
    mine = [r.outcome for r in records if r.key_id == keys.find_key(key).id]
    assert mine == ["client_closed", "client_closed"]  # none for the refused request


def test_a_slot_frees_however_a_request_ends(
    start_gunicorn: Callable[..., Gunicorn],
    bounded: dict[str, Any],
    ledger: None,
    upstream: FakeUpstream,
) -> None:
    add_route(bounded, upstream.url, ROUTED_MODEL, ["die"])  # dies after 3 chunks
    server = start_gunicorn(bounded)
    key = keys.create_key("ends", "free")[1]
    with sdk(server.url, key, timeout=30) as client:
        long = hold(client)
        short = hold(client, words=20)  # about 1 s
        refusal(client)
        assert len(list(short)) > 1  # to its end, [DONE] included
        # Freed before the client saw the end: the next request needs no wait.
        hanging = hold(client)
        refusal(client)

        hanging.close()  # the client hangs up mid-stream
        dying = admitted_within(client, model=ROUTED_MODEL, interval=0.3)
        refusal(client)
        with pytest.raises(openai.APIError, match="stopped responding"):
            list(dying)  # the upstream dies mid-answer
        failed = hold(client)
        refusal(client)

        failed.close()
        long.close()
        assert wait_until(lambda: in_flight(server.url, key) == 0)
        for _ in range(3):  # a non-stream answer and an error (400) free their slot too
            client.chat.completions.create(model=MODEL, messages=HI)
            with pytest.raises(openai.BadRequestError):
                client.chat.completions.create(model=MODEL, messages=[])
        assert in_flight(server.url, key) == 0
    outcomes = [r.outcome for r in usage_records()]
    assert outcomes.count("ok") == 4 and "upstream_failed" in outcomes


def test_the_key_override_beats_the_tier_set_by_admin_api_and_cli(
    start_gateway: Callable[..., Gateway], bounded: dict[str, Any]
) -> None:
    gateway, admin = admin_gateway(start_gateway, bounded)
    created = admin.create(name="override", tier="free", max_concurrent=3)
    assert created["max_concurrent"] == 3
    client = gateway.client(created["key"], timeout=30)
    streams = [hold(client) for _ in range(3)]  # the tier would allow 2
    assert "at most 3 at once" in refusal(client).message

    # Back to the tier's bound (2): three in flight, no room until two have ended.
    cleared = admin.patch(f"/keys/{created['id']}", json={"max_concurrent": None})
    assert cleared.status_code == 200 and cleared.json()["max_concurrent"] is None
    assert "at most 2 at once" in refusal(client).message
    streams.pop().close()
    streams.pop().close()
    streams.append(admitted_within(client))

    result = invoke(gateway.app, "keys", "set-limits", str(created["id"]), "--max-concurrent", "5")
    assert result.exit_code == 0 and "concurrent 5" in result.output
    listed = invoke(gateway.app, "keys", "list").output
    assert "5 concurrent" in listed
    streams += [hold(client) for _ in range(3)]
    assert "at most 5 at once" in refusal(client).message
    assert admin.get(f"/keys/{created['id']}").json()["max_concurrent"] == 5

    result = invoke(gateway.app, "keys", "set-limits", str(created["id"]), "--clear")
    assert result.exit_code == 0 and "concurrent from tier" in result.output
    assert keys.find_key(created["key"]).max_concurrent is None
    assert "at most 2 at once" in refusal(client).message
    for stream in streams:
        stream.close()

    # Mistakes: a 400 naming the field, or the CLI's usage error; nothing changes.
    for value in (0, -1, 1.5, "2", True, 2**31, [2]):
        response = admin.patch(f"/keys/{created['id']}", json={"max_concurrent": value})
        assert response.status_code == 400, value
        assert response.json()["error"]["param"] == "max_concurrent"
    bad = invoke(gateway.app, "keys", "set-limits", "1", "--max-concurrent", "0")
    assert bad.exit_code == 2 and "--max-concurrent" in bad.output
    assert keys.find_key(created["key"]).max_concurrent is None


def test_the_dashboard_sets_and_clears_the_bound(
    start_gateway: Callable[..., Gateway], bounded: dict[str, Any], pages: Any
) -> None:
    gateway = admin_gateway(start_gateway, bounded)[0]
    key = gateway.create_key("free", name="Initech")
    row = keys.find_key(key)
    client = gateway.client(key, timeout=30)
    page = pages.open()
    sign_in(page, gateway)
    page.goto(f"{gateway.url}/dashboard/keys/{row.id}")
    assert field(page, "max_concurrent") == "the tier's (2 at once)"

    page.fill("#max_concurrent", "1")
    page.click("text=Set bound")
    assert "at most 1 at once" in page.inner_text("p.notice")
    assert field(page, "max_concurrent") == "1 at once"
    stream = hold(client)
    assert "at most 1 at once" in refusal(client).message
    page.reload()
    assert field(page, "limits.concurrency.in_flight").startswith("1")
    screenshot(page, "dashboard-key-concurrency")

    page.fill("#max_concurrent", "")
    page.click("text=Set bound")
    assert field(page, "max_concurrent") == "the tier's (2 at once)"
    hold(client).close()  # the second slot of the tier's two
    stream.close()

    for form in ({"max_concurrent": "1"}, {"max_concurrent": "1", "csrf": "forged"}):
        response = page.request.post(
            f"{gateway.url}/dashboard/keys/{row.id}/concurrency", form=form, max_redirects=0
        )
        assert response.status == 403
    assert keys.find_key(key).max_concurrent is None


LEASE = 1.0  # seconds; renewed every third of it


@pytest.fixture
def shared_redis(bounded: dict[str, Any], redis_url: str) -> Iterator[redis.Redis]:
    """The test's Redis database as the limits' storage, with 1 s concurrency leases."""
    bounded["ratelimit"] = {"storage_uri": redis_url, "concurrency_lease_seconds": LEASE}
    client = redis_client(redis_url)
    yield client
    client.close()


def slots(store: redis.Redis, key: str) -> int:
    return int(store.zcard(f"LIMITS:concurrency:key:{keys.find_key(key).id}"))


def test_the_bound_holds_exactly_across_workers_and_instances(
    start_gunicorn: Callable[..., Gunicorn],
    bounded: dict[str, Any],
    ledger: None,
    shared_redis: redis.Redis,
) -> None:
    bounded["tiers"]["hobby"]["max_concurrent"] = 3
    env = {"WEB_CONCURRENCY": "2", "KEYMEAI_WORKER_CLASS": "gthread", "GUNICORN_THREADS": "16"}
    servers = [start_gunicorn(bounded, env, wait=False), start_gunicorn(bounded, wait=False)]
    urls = [server.ready().url for server in servers]  # 4 processes
    key = keys.create_key("shared", "hobby")[1]
    attempts = 12
    start = Barrier(attempts)

    def attempt(n: int) -> Stream[Any] | None:
        client = sdk(urls[n % 2], key, timeout=30)
        start.wait(timeout=30)
        try:
            return hold(client)
        except openai.RateLimitError:
            return None

    for _ in range(3):
        with ThreadPoolExecutor(attempts) as pool:
            held = [s for s in pool.map(attempt, range(attempts)) if s is not None]
        assert len(held) == 3
        assert slots(shared_redis, key) == 3
        for stream in held:
            stream.close()
        assert wait_until(lambda: slots(shared_redis, key) == 0)

    # One request after another, each on a new connection to either instance: never refused.
    one = keys.create_key("one at a time", "free")[1]
    keys.update_key(keys.find_key(one), max_concurrent=1)
    for n in range(20):
        with sdk(urls[n % 2], one) as client:
            if n % 2:
                client.chat.completions.create(model=MODEL, messages=HI)
            else:
                assert len(list(hold(client, words=3, interval=0))) >= 1


def test_leases_are_renewed_and_a_killed_workers_slots_lapse(
    start_gunicorn: Callable[..., Gunicorn],
    bounded: dict[str, Any],
    ledger: None,
    shared_redis: redis.Redis,
) -> None:
    doomed = start_gunicorn(bounded, {"WEB_CONCURRENCY": "1"}, wait=False)
    survivor = start_gunicorn(bounded)
    doomed.ready()
    key = keys.create_key("crash", "free")[1]
    with sdk(doomed.url, key, timeout=30) as there, sdk(survivor.url, key) as here:
        held = [hold(there), hold(there)]
        time.sleep(2.5 * LEASE)  # over two leases: renewed, still held
        assert "at most 2 at once" in refusal(here).message

        assert doomed.process is not None
        (worker,) = worker_pids(doomed.process.pid)
        os.kill(worker, signal.SIGKILL)
        assert slots(shared_redis, key) == 2  # nobody gave them back
        refusal(here)
        assert wait_until(lambda: slots(shared_redis, key) == 0, timeout=10)
        admitted_within(here).close()
        for stream in held:
            stream.close()


def test_unreachable_redis_allow_counts_in_memory(
    start_gateway: Callable[..., Gateway], bounded: dict[str, Any]
) -> None:
    bounded["ratelimit"] = {"storage_uri": f"redis://127.0.0.1:{free_port()}/1"}
    gateway = start_gateway(bounded)
    client = gateway.client(gateway.create_key("free"), timeout=30)
    streams = [hold(client), hold(client)]
    assert "at most 2 at once" in refusal(client).message
    streams.pop().close()
    streams.append(admitted_within(client))
    for stream in streams:
        stream.close()


def test_two_storage_round_trips_per_bounded_request(
    start_gateway: Callable[..., Gateway], bounded: dict[str, Any], redis_server: RedisServer
) -> None:
    """One script call takes the slot, one ZREM gives it back; nothing else per request
    (leases are renewed only for requests running longer than a third of the lease)."""
    bounded["ratelimit"] = {"storage_uri": redis_server.url}
    gateway = start_gateway(bounded)
    client = gateway.client(gateway.create_key("free"))
    client.chat.completions.create(model=MODEL, messages=HI)  # loads the scripts
    redis_server.client().config_resetstat()
    for _ in range(10):
        client.chat.completions.create(model=MODEL, messages=HI)
    calls = redis_server.commands()
    for own in ("hello", "config|resetstat", "info"):  # the test's own client
        calls.pop(own, None)
    inside = {"incrby", "pttl", "time", "zremrangebyscore", "zcard", "zadd", "pexpire"}
    assert {name: n for name, n in calls.items() if name not in inside} == {
        "evalsha": 20,
        "zrem": 10,
    }
