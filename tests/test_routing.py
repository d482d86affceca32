"""Cooldowns (the per-upstream circuit breaker) and the keep-alive pools to the providers.

A broken upstream must stop costing clients time once it has failed
`routing.failure_threshold` times in a row: it is skipped for `routing.cooldown_seconds`,
then one request probes it. When every upstream of a model cools down, the one whose
cooldown ends first is still tried. Connections to a provider are pooled and reused.
The breakers run on the `route` fixture's manual clock: a cooldown ends when the test
moves it on, and an upstream skipped shows in the attempt counts, not in a stopwatch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest

from tests.helpers.errors import assert_no_secrets, log_text
from tests.helpers.fake_upstream import FakeUpstream
from tests.helpers.ledger import usage_records
from tests.helpers.routing import Routed
from tests.helpers.routing import timed_chat as chat

COOLDOWN = 30.0  # on the manual clock
# The hanging primary's read timeout: what every request would cost without the breaker.
HANG = 1.0


def served_by(routed: Routed, index: int, attempts: int) -> None:
    """The last usage record says upstream `index` served, after `attempts` tries."""
    record = usage_records()[-1]
    assert (record.provider, record.attempts, record.outcome) == (
        routed.providers[index],
        attempts,
        "ok",
    )


def test_failing_upstream_is_skipped_during_cooldown_then_probed_once(
    route: Callable[..., Routed], upstream: FakeUpstream
) -> None:
    upstream.switches["primary"] = "hang"
    routed = route(
        "sw-primary",
        "ark/ok",
        read_timeout=HANG,
        routing={"failure_threshold": 2, "cooldown_seconds": COOLDOWN},
    )
    primary = lambda: upstream.count(mode="sw-primary")  # noqa: E731
    for n in (1, 2):  # each costs the client a read timeout until the breaker opens
        completion, elapsed = chat(routed.client)
        assert completion.choices[0].message.content == "Echo: hello there"
        assert elapsed >= HANG and primary() == n
        served_by(routed, 1, attempts=2)

    for _ in range(3):  # open: the primary costs nothing any more
        completion, _ = chat(routed.client)
        assert completion.choices
        served_by(routed, 1, attempts=1)
    routed.clock.advance(COOLDOWN - 5)  # not yet over
    chat(routed.client)
    served_by(routed, 1, attempts=1)
    assert primary() == 2

    routed.clock.advance(5)
    _, elapsed = chat(routed.client)  # the probe: still hanging
    assert primary() == 3 and elapsed >= HANG
    served_by(routed, 1, attempts=2)
    chat(routed.client)  # open again at once
    assert primary() == 3
    served_by(routed, 1, attempts=1)

    upstream.switches["primary"] = "ok"  # the provider recovers
    routed.clock.advance(COOLDOWN)
    for n in (4, 5):  # the probe succeeds: the primary serves again, and stays in use
        completion, _ = chat(routed.client)
        assert completion.choices[0].message.content == "Echo: hello there"
        assert primary() == n
        served_by(routed, 0, attempts=1)


def test_only_one_request_probes_after_the_cooldown(
    route: Callable[..., Routed], upstream: FakeUpstream
) -> None:
    upstream.switches["primary"] = "hang"
    routed = route(
        "sw-primary",
        "ok",
        read_timeout=HANG,
        routing={"failure_threshold": 1, "cooldown_seconds": COOLDOWN},
    )
    chat(routed.client)
    assert upstream.count(mode="sw-primary") == 1
    routed.clock.advance(COOLDOWN)
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: chat(routed.client), range(6)))
    assert all(not isinstance(result, Exception) for result, _ in results)
    assert upstream.count(mode="sw-primary") == 2  # one probe, not six
    # Only the prober tried the primary (and waited for it): five went straight on.
    attempts = sorted(r.attempts for r in usage_records()[1:])
    assert attempts == [1, 1, 1, 1, 1, 2]
    assert max(elapsed for _, elapsed in results) >= HANG


def test_a_probe_in_flight_holds_off_further_probes(
    route: Callable[..., Routed], upstream: FakeUpstream
) -> None:
    """A probe outlasting the cooldown does not let a second (third...) one through."""
    upstream.switches["primary"] = "hang"
    routed = route(
        "sw-primary",
        "ok",
        read_timeout=HANG,
        routing={"failure_threshold": 1, "cooldown_seconds": 0.2},
    )
    chat(routed.client)
    routed.clock.advance(0.25)
    with ThreadPoolExecutor(1) as pool:
        probe = pool.submit(chat, routed.client)
        deadline = time.monotonic() + 5
        while upstream.count(mode="sw-primary") < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert upstream.count(mode="sw-primary") == 2
        routed.clock.advance(0.3)  # the cooldown is over again, the probe still hangs
        completion, _ = chat(routed.client)
        assert completion.choices
        assert not probe.done(), "the probe ended: the test proves nothing"
        assert upstream.count(mode="sw-primary") == 2
        served_by(routed, 1, attempts=1)
        assert probe.result()[1] >= HANG


def test_cooling_down_everywhere_still_tries_an_upstream_before_503(
    route: Callable[..., Routed], upstream: FakeUpstream
) -> None:
    routed = route("503", routing={"failure_threshold": 1, "cooldown_seconds": 30})
    first, _ = chat(routed.client)
    assert isinstance(first, openai.InternalServerError) and first.status_code == 503
    second, _ = chat(routed.client)
    assert isinstance(second, openai.InternalServerError) and second.status_code == 503
    assert second.code == "upstream_unavailable"
    assert second.response.headers["Retry-After"] == "30"  # the cooldown, renewed
    assert upstream.count() == 2  # tried, though cooling down: the 503 is the upstream's
    assert [r.attempts for r in usage_records()] == [1, 1]


def test_a_models_only_upstream_serves_again_at_once_after_streams_died(
    route: Callable[..., Routed], upstream: FakeUpstream
) -> None:
    """Three dropped streams open the breaker; the upstream recovered: no 503 for it."""
    upstream.switches["only"] = "die"
    routed = route("sw-only", routing={"failure_threshold": 3, "cooldown_seconds": 30})
    for _ in range(3):
        with pytest.raises(openai.APIError):
            list(routed.client.chat.completions.create(**stream_request(words=8)))
    upstream.switches["only"] = "ok"
    for n in (4, 5):
        chunks = list(routed.client.chat.completions.create(**stream_request(words=8)))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
            " ".join(f"w{i}" for i in range(1, 9))
        )
        assert upstream.count(mode="sw-only") == n
        served_by(routed, 0, attempts=1)
    completion, _ = chat(routed.client)  # the success closed the breaker
    assert completion.choices
    assert upstream.count(mode="sw-only") == 6


def test_when_all_upstreams_cool_down_the_one_whose_cooldown_ends_first_is_tried(
    route: Callable[..., Routed], upstream: FakeUpstream
) -> None:
    upstream.switches.update(first="503", second="503")
    routed = route(
        "sw-first", "sw-second", routing={"failure_threshold": 1, "cooldown_seconds": 30}
    )
    chat(routed.client)  # both fail: the first's cooldown ends first
    assert (upstream.count(mode="sw-first"), upstream.count(mode="sw-second")) == (1, 1)
    chat(routed.client)  # so the first is tried (and fails again: its cooldown now ends last)
    assert (upstream.count(mode="sw-first"), upstream.count(mode="sw-second")) == (2, 1)
    upstream.switches.update(first="ok", second="ok")
    completion, _ = chat(routed.client)  # the second's cooldown ends first now
    assert completion.choices
    assert (upstream.count(mode="sw-first"), upstream.count(mode="sw-second")) == (2, 2)
    served_by(routed, 1, attempts=1)


def test_client_errors_do_not_count_as_upstream_failures(
    route: Callable[..., Routed], upstream: FakeUpstream
) -> None:
    upstream.switches["primary"] = "503"
    routed = route(
        "sw-primary", "ok", routing={"failure_threshold": 1, "cooldown_seconds": COOLDOWN}
    )
    chat(routed.client)  # opens the breaker
    routed.clock.advance(COOLDOWN)
    upstream.switches["primary"] = "400"
    for n in (2, 3, 4):  # the probe got an answer: the upstream is up, keep using it
        error, _ = chat(routed.client)
        assert isinstance(error, openai.BadRequestError)
        assert upstream.count(mode="sw-primary") == n
    upstream.switches["primary"] = "ok"
    chat(routed.client)
    served_by(routed, 0, attempts=1)


def test_mid_stream_deaths_open_the_breaker(
    route: Callable[..., Routed], upstream: FakeUpstream
) -> None:
    """An upstream that keeps dropping streams is as broken as one that refuses them."""
    upstream.switches["primary"] = "die"
    routed = route("sw-primary", "ok", routing={"failure_threshold": 2, "cooldown_seconds": 30})
    for _ in range(2):
        with pytest.raises(openai.APIError):
            list(routed.client.chat.completions.create(**stream_request(words=8)))
    chunks = list(routed.client.chat.completions.create(**stream_request(words=8)))
    assert chunks and upstream.count(mode="sw-primary") == 2
    served_by(routed, 1, attempts=1)


def stream_request(**knobs: Any) -> dict[str, Any]:
    return {
        "model": "resilient",
        "messages": [{"role": "user", "content": "hello there"}],
        "stream": True,
        "extra_body": {"fake": knobs},
    }


def test_sequential_requests_reuse_one_upstream_connection(
    route: Callable[..., Routed], upstream: FakeUpstream
) -> None:
    routed = route("ok")
    for _ in range(3):
        assert chat(routed.client)[0].choices
        assert list(routed.client.chat.completions.create(**stream_request(words=3)))
    routed.client.chat.completions.create(  # an answer with the client's usage chunk
        model="resilient",
        messages=[{"role": "user", "content": "x"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    assert len(upstream.requests) == 7
    assert len({r.client for r in upstream.requests}) == 1


def test_concurrent_requests_are_served_in_parallel(
    route: Callable[..., Routed],
    upstream: FakeUpstream,
    gateway_logs: pytest.LogCaptureFixture,
) -> None:
    """More concurrent requests than pooled connections: all served, nothing leaks."""
    routed = route("ok", max_connections=2)
    delay = {"extra_body": {"fake": {"first_delay": 0.3}}}
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: chat(routed.client, **delay), range(8)))
    assert all(r.choices[0].message.content == "Echo: hello there" for r, _ in results)
    # In parallel, not one after the other: one after the other would reuse a connection.
    assert len({r.client for r in upstream.requests}) > 2
    records = usage_records()
    assert len(records) == 8 and len({r.request_id for r in records}) == 8
    assert all(r.outcome == "ok" and not r.estimated for r in records)
    # The pool keeps two of the eight connections: the next request reuses one of them.
    chat(routed.client)
    assert upstream.requests[-1].client in {r.client for r in upstream.requests[:-1]}
    logs = log_text(gateway_logs)
    assert_no_secrets(logs, upstream.url, routed.key)
    assert "127.0.0.1" not in logs  # not even the provider's host
