"""The OpenAI-compatible API under /v1.

A chat completion reads top to bottom: auth (`require_key`) → request limit (the
blueprint's, counted once by Flask-Limiter's hook: see `init_app`) → concurrency slot →
validation → token quota → route to an upstream → relay to the client → meter. The meter
is finished on every way out, and the slot released with it.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Flask, Response, g, jsonify, request
from flask_limiter import Limiter
from werkzeug.exceptions import RequestEntityTooLarge

from . import concurrency, gateway, limits, quota
from .auth import authenticate
from .catalogue import Model
from .dialect import ChatCompletions, Dialect
from .embeddings import Embeddings, parse_embedding_request
from .errors import ApiError, model_not_found
from .keys import KeyInfo
from .metering import Meter
from .relay import relay
from .unconfigured import refuse_unconfigured_model
from .upstream import UpstreamModelError
from .validation import ChatRequest, parse_chat_request, parse_json_body

bp = Blueprint("api", __name__, url_prefix="/v1")


def init_app(app: Flask, limiter: Limiter) -> None:
    """The API and its policy: every request's key, then each POST's request limit.

    The key is taken in an app hook, not the blueprint's: an app's hooks run before its
    blueprints', and Flask-Limiter counts the blueprint's limit in its own app hook, which
    must come after this one (so `limits.init_app` must come after this function).
    """
    if limiter.initialized:
        raise RuntimeError("api.init_app must run before limits.init_app: the limit needs the key")
    from . import messages  # noqa: F401  (its views are on this blueprint; they import it)

    app.before_request(_key_first)
    limits.per_key(limiter)(bp)
    app.register_blueprint(bp)


def _key_first() -> None:
    if request.blueprint == bp.name:
        require_key()


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


@bp.post("/chat/completions")  # its key's request limits already counted: `init_app`
@concurrency.holding_slot
def chat_completions() -> Response:
    gw = gateway.current()
    raw = read_body(gw.config.gateway.max_request_bytes)
    body = parse_json_body(raw, request.content_type)
    chat = parse_chat_request(body, gw.config.model_names, gw.config.quota.image_tokens)
    return serve(chat, ChatCompletions(chat))


@bp.post("/embeddings")  # limited like chat completions: `init_app`
@concurrency.holding_slot
def embeddings() -> Response:
    gw = gateway.current()
    raw = read_body(gw.config.gateway.max_request_bytes)
    body = parse_json_body(raw, request.content_type)
    request_ = parse_embedding_request(body, gw.config.model_names)
    return serve(request_, Embeddings(request_))


def serve(chat: ChatRequest, dialect: Dialect) -> Response:
    """Answer a validated chat request in the client's dialect: the key's model
    allow-list → token quota → route to an upstream → relay → meter. Every API that
    translates to chat completions (keymeai.dialect), and embeddings, end here, inside
    their view's concurrency slot."""
    gw = gateway.current()
    key = g.api_key
    if key.allowed_models is not None and chat.model.id not in key.allowed_models:
        raise ApiError(
            403,
            f"This key is not allowed to use the model `{chat.model.id}`.",
            param="model",
            code="model_not_allowed",
        )
    reservation, g.quota = quota.reserve(key, g.tier, chat, gw.config.quota)

    meter = Meter(key, chat, g.request_id)
    meter.journal_to(gw.journal, reservation)
    meter.on_finish = concurrency.current_slot().release  # before the client sees the end
    try:
        opened = gw.router.open(chat, meter)
        return relay(opened, dialect, meter, gw.config.gateway)
    except UpstreamModelError:
        meter.finish(500, "upstream_error")
        raise
    except ApiError as exc:
        meter.finish(exc.status, "unavailable" if exc.status == 503 else "rejected")
        raise
    except BaseException:
        meter.finish(500, "error")
        raise


def read_body(limit: int) -> bytes:
    """The request body; 413 past `limit` bytes, whether or not it came with a length.

    Werkzeug stops reading a chunked body at MAX_CONTENT_LENGTH without a word, so the
    body would arrive truncated: the byte after the limit tells a 413 from a body that
    is exactly `limit` bytes long.
    """
    raw = request.get_data(cache=False)
    chunked = request.content_length is None
    if chunked and len(raw) >= limit and request.environ["wsgi.input"].read(1):
        raise RequestEntityTooLarge()
    return raw


def model_object(name: str, model: Model) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": model.created, "owned_by": model.owned_by}


def visible_models() -> dict[str, Model]:
    """The names (ids, then aliases, each an entry as LiteLLM lists them) of the models
    the current key may use: all of them, or those on its allow-list."""
    names = gateway.current().config.model_names
    allowed = g.api_key.allowed_models
    return dict(names) if allowed is None else {n: m for n, m in names.items() if m.id in allowed}


@bp.get("/models")
def list_models() -> Response:
    models = visible_models().items()
    return jsonify({"object": "list", "data": [model_object(n, m) for n, m in models]})


@bp.get("/models/<path:model_id>")
def get_model(model_id: str) -> Response:
    model = visible_models().get(model_id)
    if model is None:
        raise model_not_found(model_id)
    return jsonify(model_object(model_id, model))
