"""The model catalogue: providers, the models they serve and what each costs.

`config` reads the `[providers]` and `[models]` tables through `parse_providers` and
`parse_models`; the request path looks models up by every name a request may give
(`model_names`) and prices them (`Price`, USD per 1M tokens).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from urllib.parse import urlsplit

from .tables import ConfigError, Section

PRICE_DECIMALS = 4  # prices are stored as integers of 1e-10 USD per token
# Model ids appear in URLs, reports and comma-separated allow-lists.
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
# What a model does: chat completions, or embeddings (whose price is `input` only).
KINDS = ("chat", "embedding")


@dataclass(frozen=True)
class Price:
    """USD per 1M tokens."""

    input: Decimal
    cached_input: Decimal
    output: Decimal


@dataclass(frozen=True)
class Upstream:
    provider: str
    model: str


@dataclass(frozen=True)
class Model:
    id: str
    owned_by: str
    created: int
    upstreams: tuple[Upstream, ...]
    price: Price
    kind: str = "chat"
    aliases: tuple[str, ...] = ()  # other ids that reach this model


@dataclass(frozen=True)
class Provider:
    name: str
    base_url: str
    api_key_env: str
    connect_timeout: float
    read_timeout: float
    max_connections: int
    api_key: str = field(repr=False, default="")


def model_names(models: Mapping[str, Model]) -> dict[str, Model]:
    """Ids and aliases to their models (`parse_models` checked that none collide)."""
    names = dict(models)
    names.update((alias, m) for m in models.values() for alias in m.aliases)
    return names


def parse_providers(section: Section, environ: Mapping[str, str]) -> dict[str, Provider]:
    providers = {}
    for name in list(section.data):
        p = section.section(name)
        base_url = p.take("base_url", str).rstrip("/")
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"{p.key('base_url')}: expected an http(s) URL")
        api_key_env = p.take("api_key_env", str)
        if not api_key_env.isidentifier():
            raise ConfigError(f"{p.key('api_key_env')}: expected an environment variable name")
        providers[name] = Provider(
            name=name,
            base_url=base_url,
            api_key_env=api_key_env,
            connect_timeout=p.number("connect_timeout", 5.0),
            read_timeout=p.number("read_timeout", 300.0),
            max_connections=p.integer("max_connections", 100),
            api_key=environ.get(api_key_env, ""),
        )
        p.done()
    return providers


def parse_models(section: Section, providers: Mapping[str, Provider]) -> dict[str, Model]:
    models = {}
    owners: dict[str, str] = {model_id: model_id for model_id in section.data}
    for model_id in list(section.data):
        _check_model_id(model_id, f"models.{model_id}")
        m = section.section(model_id)
        upstream_list = m.take("upstreams", list)
        if not upstream_list:
            raise ConfigError(f"{m.key('upstreams')}: at least one upstream is required")
        upstreams = []
        for i, raw in enumerate(upstream_list):
            u = Section(raw, f"{m.key('upstreams')}[{i}]")
            provider = u.take("provider", str)
            if provider not in providers:
                known = ", ".join(sorted(providers)) or "none"
                raise ConfigError(
                    f"{u.key('provider')}: unknown provider {provider!r} (known: {known})"
                )
            upstreams.append(Upstream(provider=provider, model=u.take("model", str)))
            u.done()
        kind = m.take("kind", str, "chat")
        if kind not in KINDS:
            raise ConfigError(f'{m.key("kind")}: must be "chat" or "embedding" (got {kind!r})')
        aliases = _parse_aliases(m, model_id, owners)
        price = m.section("price")
        models[model_id] = Model(
            id=model_id,
            owned_by=m.take("owned_by", str, "keymeai"),
            created=m.integer("created", 0, minimum=0),
            upstreams=tuple(upstreams),
            price=_parse_price(price, kind),
            kind=kind,
            aliases=aliases,
        )
        m.done()
    if not models:
        raise ConfigError("models: at least one model is required")
    return models


def _check_model_id(name: str, key: str) -> None:
    if not MODEL_ID.fullmatch(name):
        raise ConfigError(
            f"{key}: a model id is letters, digits and . _ : / - (at most 128 characters)"
        )


def _parse_aliases(m: Section, model_id: str, owners: dict[str, str]) -> tuple[str, ...]:
    """The model's other names; each must be free (no other model's id or alias), since
    a name must reach exactly one model. `owners` collects the names taken so far."""
    raw = m.take("aliases", list, [])
    key = m.key("aliases")
    aliases = []
    for i, alias in enumerate(raw):
        if not isinstance(alias, str):
            raise ConfigError(f"{key}[{i}]: expected a string")
        _check_model_id(alias, f"{key}[{i}]")
        owner = owners.get(alias)
        if owner is not None:
            what = "the id" if alias == owner else "an alias"
            raise ConfigError(
                f"{key}[{i}]: {alias!r} is already {what} of the model {owner!r}; "
                "a name must reach exactly one model"
            )
        owners[alias] = model_id
        aliases.append(alias)
    return tuple(aliases)


def _parse_price(p: Section, kind: str = "chat") -> Price:
    def amount(name: str, default: Decimal | None = None) -> Decimal:
        raw = p.take(name, (int, float), default if default is not None else ...)
        value = Decimal(str(raw))
        if not value.is_finite():  # TOML's nan and inf
            raise ConfigError(f"{p.key(name)}: must be a finite number")
        if value < 0:
            raise ConfigError(f"{p.key(name)}: must not be negative")
        exponent = value.normalize().as_tuple().exponent
        if isinstance(exponent, int) and -exponent > PRICE_DECIMALS:
            raise ConfigError(f"{p.key(name)}: at most {PRICE_DECIMALS} decimal places")
        return value

    input_price = amount("input")
    if kind == "embedding":
        extra = sorted(set(p.data) - {"input"})
        if extra:
            raise ConfigError(
                f"{p.key(extra[0])}: an embedding model's price has `input` only "
                "(embeddings bill prompt tokens alone)"
            )
        p.done()
        return Price(input=input_price, cached_input=input_price, output=Decimal(0))
    price = Price(
        input=input_price,
        cached_input=amount("cached_input", input_price),
        output=amount("output"),
    )
    p.done()
    return price
