"""Models with several upstreams in the fake's fault modes, for the routing, breaker and
failover tests (the `route` fixture), and a clock those tests move by hand."""

from __future__ import annotations

import time
from typing import Any

import openai

from tests.helpers.config import add_model, add_provider

ROUTED_MODEL = "resilient"  # the model `add_route` tests give their fault-mode upstreams
FAST_TIMEOUTS = {"connect_timeout": 0.5, "read_timeout": 0.5}
# A wait that FAST_TIMEOUTS (or no timeout at all) bounds ends well within this, even on a
# busy machine; one they fail to bound lasts the client's 15 s (a hanging fake: 60 s).
SOON = 6.0


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

    def __init__(
        self, client: openai.OpenAI, providers: list[str], key: str, clock: ManualClock
    ) -> None:
        self.client = client
        self.providers = providers
        self.key = key
        self.clock = clock


def timed_chat(client: openai.OpenAI, **extra: Any) -> tuple[Any, float]:
    """A completion of the routed model, or the SDK's exception; and the seconds it took."""
    started = time.monotonic()
    try:
        result: Any = client.chat.completions.create(
            model=ROUTED_MODEL, messages=[{"role": "user", "content": "hello there"}], **extra
        )
    except openai.APIError as exc:
        result = exc
    return result, time.monotonic() - started
