"""Parsing and checking the body of POST /v1/chat/completions.

The documented parameters are checked here, each failure a 400 naming its `param`, so
that a bad request never costs an upstream call. Every other field passes through to
the provider untouched: the upstream knows its own parameters best.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..catalogue import Model
from ..errors import ApiError, invalid, model_not_found
from ..tokens import IMAGE_TOKENS, estimate_prompt_tokens

ROLES = ("system", "developer", "user", "assistant", "tool")
# OpenAI's newer name for `system`. None of DeepSeek, DashScope (compatible mode) or Ark
# documents it, so it goes upstream as `system`, which all of them take.
UPSTREAM_ROLES = {"developer": "system"}
JSON_TYPES = ("application/json",)
# Far deeper than any real request (tool schemas included). A deeper body could parse
# here yet exhaust the stack when it is serialised again for the upstream (a 500).
MAX_DEPTH = 100
# No model comes near it; the bound keeps the quota reservation within a 64-bit column.
MAX_TOKENS = 2**31 - 1
# OpenAI's bound on `n`; a larger one is left for the provider to refuse.
MAX_CHOICES = 128
COMPLETION_LIMITS = ("max_tokens", "max_completion_tokens")
# A \ud800-\udfff escape: fine in a surrogate pair, but alone it decodes to a string
# that cannot be encoded as UTF-8 for the upstream.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


@dataclass
class ChatRequest:
    """A validated chat completion request."""

    body: dict[str, Any]
    model: Model  # resolved: an alias in the request names its model here
    stream: bool
    include_usage: bool  # the client asked for the usage chunk of a stream
    # The larger of max_tokens and max_completion_tokens (LangChain sends the latter).
    completion_limit: int | None
    choices: int  # `n`: each choice may use completion_limit tokens
    prompt_estimate: int


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def _finite_float(text: str) -> float:
    """A JSON number as a float, refused when it overflows (1e400 would be inf, which
    `json.dumps` writes as the non-JSON `Infinity` for the upstream). About 65 ns per
    number literal, measured: nothing next to parsing a typical body."""
    value = float(text)
    if math.isinf(value):
        shown = text if len(text) <= 20 else text[:17] + "..."
        raise ValueError(f"the number {shown} is out of range (numbers must be finite)")
    return value


# One decoder for every body: `json.loads` with these options would build one per call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def parse_json_body(raw: bytes, content_type: str | None) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    mimetype = (content_type or "").split(";")[0].strip().lower()
    if mimetype not in JSON_TYPES and not mimetype.endswith("+json"):
        raise invalid(
            "Content-Type must be application/json "
            f"(got {mimetype or 'none'!r}); send the request body as JSON."
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid("The request body is not valid UTF-8.") from None
    if not text.strip():
        raise invalid("The request body is empty; expected a JSON object.")
    try:
        if text.startswith("\ufeff"):  # as json.loads says it
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        body = _DECODER.decode(text)
    except RecursionError:
        raise _too_deep() from None
    except ValueError as exc:
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise invalid(f"We could not parse the JSON body of your request: {detail}.") from None
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object.")
    # Nesting is at most the count of brackets that open it (a cheap bound: most bodies
    # have a handful), so only a body with many of them needs the walk.
    if text.count("{") + text.count("[") > MAX_DEPTH and _depth_exceeds(body, MAX_DEPTH):
        raise _too_deep()
    if _SURROGATE_ESCAPE.search(text) and not _is_unicode(body):
        raise invalid(
            "The request body contains an unpaired surrogate escape (\\ud800-\\udfff): "
            "its strings are not valid Unicode."
        )
    return body


def _too_deep() -> ApiError:
    return invalid(f"The JSON body is nested too deeply (at most {MAX_DEPTH} levels).")


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` deep (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _is_unicode(body: dict[str, Any]) -> bool:
    try:
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return False
    return True


def parse_chat_request(
    body: dict[str, Any], models: Mapping[str, Model], image_tokens: int = IMAGE_TOKENS
) -> ChatRequest:
    """Check the documented parameters; the rest is the provider's business.

    `image_tokens` is the prompt allowance of one image part (`[quota] image_tokens`)."""
    model = find_model(body, models, "chat")
    messages = _check_messages(body.get("messages"))
    if any(message["role"] in UPSTREAM_ROLES for message in messages):
        body = dict(body, messages=[_upstream_message(message) for message in messages])
    temperature = body.get("temperature")
    if temperature is not None and not (_is_number(temperature) and 0 <= temperature <= 2):
        raise invalid("temperature must be a number between 0 and 2", "temperature")
    limits = [_completion_limit(body, name) for name in COMPLETION_LIMITS]
    completion_limit = max((limit for limit in limits if limit is not None), default=None)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise invalid("stream must be a boolean", "stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise invalid("stream_options must be an object", "stream_options")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise invalid(
                "stream_options.include_usage must be a boolean", "stream_options.include_usage"
            )
    return ChatRequest(
        body=body,
        model=model,
        stream=stream,
        include_usage=include_usage and stream,
        completion_limit=completion_limit,
        choices=_choices(body.get("n")),
        prompt_estimate=estimate_prompt_tokens(body, image_tokens),
    )


def find_model(body: dict[str, Any], models: Mapping[str, Model], kind: str) -> Model:
    """The model `body` names (by id or alias), which must be of `kind`: a chat model
    cannot make embeddings, nor an embedding model chat."""
    model_id = body.get("model")
    if model_id is None:
        raise invalid("you must provide a model parameter", "model")
    if not isinstance(model_id, str):
        raise invalid("model must be a string", "model")
    model = models.get(model_id)
    if model is None:
        raise model_not_found(model_id)
    if model.kind != kind:
        endpoint = "embeddings" if model.kind == "embedding" else "chat/completions"
        raise ApiError(
            400,
            f"The model `{model_id[:200]}` is not a {kind} model: use it with /v1/{endpoint}.",
            param="model",
            code="wrong_model_kind",
        )
    return model


def _upstream_message(message: dict[str, Any]) -> dict[str, Any]:
    role = UPSTREAM_ROLES.get(message["role"])
    return message if role is None else dict(message, role=role)


def _choices(n: Any) -> int:
    """How many completions `n` asks for; an invalid `n` is the provider's to refuse."""
    return n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_CHOICES else 1


def _completion_limit(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is not None and not (_is_int(value) and 0 < value <= MAX_TOKENS):
        raise invalid(f"{name} must be an integer from 1 to {MAX_TOKENS}", name)
    return value


def _check_messages(messages: Any) -> list[dict[str, Any]]:
    if messages is None:
        raise invalid("you must provide a messages parameter", "messages")
    if not isinstance(messages, list):
        raise invalid("messages must be an array of message objects", "messages")
    if not messages:
        raise invalid("messages must contain at least one message", "messages")
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"{param} must be an object with role and content", param)
        role = message.get("role")
        if role not in ROLES:
            raise invalid(
                f"{param}.role must be one of {', '.join(ROLES)} (got {_show(role)})",
                f"{param}.role",
            )
        content = message.get("content")
        if content is None:
            if role == "assistant" and message.get("tool_calls"):
                continue
            raise invalid(f"{param}.content is required", f"{param}.content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list) or not all(
            isinstance(part, dict) and isinstance(part.get("type"), str) for part in content
        ):
            raise invalid(
                f"{param}.content must be a string or an array of content parts",
                f"{param}.content",
            )
    return messages


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite int or float (an int too large for a float is finite too: no OverflowError)."""
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
