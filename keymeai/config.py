"""Configuration: read the TOML file once, apply environment overrides, validate.

Everything the gateway needs at run time is parsed here into frozen dataclasses, so a
mistake in the file stops start-up with a message naming the bad key, instead of
surfacing later as a 500 on some request. The strict reading of each TOML table is
`tables.Section`'s; what the operator is told about the result is `diagnostics`'.
"""

from __future__ import annotations

import functools
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from limits import parse_many

from .tables import ConfigError, Section
from .tokens import IMAGE_TOKENS

MAX_IMAGE_TOKENS = 1_000_000  # far above any model's; keeps reservations within BIGINT

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "config.toml"
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


@dataclass(frozen=True)
class Tier:
    name: str
    requests: tuple[str, ...]
    tokens_per_month: int | None
    max_concurrent: int | None = None  # requests of one key in flight at once


@dataclass(frozen=True)
class GatewaySettings:
    max_request_bytes: int = 8 * 1024 * 1024
    key_cache_seconds: float = 2.0
    stream_keepalive_seconds: float = 10.0
    trusted_proxies: int = 0
    body_timeout_seconds: float = 30.0  # a request body must arrive within this
    stream_write_timeout_seconds: float = 60.0  # a stream client must accept bytes within this


@dataclass(frozen=True)
class RateLimitSettings:
    storage_uri: str = "memory://"
    on_storage_error: str = "allow"
    tls_verify: bool = True
    concurrency_lease_seconds: float = 30.0  # a killed process's slots lapse after this


@dataclass(frozen=True)
class QuotaSettings:
    default_completion_tokens: int = 4096
    reservation_seconds: int = 900
    image_tokens: int = IMAGE_TOKENS  # the prompt allowance of one image part


@dataclass(frozen=True)
class MeteringSettings:
    journal_dir: str = ""  # "": keymeai-journal/ next to a SQLite ledger, else in the cwd


@dataclass(frozen=True)
class ResponsesSettings:
    retention_days: int = 30  # stored Responses API answers are pruned after this


@dataclass(frozen=True)
class RoutingSettings:
    failure_threshold: int = 3
    cooldown_seconds: float = 30.0


@dataclass(frozen=True)
class SignupSettings:
    """Self-service sign-up at /signup (keymeai.signup)."""

    mode: str = "off"  # "off" | "invite" | "open"
    tier: str = "free"  # the tier of keys made in open mode
    per_address: str = "3 per day"  # open-mode keys per client address
    per_day: int = 100  # open-mode keys per day in all
    email_domains: tuple[str, ...] = ()  # non-empty: ask for an e-mail, mail the key
    smtp_url: str = field(repr=False, default="")  # SMTP_URL


SIGNUP_MODES = ("off", "invite", "open")


@dataclass(frozen=True)
class Config:
    database_url: str
    gateway: GatewaySettings
    ratelimit: RateLimitSettings
    quota: QuotaSettings
    routing: RoutingSettings
    tiers: Mapping[str, Tier]
    providers: Mapping[str, Provider]
    models: Mapping[str, Model]
    admin_token: str | None = field(repr=False, default=None)
    metering: MeteringSettings = MeteringSettings()
    responses: ResponsesSettings = ResponsesSettings()
    signup: SignupSettings = SignupSettings()
    source: str = "<mapping>"

    @functools.cached_property
    def model_names(self) -> Mapping[str, Model]:
        """Every name a request may give a model: its id and its aliases."""
        return model_names(self.models)


def model_names(models: Mapping[str, Model]) -> dict[str, Model]:
    """Ids and aliases to their models (`_parse_models` checked that none collide)."""
    names = dict(models)
    names.update((alias, m) for m in models.values() for alias in m.aliases)
    return names


def load_config(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Read the config file (KEYMEAI_CONFIG, else ./config.toml) and the environment."""
    environ = os.environ if environ is None else environ
    path = Path(path or environ.get("KEYMEAI_CONFIG") or DEFAULT_PATH)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    try:
        return parse_config(data, environ, source=str(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse_config(
    data: Mapping[str, Any], environ: Mapping[str, str], source: str = "<mapping>"
) -> Config:
    """Validate a parsed TOML document and build the typed Config."""
    root = Section(data, "")

    gw = root.section("gateway")
    gateway = GatewaySettings(
        max_request_bytes=gw.integer("max_request_bytes", 8 * 1024 * 1024),
        key_cache_seconds=gw.number("key_cache_seconds", 2.0, minimum=-1),
        stream_keepalive_seconds=gw.number("stream_keepalive_seconds", 10.0),
        trusted_proxies=gw.integer("trusted_proxies", 0, minimum=0),
        body_timeout_seconds=gw.number("body_timeout_seconds", 30.0),
        stream_write_timeout_seconds=gw.number("stream_write_timeout_seconds", 60.0),
    )
    gw.done()
    if gateway.key_cache_seconds > 5:
        raise ConfigError("gateway.key_cache_seconds: at most 5 (revocation must apply within 5 s)")

    db = root.section("database")
    file_url = db.take("url", str, "sqlite:///keymeai.db")  # taken (and checked) either way
    database_url = environ.get("DATABASE_URL") or file_url
    db.done()
    _check_database_url(database_url)

    rl = root.section("ratelimit")
    storage_uri = (
        environ.get("RATELIMIT_STORAGE_URI")
        or environ.get("REDIS_URL")
        or rl.take("storage_uri", str, "memory://")
    )
    rl.data.pop("storage_uri", None)
    on_error = rl.take("on_storage_error", str, "allow")
    if on_error not in ("allow", "deny"):
        raise ConfigError('ratelimit.on_storage_error: must be "allow" or "deny"')
    tls_verify = rl.take("tls_verify", bool, True)
    lease = rl.number("concurrency_lease_seconds", 30.0)
    rl.done()
    if urlsplit(storage_uri).scheme not in ("memory", "redis", "rediss", "redis+sentinel"):
        raise ConfigError(
            f"ratelimit.storage_uri: unsupported scheme in {storage_uri.split(':')[0]!r}"
            " (use memory://, redis:// or rediss://)"
        )

    qs = root.section("quota")
    quota = QuotaSettings(
        default_completion_tokens=qs.integer("default_completion_tokens", 4096),
        reservation_seconds=qs.integer("reservation_seconds", 900),
        image_tokens=qs.integer("image_tokens", IMAGE_TOKENS),
    )
    if quota.image_tokens > MAX_IMAGE_TOKENS:
        raise ConfigError(f"quota.image_tokens: must be at most {MAX_IMAGE_TOKENS}")
    qs.done()

    ms = root.section("metering")
    metering = MeteringSettings(journal_dir=ms.take("journal_dir", str, ""))
    ms.done()

    rp = root.section("responses")
    responses = ResponsesSettings(retention_days=rp.integer("retention_days", 30))
    rp.done()

    rs = root.section("routing")
    routing = RoutingSettings(
        failure_threshold=rs.integer("failure_threshold", 3),
        cooldown_seconds=rs.number("cooldown_seconds", 30.0),
    )
    rs.done()

    tiers = _parse_tiers(root.section("tiers"))
    providers = _parse_providers(root.section("providers"), environ)
    models = _parse_models(root.section("models"), providers)
    signup = _parse_signup(root.section("signup"), tiers, environ)
    root.done()

    return Config(
        database_url=database_url,
        gateway=gateway,
        ratelimit=RateLimitSettings(storage_uri, on_error, tls_verify, lease),
        quota=quota,
        routing=routing,
        metering=metering,
        responses=responses,
        signup=signup,
        tiers=tiers,
        providers=providers,
        models=models,
        admin_token=environ.get("KEYMEAI_ADMIN_TOKEN") or None,
        source=source,
    )


def _parse_signup(
    section: Section, tiers: Mapping[str, Tier], environ: Mapping[str, str]
) -> SignupSettings:
    mode = section.take("mode", str, "off")
    if mode not in SIGNUP_MODES:
        raise ConfigError('signup.mode: must be "off", "invite" or "open"')
    tier = section.take("tier", str, "free")
    if mode == "open" and tier not in tiers:
        raise ConfigError(f"signup.tier: unknown tier {tier!r} (configured: {', '.join(tiers)})")
    per_address = validate_limits(
        [section.take("per_address", str, "3 per day")], "signup.per_address"
    )[0]
    per_day = section.integer("per_day", 100)
    domains = section.take("email_domains", list, [])
    if not all(isinstance(d, str) and d.strip() and "@" not in d for d in domains):
        raise ConfigError('signup.email_domains: expected domain names, e.g. ["example.com"]')
    section.done()
    smtp_url = environ.get("SMTP_URL", "")
    if domains and mode != "off" and urlsplit(smtp_url).scheme != "smtp":
        raise ConfigError(
            "signup.email_domains: set SMTP_URL (smtp://user:pass@host:port) to mail keys"
        )
    return SignupSettings(
        mode=mode,
        tier=tier,
        per_address=per_address,
        per_day=per_day,
        email_domains=tuple(d.strip().lower().lstrip(".") for d in domains),
        smtp_url=smtp_url,
    )


def _check_database_url(url: str) -> None:
    scheme = urlsplit(url).scheme.split("+")[0]
    if scheme not in ("sqlite", "postgres", "postgresql"):
        raise ConfigError(
            f"database.url: unsupported scheme {scheme!r} (use sqlite:///, postgres:// "
            "or postgresql://)"
        )


def validate_limits(value: Any, key: str) -> tuple[str, ...]:
    """Check a list of Flask-Limiter limit strings (e.g. "100 per day")."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f'{key}: expected an array of limit strings like "100 per day"')
    for item in value:
        try:
            parse_many(item)
        except ValueError:
            raise ConfigError(f'{key}: invalid limit {item!r} (e.g. "100 per day")') from None
    return tuple(value)


def _parse_tiers(section: Section) -> dict[str, Tier]:
    tiers = {}
    for name in list(section.data):
        tier = section.section(name)
        requests = validate_limits(tier.take("requests", list), tier.key("requests"))
        tokens = tier.optional_integer("tokens_per_month")
        concurrent = tier.optional_integer("max_concurrent")
        tier.done()
        tiers[name] = Tier(
            name=name, requests=requests, tokens_per_month=tokens, max_concurrent=concurrent
        )
    if not tiers:
        raise ConfigError("tiers: at least one tier is required")
    return tiers


def _parse_providers(section: Section, environ: Mapping[str, str]) -> dict[str, Provider]:
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


def _parse_models(section: Section, providers: Mapping[str, Provider]) -> dict[str, Model]:
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
