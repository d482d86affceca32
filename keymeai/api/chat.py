"""OpenAI's chat completions and the model list."""

from __future__ import annotations

from typing import Any

from flask import Response, g, jsonify, request

from .. import gateway
from ..catalogue import Model
from ..errors import model_not_found
from . import concurrency
from .dialect import ChatCompletions
from .serve import bp, read_body, serve
from .validation import parse_chat_request, parse_json_body


@bp.post("/chat/completions")  # its key's request limits already counted: `init_app`
@concurrency.holding_slot
def chat_completions() -> Response:
    gw = gateway.current()
    raw = read_body(gw.config.gateway.max_request_bytes)
    body = parse_json_body(raw, request.content_type)
    chat = parse_chat_request(body, gw.config.model_names, gw.config.quota.image_tokens)
    return serve(chat, ChatCompletions(chat))


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
