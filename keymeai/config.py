"""Configuration: read the TOML file once, apply environment overrides, validate.

Everything the gateway needs at run time is parsed here into frozen dataclasses, so a
mistake in the file stops start-up with a message naming the bad key, instead of
surfacing later as a 500 on some request. The strict reading of each TOML table is
`tables.Section`'s; what the operator is told about the result is `diagnostics`'.
"""

from __future__ import annotations

import functools
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from limits import parse_many

from .catalogue import Model, Provider, model_names, parse_models, parse_providers
from .tables import ConfigError, Section
from .tokens import IMAGE_TOKENS

MAX_IMAGE_TOKENS = 1_000_000  # far above any model's; keeps reservations within BIGINT

DEFAULT_PATH = Path(__file__).resolve().parent.parent / "config.toml"


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
    """Self-service sign-up at /signup (keymeai.operator.signup)."""

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
    providers = parse_providers(root.section("providers"), environ)
    models = parse_models(root.section("models"), providers)
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
