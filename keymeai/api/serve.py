"""What every API of the blueprint shares: the request's key, its body, and `serve`,
which takes a validated request the rest of the way (allow-list → token quota → route →
relay → meter) in the client's dialect."""

from __future__ import annotations

from flask import Blueprint, Response, g, request
from werkzeug.exceptions import RequestEntityTooLarge

from .. import gateway
from ..catalogue import Model
from ..errors import ApiError
from ..ledger import quota
from ..ledger.keys import KeyInfo
from ..ledger.metering import Meter
from . import concurrency
from .auth import authenticate
from .bodies import BODY
from .dialect import Dialect
from .relay import relay
from .unconfigured import refuse_unconfigured_model
from .upstream import UpstreamModelError
from .validation import ChatRequest

bp = Blueprint("api", __name__, url_prefix="/v1")


def require_key() -> None:
    if request.method == "OPTIONS":
        return  # Flask's automatic answer (Allow: ...) reveals nothing; preflights carry no key
    gw = gateway.current()
    use_key(authenticate(gw.keys))
    refuse_unconfigured_model(gw.router.unconfigured)  # before the request limit counts


def use_key(key: KeyInfo) -> None:
    """Make `key` the request's key (`g.api_key`, `g.tier`), which the limiter and
    `GET /v1/usage` read; 403 when its tier is no longer configured."""
    tier = gateway.current().config.tiers.get(key.tier)
    if tier is None:
        raise ApiError(
            403,
            f"This key's tier ({key.tier}) is not offered any more. Contact the operator.",
            code="tier_not_configured",
        )
    g.api_key = key
    g.tier = tier


def serve(chat: ChatRequest, dialect: Dialect) -> Response:
    """Answer a validated chat request in the client's dialect: the key's model
    allow-list → token quota → route to an upstream → relay → meter. Every API that
    translates to chat completions (keymeai.api.dialect), and embeddings, end here, inside
    their view's concurrency slot."""
    gw = gateway.current()
    key = g.api_key
    require_allowed(chat.model)
    reservation, month = quota.reserve(key, g.tier, chat, gw.config.quota)
    quota_headers = month.headers() if month is not None else {}  # x-ratelimit-*-tokens

    meter = Meter(key, chat, g.request_id)
    meter.journal_to(gw.journal, reservation)
    meter.on_finish = concurrency.current_slot().release  # before the client sees the end
    try:
        opened = gw.router.open(chat, meter)
        response = relay(opened, dialect, meter, gw.config.gateway)
    except UpstreamModelError:
        meter.finish(500, "upstream_error")
        raise
    except ApiError as exc:
        meter.finish(exc.status, "unavailable" if exc.status == 503 else "rejected")
        exc.headers.update(quota_headers)
        raise
    except BaseException:
        meter.finish(500, "error")
        raise
    response.headers.update(quota_headers)
    return response


def require_allowed(model: Model) -> None:
    """403 when the request's key has an allow-list that leaves `model` out."""
    allowed = g.api_key.allowed_models
    if allowed is not None and model.id not in allowed:
        raise ApiError(
            403,
            f"This key is not allowed to use the model `{model.id}`.",
            param="model",
            code="model_not_allowed",
        )


def read_body(limit: int) -> bytes:
    """The request body; 413 past `limit` bytes, whether or not it came with a length.

    Usually the body deadline has read it whole (`bodies.BODY`: at most `limit` + 1
    bytes of a chunked one). Otherwise: Werkzeug stops reading a chunked body at
    MAX_CONTENT_LENGTH without a word, so the body would arrive truncated: the byte
    after the limit tells a 413 from a body that is exactly `limit` bytes long.
    """
    raw: bytes | None = request.environ.get(BODY)
    if raw is not None:
        if len(raw) > limit:
            raise RequestEntityTooLarge()
        return raw
    raw = request.get_data(cache=False)
    chunked = request.content_length is None
    if chunked and len(raw) >= limit and request.environ["wsgi.input"].read(1):
        raise RequestEntityTooLarge()
    return raw
