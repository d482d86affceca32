"""A small valid configuration to edit: the unit tests' only fixture data.

Two providers and three models: `chat` served by `first` then `second` (failover order),
`solo` by `first` alone, `embed` an embedding model. Prices are round numbers so that
costs can be worked out by hand.
"""

from __future__ import annotations

from typing import Any

from keymeai.api.validation import ChatRequest
from keymeai.config import Config, parse_config
from keymeai.ledger.keys import KeyInfo
from keymeai.ledger.metering import Meter

ENV = {"FIRST_KEY": "sk-first-0123456789", "SECOND_KEY": "sk-second-0123456789"}


def config_data() -> dict[str, Any]:
    """A fresh copy of the configuration as parsed TOML: edit it, then `parse_config`."""
    return {
        "routing": {"failure_threshold": 2, "cooldown_seconds": 30},
        "tiers": {"free": {"requests": ["100 per day"]}},
        "providers": {
            "first": {"base_url": "https://first.example/v1", "api_key_env": "FIRST_KEY"},
            "second": {"base_url": "https://second.example/v1", "api_key_env": "SECOND_KEY"},
        },
        "models": {
            "chat": {
                "upstreams": [
                    {"provider": "first", "model": "first-chat"},
                    {"provider": "second", "model": "second-chat"},
                ],
                "price": {"input": 1, "cached_input": 0.25, "output": 2},
                "aliases": ["chat-latest"],
            },
            "solo": {
                "upstreams": [{"provider": "first", "model": "first-solo"}],
                "price": {"input": 1, "output": 2},
            },
            "embed": {
                "kind": "embedding",
                "upstreams": [{"provider": "second", "model": "second-embed"}],
                "price": {"input": 0.5},
            },
        },
    }


def config(data: dict[str, Any] | None = None, environ: dict[str, str] | None = None) -> Config:
    return parse_config(
        config_data() if data is None else data, ENV if environ is None else environ
    )


KEY = KeyInfo(
    id=1,
    name="alice",
    prefix="sk-unit",
    tier="free",
    request_limits=None,
    tokens_per_month=None,
    allowed_models=None,
    spend_cap_units=None,
    expires_at=None,
    revoked=False,
)


def meter(chat: ChatRequest) -> Meter:
    """A request's meter; nothing touches the ledger unless `finish` is called."""
    return Meter(KEY, chat, request_id="rq-unit")
