"""The per-upstream circuit breaker (keymeai.api.upstream.Breaker), on explicit times."""

from __future__ import annotations

from keymeai.api.upstream import Breaker

THRESHOLD, COOLDOWN, PROBE_TIMEOUT = 3, 30.0, 60.0


def breaker() -> Breaker:
    return Breaker(THRESHOLD, COOLDOWN, probe_timeout=PROBE_TIMEOUT)


def opened_at(now: float) -> Breaker:
    """A breaker whose threshold-th failure came at `now`."""
    b = breaker()
    for _ in range(THRESHOLD):
        b.failed(now)
    return b


def test_closed_until_the_threshold_of_consecutive_failures() -> None:
    b = breaker()
    for _ in range(THRESHOLD - 1):
        b.failed(0)
        assert b.allow(0)
    b.failed(0)
    assert not b.allow(0)


def test_a_success_between_failures_starts_the_count_again() -> None:
    b = breaker()
    for _ in range(THRESHOLD - 1):
        b.failed(0)
    b.succeeded()
    for _ in range(THRESHOLD - 1):
        b.failed(0)
    assert b.allow(0)


def test_open_for_the_cooldown_then_one_probe() -> None:
    b = opened_at(100)
    assert not b.allow(100 + COOLDOWN - 0.001)
    assert b.allow(100 + COOLDOWN)  # the probe
    for later in (100 + COOLDOWN, 100 + COOLDOWN + 1, 100 + COOLDOWN + PROBE_TIMEOUT - 0.001):
        assert not b.allow(later), later  # the others skip it while the probe is out


def test_a_probe_that_never_reports_lets_another_through_after_probe_timeout() -> None:
    b = opened_at(0)
    assert b.allow(COOLDOWN)
    assert not b.allow(COOLDOWN + PROBE_TIMEOUT - 0.001)
    assert b.allow(COOLDOWN + PROBE_TIMEOUT)
    assert not b.allow(COOLDOWN + PROBE_TIMEOUT)


def test_a_failed_probe_opens_it_for_a_full_cooldown_from_the_failure() -> None:
    b = opened_at(0)
    assert b.allow(COOLDOWN)
    b.failed(COOLDOWN + 5)  # the probe took 5 s to fail
    assert not b.allow(2 * COOLDOWN + 5 - 0.001)
    assert b.allow(2 * COOLDOWN + 5)


def test_a_successful_probe_closes_it() -> None:
    b = opened_at(0)
    assert b.allow(COOLDOWN)
    b.succeeded()
    assert b.allow(COOLDOWN) and b.allow(COOLDOWN)  # everyone, at once
    assert (b.failures, b.open_until) == (0, 0.0)
    for _ in range(THRESHOLD - 1):
        b.failed(COOLDOWN)
    assert b.allow(COOLDOWN)  # a whole threshold again before it opens
