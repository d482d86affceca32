"""OpenAI's Responses API under /v1 (`POST /v1/responses`), for Codex CLI, the OpenAI
Agents SDK and `client.responses.create`.

The request is translated to chat completions (keymeai.api.responses_input), validated as
one, and served by `api.serve` like `/v1/chat/completions`: the blueprint's key, request
limit and concurrency slot, then the allow-list, token quota, routing, relay and meter.
Only the answer's dialect differs (keymeai.api.responses_dialect).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from flask import Response, g, jsonify, request

from .. import gateway
from ..errors import invalid
from . import concurrency
from . import responses_store as store
from .responses_dialect import ResponsesDialect
from .responses_input import to_chat
from .serve import bp, read_body, serve
from .validation import parse_chat_request, parse_json_body

# Request fields the Response object echoes back, with OpenAI's defaults.
ECHOED: dict[str, Any] = {
    "instructions": None,
    "max_output_tokens": None,
    "metadata": {},
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "reasoning": None,
    "store": True,
    "temperature": None,
    "text": {"format": {"type": "text"}},
    "tool_choice": "auto",
    "tools": [],
    "top_p": None,
    "truncation": "disabled",
    "user": None,
}


def shell(body: dict[str, Any]) -> dict[str, Any]:
    """What the Response object repeats of its request."""
    echoed = {
        name: default if body.get(name) is None else body[name] for name, default in ECHOED.items()
    }
    return {"model": body.get("model"), **echoed}


@bp.post("/responses")  # its key's request limits already counted: `api.init_app`
@concurrency.holding_slot
def create_response() -> Response:
    gw = gateway.current()
    raw = read_body(gw.config.gateway.max_request_bytes)
    body = parse_json_body(raw, request.content_type)
    retention = gw.config.responses.retention_days
    if not isinstance(body.get("store", True), bool):
        raise invalid("store must be a boolean", "store")
    previous = body.get("previous_response_id")
    history = None if previous is None else store.history(g.api_key.id, previous, retention)
    translated = to_chat(body, history)
    chat = parse_chat_request(translated.body, gw.config.models, gw.config.quota.image_tokens)
    keep: Callable[[dict[str, Any]], None] | None = None
    if body.get("store") is not False:
        keep = partial(
            store.save,
            g.api_key.id,
            conversation=translated.conversation,
            retention_days=retention,
        )
    return serve(chat, ResponsesDialect(shell(body), translated.names, keep))


@bp.get("/responses/<response_id>")
def get_response(response_id: str) -> Response:
    retention = gateway.current().config.responses.retention_days
    return jsonify(store.load(g.api_key.id, response_id, retention))


@bp.delete("/responses/<response_id>")
def delete_response(response_id: str) -> Response:
    store.delete(g.api_key.id, response_id)
    return jsonify({"id": response_id, "object": "response.deleted", "deleted": True})
