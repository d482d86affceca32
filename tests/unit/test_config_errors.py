"""Configuration mistakes (keymeai.config, keymeai.catalogue, keymeai.tables): each one is a
single ConfigError whose message starts with the dotted key at fault. The shipped file and
start-up through gunicorn are tests/test_config.py's."""

from __future__ import annotations

import math
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from keymeai.config import ConfigError
from keymeai.tables import Section
from tests.unit.build import ENV, config, config_data

Edit = Callable[[dict[str, Any]], Any]


def models(d: dict[str, Any]) -> dict[str, Any]:
    return d["models"]  # type: ignore[no-any-return]


def upstream(d: dict[str, Any]) -> dict[str, Any]:
    return d["models"]["chat"]["upstreams"][0]  # type: ignore[no-any-return]


# (edit, the start of the message)
MISTAKES: dict[str, tuple[Edit, str]] = {
    "root not a table": (lambda d: d.update(tiers=5), "tiers: expected a table"),
    "body limit zero": (
        lambda d: d.update(gateway={"max_request_bytes": 0}),
        "gateway.max_request_bytes: must be at least 1",
    ),
    "bool for an integer": (
        lambda d: d.update(gateway={"max_request_bytes": True}),
        "gateway.max_request_bytes: expected an integer",
    ),
    "float for an integer": (
        lambda d: d.update(quota={"default_completion_tokens": 10.5}),
        "quota.default_completion_tokens: expected an integer",
    ),
    "negative proxies": (
        lambda d: d.update(gateway={"trusted_proxies": -1}),
        "gateway.trusted_proxies: must be at least 0",
    ),
    "keepalive zero": (
        lambda d: d.update(gateway={"stream_keepalive_seconds": 0}),
        "gateway.stream_keepalive_seconds: must be greater than 0",
    ),
    "key cache negative": (
        lambda d: d.update(gateway={"key_cache_seconds": -1}),
        "gateway.key_cache_seconds: must be greater than -1",
    ),
    "database url not a string": (
        lambda d: d.update(database={"url": 5}),
        "database.url: expected a string",
    ),
    "tls_verify not a bool": (
        lambda d: d.update(ratelimit={"tls_verify": "yes"}),
        "ratelimit.tls_verify: expected true or false",
    ),
    "threshold zero": (
        lambda d: d.update(routing={"failure_threshold": 0}),
        "routing.failure_threshold: must be at least 1",
    ),
    "cooldown negative": (
        lambda d: d.update(routing={"cooldown_seconds": -5}),
        "routing.cooldown_seconds: must be greater than 0",
    ),
    "journal dir not a string": (
        lambda d: d.update(metering={"journal_dir": 1}),
        "metering.journal_dir: expected a string",
    ),
    "retention zero": (
        lambda d: d.update(responses={"retention_days": 0}),
        "responses.retention_days: must be at least 1",
    ),
    "no tiers": (lambda d: d.update(tiers={}), "tiers: at least one tier is required"),
    "tier not a table": (lambda d: d.update(tiers={"free": 1}), "tiers.free: expected a table"),
    "tier without requests": (
        lambda d: d["tiers"]["free"].pop("requests"),
        "tiers.free.requests: missing (required)",
    ),
    "requests a string": (
        lambda d: d["tiers"]["free"].update(requests="100 per day"),
        "tiers.free.requests: expected an array",
    ),
    "requests of numbers": (
        lambda d: d["tiers"]["free"].update(requests=[100]),
        "tiers.free.requests: expected an array of limit strings",
    ),
    "concurrency zero": (
        lambda d: d["tiers"]["free"].update(max_concurrent=0),
        "tiers.free.max_concurrent: must be at least 1",
    ),
    "api_key_env not a name": (
        lambda d: d["providers"]["first"].update(api_key_env="FIRST-KEY"),
        "providers.first.api_key_env: expected an environment variable name",
    ),
    "base_url not http": (
        lambda d: d["providers"]["first"].update(base_url="ftp://first.example"),
        "providers.first.base_url: expected an http(s) URL",
    ),
    "pool zero": (
        lambda d: d["providers"]["first"].update(max_connections=0),
        "providers.first.max_connections: must be at least 1",
    ),
    "upstreams not an array": (
        lambda d: models(d)["chat"].update(upstreams="first"),
        "models.chat.upstreams: expected an array",
    ),
    "upstream not a table": (
        lambda d: models(d)["chat"].update(upstreams=["first"]),
        "models.chat.upstreams[0]: expected a table",
    ),
    "upstream without model": (
        lambda d: upstream(d).pop("model"),
        "models.chat.upstreams[0].model: missing (required)",
    ),
    "upstream unknown key": (
        lambda d: upstream(d).update(weight=2),
        "models.chat.upstreams[0].weight: unknown key",
    ),
    "kind unknown": (
        lambda d: models(d)["chat"].update(kind="image"),
        'models.chat.kind: must be "chat" or "embedding"',
    ),
    "created negative": (
        lambda d: models(d)["chat"].update(created=-1),
        "models.chat.created: must be at least 0",
    ),
    "price not a table": (
        lambda d: models(d)["chat"].update(price=1),
        "models.chat.price: expected a table",
    ),
    "price a string": (
        lambda d: models(d)["chat"]["price"].update(output="2"),
        "models.chat.price.output: expected an integer or a number",
    ),
    "embedding priced for output": (
        lambda d: models(d)["embed"]["price"].update(output=1),
        "models.embed.price.output: an embedding model's price has `input` only",
    ),
    "alias is another id": (
        lambda d: models(d)["chat"].update(aliases=["solo"]),
        "models.chat.aliases[0]: 'solo' is already the id of the model 'solo'",
    ),
    "alias taken twice": (
        lambda d: models(d)["solo"].update(aliases=["chat-latest"]),
        "models.solo.aliases[0]: 'chat-latest' is already an alias of the model 'chat'",
    ),
    "alias its own id": (
        lambda d: models(d)["solo"].update(aliases=["solo"]),
        "models.solo.aliases[0]: 'solo' is already the id of the model 'solo'",
    ),
    "alias not a string": (
        lambda d: models(d)["chat"].update(aliases=[5]),
        "models.chat.aliases[0]: expected a string",
    ),
    "alias not an id": (
        lambda d: models(d)["chat"].update(aliases=["chat latest"]),
        "models.chat.aliases[0]: a model id is",
    ),
    "signup mode": (
        lambda d: d.update(signup={"mode": "closed"}),
        'signup.mode: must be "off", "invite" or "open"',
    ),
    "signup tier": (
        lambda d: d.update(signup={"mode": "open", "tier": "gold"}),
        "signup.tier: unknown tier 'gold' (configured: free)",
    ),
    "signup limit": (
        lambda d: d.update(signup={"per_address": "3 a day"}),
        "signup.per_address: invalid limit '3 a day'",
    ),
    "signup domains": (
        lambda d: d.update(signup={"email_domains": ["ops@example.com"]}),
        "signup.email_domains: expected domain names",
    ),
    "signup mail without smtp": (
        lambda d: d.update(signup={"mode": "invite", "email_domains": ["example.com"]}),
        "signup.email_domains: set SMTP_URL",
    ),
}


@pytest.mark.parametrize(("edit", "message"), MISTAKES.values(), ids=MISTAKES)
def test_a_mistake_is_one_error_naming_its_key(edit: Edit, message: str) -> None:
    data = config_data()
    edit(data)
    with pytest.raises(ConfigError) as caught:
        config(data)
    assert str(caught.value).startswith(message), str(caught.value)


NON_FINITE: dict[str, Edit] = {
    "routing.cooldown_seconds": lambda d: d["routing"].update(cooldown_seconds=math.nan),
    "gateway.key_cache_seconds": lambda d: d.update(gateway={"key_cache_seconds": math.nan}),
    "providers.first.read_timeout": lambda d: d["providers"]["first"].update(read_timeout=math.inf),
    "providers.first.connect_timeout": lambda d: d["providers"]["first"].update(
        connect_timeout=10**400  # TOML integers are unbounded: too large for a float
    ),
    "models.chat.price.input": lambda d: models(d)["chat"]["price"].update(input=math.nan),
    "models.chat.price.output": lambda d: models(d)["chat"]["price"].update(output=math.inf),
}


@pytest.mark.parametrize(("key", "edit"), NON_FINITE.items(), ids=NON_FINITE)
def test_toml_nan_and_inf_are_refused_naming_the_key(key: str, edit: Edit) -> None:
    """`nan` and `inf` are TOML floats: a nan cooldown never ends, an infinite price
    fails every request it bills, a nan price was a decimal error at start-up."""
    data = config_data()
    edit(data)
    with pytest.raises(ConfigError) as caught:
        config(data)
    assert str(caught.value) == f"{key}: must be a finite number"


def test_unknown_keys_are_named_all_at_once_in_order() -> None:
    data = config_data()
    data["providers"]["first"].update(zeta=1, alpha=2)
    with pytest.raises(ConfigError, match=r"^providers\.first\.alpha, providers\.first\.zeta: "):
        config(data)


def test_a_section_reads_typed_keys_and_refuses_the_rest() -> None:
    section = Section({"a": 1, "b": True, "c": 2.5, "d": 0}, "s")
    assert section.integer("a", 0) == 1
    with pytest.raises(ConfigError, match=r"^s\.b: expected an integer$"):
        section.integer("b", 0)
    assert section.number("c", 1.0) == 2.5
    assert section.optional_integer("e") is None
    assert section.take("f", str, "default") == "default"
    with pytest.raises(ConfigError, match=r"^s\.d: unknown key$"):
        section.done()


def test_what_a_valid_config_leaves_out_gets_its_default() -> None:
    data = config_data()
    data["providers"]["first"]["base_url"] = "https://first.example/v1/"
    built = config(data)
    chat = built.models["chat"]
    assert built.providers["first"].base_url == "https://first.example/v1"
    assert built.providers["first"].api_key == ENV["FIRST_KEY"]
    assert (chat.owned_by, chat.kind, chat.created) == ("keymeai", "chat", 0)
    assert built.models["solo"].price.cached_input == Decimal(1)  # the input price
    assert built.models["embed"].price.output == 0
    assert built.model_names["chat-latest"] is chat
    assert built.database_url == "sqlite:///keymeai.db"
    assert (built.signup.mode, built.admin_token) == ("off", None)


def test_the_environment_wins_and_e_mail_domains_are_normalised() -> None:
    data = config_data()
    data["ratelimit"] = {"storage_uri": "memory://"}
    data["signup"] = {"mode": "invite", "email_domains": [" .Example.COM "]}
    env = {**ENV, "REDIS_URL": "redis://r:6379/0", "SMTP_URL": "smtp://u:p@mail:25"}
    built = config(data, env)
    assert built.ratelimit.storage_uri == "redis://r:6379/0"
    assert built.signup.email_domains == ("example.com",)
    env["RATELIMIT_STORAGE_URI"] = "rediss://other:6380/1"
    assert config(data, env).ratelimit.storage_uri == "rediss://other:6380/1"


def test_a_zero_key_cache_is_allowed() -> None:
    data = config_data()
    data["gateway"] = {"key_cache_seconds": 0}
    assert config(data).gateway.key_cache_seconds == 0
