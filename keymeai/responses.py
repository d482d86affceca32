"""OpenAI's Responses API under /v1 (`POST /v1/responses`), for Codex CLI, the OpenAI
Agents SDK and `client.responses.create`.

The request is translated to chat completions (keymeai.responses_input), validated as
one, and served by `api.serve` like `/v1/chat/completions`: the blueprint's key, request
limit and concurrency slot, then the allow-list, token quota, routing, relay and meter.
Only the answer's dialect differs (keymeai.responses_dialect).
"""

from __future__ import annotations

from typing import Any

from flask import Response, request

from . import concurrency, gateway
from .api import bp, read_body, serve
from .responses_dialect import ResponsesDialect
from .responses_input import to_chat
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
    echoed = {name: body.get(name, default) for name, default in ECHOED.items()}
    if body.get(name := "metadata") is None:
        echoed[name] = {}
    return {"model": body.get("model"), **echoed}


@bp.post("/responses")  # its key's request limits already counted: `api.init_app`
@concurrency.holding_slot
def create_response() -> Response:
    gw = gateway.current()
    raw = read_body(gw.config.gateway.max_request_bytes)
    body = parse_json_body(raw, request.content_type)
    translated = to_chat(body)
    chat = parse_chat_request(translated.body, gw.config.models, gw.config.quota.image_tokens)
    return serve(chat, ResponsesDialect(shell(body), translated.names))
