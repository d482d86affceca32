"""What the fake providers answer, in each provider's shape (DeepSeek, DashScope, Ark):
completions, SSE events, embeddings, usage and errors. `fake_upstream` serves them over
HTTP and applies the fault modes; here is only what a healthy or refusing provider says.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, quote_plus

SHAPES = ("deepseek", "dashscope", "ark")
BASE_PATHS = {"deepseek": "v1", "dashscope": "compatible-mode/v1", "ark": "api/v3"}
MODELS = {
    "deepseek": ["deepseek-chat", "deepseek-reasoner"],
    "dashscope": ["qwen-plus", "qwen-max", "qwen-turbo"],
    "ark": ["doubao-seed-1-6-250615", "deepseek-v3-250324"],
}
ERROR_STATUSES = (400, 401, 402, 403, 404, 422, 429, 500, 502, 503)
FAULTS = {
    "arrearage": "DashScope-style 400 Arrearage (account in arrears)",
    "octet-error": "500 with a JSON error body sent as application/octet-stream",
    "hang": "read the request, then send nothing (up to 60 s)",
    "hang-after-headers": "send headers (and the first SSE event), then nothing",
    "slow": "like ok, 0.5 s between stream chunks",
    "die": "close the connection after 3 SSE events / half the body",
    "die-before-body": "close the connection without sending anything",
    "garbage": "200 text/html <html>Bad Gateway</html>",
    "badjson": "200 with truncated JSON (stream: one good event, then bad JSON)",
    "wrongshape": "200 valid JSON without choices",
    "nousage": "like ok but never report usage",
    "empty": "200 application/json with an empty body",
    "leak-400": "400 whose error echoes the bearer key (as sent, upper case, URL-encoded) "
    "and the fake's host, port and URL",
    "leak-500": "500 whose error echoes them likewise",
    "leak-stream": "stream: two chunks, then an error event echoing them (else as leak-500)",
}
EMBEDDING_DIMENSIONS = 1024  # text-embedding-v4's default
MAX_EMBEDDING_INPUTS = {"dashscope": 10, "ark": 256, "deepseek": 256}
MODES = frozenset(["ok", *FAULTS, *map(str, ERROR_STATUSES)])
# Modes whose streamed behaviour differs from the non-stream one.
STREAM_MODES = frozenset(
    ["ok", "slow", "nousage", "die", "hang-after-headers", "badjson", "wrongshape", "leak-stream"]
)
MAX_ECHO_WORDS = 60
DEFAULT_REASONING = "Thinking about the question."
_EXTRA: dict[str, dict[str, Any]] = {  # per-shape top-level fields of completions and chunks
    "deepseek": {"system_fingerprint": "fp_fake"},
    "dashscope": {"system_fingerprint": None},
    "ark": {"service_tier": "default"},
}
# status -> (type, code, message); shape tables override the OpenAI/DeepSeek default.
_ERRORS: dict[str | None, dict[int, tuple[str, str, str]]] = {
    None: {
        400: ("invalid_request_error", "invalid_request_error", "Invalid request"),
        401: ("authentication_error", "invalid_request_error", "Authentication Fails"),
        402: ("unknown_error", "invalid_request_error", "Insufficient Balance"),
        403: ("permission_error", "permission_denied", "Permission denied"),
        404: ("invalid_request_error", "model_not_found", "Not Found"),
        422: ("invalid_request_error", "invalid_request_error", "Invalid Parameters"),
        429: ("rate_limit_error", "rate_limit_exceeded", "Rate Limit Reached"),
        500: ("api_error", "internal_error", "Server Error"),
        502: ("api_error", "bad_gateway", "Bad Gateway"),
        503: ("api_error", "server_overloaded", "Server Overloaded"),
    },
    "dashscope": {
        400: ("invalid_request_error", "invalid_parameter_error", "Invalid request"),
        401: ("invalid_request_error", "invalid_api_key", "Incorrect API key."),
        429: ("limit_requests", "limit_requests", "Requests rate limit exceeded."),
        500: ("internal_error", "internal_error", "An internal error has occured."),
    },
    "ark": {
        400: ("BadRequest", "InvalidParameter", "A parameter is invalid."),
        401: ("Unauthorized", "AuthenticationError", "The API key is invalid."),
        403: ("Forbidden", "AccountOverdueError", "Your account has an overdue bill."),
        404: ("NotFound", "InvalidEndpointOrModel.NotFound", "Model not found."),
        429: ("TooManyRequests", "ServerOverloaded", "The service is overloaded."),
        500: ("InternalServerError", "InternalServiceError", "Internal error."),
    },
}


def error_body(shape: str | None, status: int, message: str | None = None) -> dict:
    """Build a JSON error in the given provider's format."""
    default = _ERRORS[None].get(status, ("api_error", "error", "Error"))
    etype, code, text = _ERRORS.get(shape, {}).get(status, default)
    text = message or text
    if shape == "ark":
        text = f"{text} Request id: {uuid.uuid4().hex}"
        return {"error": {"code": code, "message": text, "param": "", "type": etype}}
    body: dict[str, Any] = {"error": {"message": text, "type": etype, "param": None, "code": code}}
    if shape == "dashscope":
        body["request_id"] = str(uuid.uuid4())
    return body


ARREARAGE = {
    "error": {
        "message": "Access denied, please make sure your account is in good standing.",
        "type": "Arrearage",
        "param": None,
        "code": "Arrearage",
    }
}


def leak_body(shape: str | None, status: int, key: str, host: str, port: int, path: str) -> dict:
    """An error body echoing what a provider's text must never carry to the gateway's
    clients or logs: the key it was sent and its own address, in several spellings."""
    url = f"http://{host}:{port}{path.removesuffix('/chat/completions')}"
    encoded = quote(key, safe="")
    text = (
        f"Key {key} ({key.upper()}, {encoded}, {encoded.lower()}, {quote(key)}, "
        f"{quote_plus(key)}) "
        f"is not valid on {host}:{port} (HTTPConnectionPool(host='{host}', port={port}); "
        f"host {host}), see {url} or {quote(url, safe='')}"
    )
    body = error_body(shape, status, text)
    body["error"]["code"] = f"{key.upper()}@{host}:{port}"
    return body


def plain_reply(
    shape: str, mode: str, payload: dict, prefix: bytes, leak: Callable[[int], dict]
) -> tuple[int, str, bytes, dict[str, str]]:
    """Status, content type, body and extra headers of a Content-Length answer in `mode`:
    the payload, or the error or malformed body the mode stands for (`leak` builds the
    leak modes' body from the request)."""
    extra: dict[str, str] = {}
    status, ctype = 200, "application/json"
    if mode.isdigit():
        status = int(mode)
        data = json.dumps(error_body(shape, status)).encode()
        if status in (429, 503):
            extra["Retry-After"] = "1"
    elif mode == "arrearage":
        status = 400
        data = json.dumps({**ARREARAGE, "request_id": str(uuid.uuid4())}).encode()
    elif mode.startswith("leak-"):
        status = 400 if mode == "leak-400" else 500
        data = json.dumps(leak(status)).encode()
    elif mode == "octet-error":
        status, ctype = 500, "application/octet-stream"
        data = json.dumps(error_body(shape, 500)).encode()
    elif mode == "garbage":
        ctype, data = "text/html", b"<html>Bad Gateway</html>"
    elif mode == "badjson":
        data = b'{"id": "x", "choices": '
    elif mode == "wrongshape":
        data = b'{"object": "chat.completion", "result": "hello"}'
    elif mode == "empty":
        data = b""
    else:  # ok, slow, nousage, and the partial sends below
        data = prefix + json.dumps(payload).encode()
    return status, ctype, data, extra


def _text_of(content: Any) -> str:
    """Text of a message content: a string or a list of OpenAI content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict)]
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


def _schema_tokens(body: dict) -> int:
    """Tool, function and response_format schemas, billed as prompt the way a real
    tokenizer splits JSON: about 4 characters a token."""
    fields = ("tools", "functions", "response_format")
    text = "".join(json.dumps(body[f], separators=(",", ":")) for f in fields if f in body)
    return -(-len(text) // 4)


@dataclass
class Reply:
    """What the fake will answer, in whitespace-separated "tokens"."""

    words: list[str]
    reasoning: list[str]
    prompt_tokens: int
    cached: int
    finish_reason: str
    tool_call: dict | None = None  # {"id", "name", "arguments"} when a tool was forced

    @classmethod
    def plan(cls, shape: str, body: dict, knobs: dict) -> Reply:
        msgs = body["messages"]
        if "words" in knobs:
            words = [f"w{i}" for i in range(1, int(knobs["words"]) + 1)]
        else:
            user = [m for m in msgs if m.get("role") == "user"]
            text = _text_of(user[-1].get("content")) if user else ""
            words = f"Echo: {text}".split()[:MAX_ECHO_WORDS]
        finish = "stop"
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        if isinstance(limit, int) and limit < len(words):
            words, finish = words[: max(limit, 0)], "length"
        if "reasoning_words" in knobs:
            reasoning = [f"r{i}" for i in range(1, int(knobs["reasoning_words"]) + 1)]
        elif shape == "deepseek" and "reasoner" in str(body.get("model")):
            reasoning = DEFAULT_REASONING.split()
        else:
            reasoning = []
        prompt = sum(len(_text_of(m.get("content")).split()) + 3 for m in msgs)
        prompt += _schema_tokens(body)
        cached = max(0, min(int(knobs.get("cached", 0)), prompt))
        call = knobs.get("tool_call")
        if isinstance(call, dict):
            name, arguments = str(call.get("name")), str(call.get("arguments", "{}"))
            call = {"id": "call_fake1", "name": name, "arguments": arguments}
            return cls([], reasoning, prompt, cached, "tool_calls", call)
        tool = _forced_tool(body)
        if tool is None:
            return cls(words, reasoning, prompt, cached, finish)
        arguments = json.dumps({"echo": " ".join(words)})
        call = {"id": f"call_{uuid.uuid4().hex[:12]}", "name": tool, "arguments": arguments}
        return cls(words, reasoning, prompt, cached, "tool_calls", call)

    def usage(self, shape: str) -> dict:
        """Usage object in the provider's format (DeepSeek adds cache hit/miss)."""
        completion = len(self.words) + len(self.reasoning)
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        }
        if shape == "deepseek":
            usage["prompt_cache_hit_tokens"] = self.cached
            usage["prompt_cache_miss_tokens"] = self.prompt_tokens - self.cached
        if self.reasoning or shape == "ark":
            usage["completion_tokens_details"] = {"reasoning_tokens": len(self.reasoning)}
        return usage


def _forced_tool(body: dict) -> str | None:
    """The function a request forces the model to call, if any."""
    choice, tools = body.get("tool_choice"), body.get("tools")
    if isinstance(choice, dict):
        return str(choice.get("function", {}).get("name"))
    if choice == "required" and isinstance(tools, list) and tools:
        return str(tools[0].get("function", {}).get("name"))
    return None


def _tool_calls(call: dict, arguments: str) -> list[dict]:
    return [{"index": 0, "id": call["id"], "type": "function",
             "function": {"name": call["name"], "arguments": arguments}}]  # fmt: skip


def chat_problem(body: Any, bad_json: bool) -> str | None:
    """Why a chat request body would get a provider 400, or None if it is fine."""
    if bad_json or not isinstance(body, dict):
        return "Failed to parse the request body as JSON"
    if not body.get("model"):
        return "Missing required parameter: 'model'"
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "Invalid 'messages': must be a non-empty list"
    if not all(isinstance(m, dict) for m in msgs):
        return "Invalid 'messages': every message must be an object"
    return None


def embedding_vector(text: str, dimensions: int = EMBEDDING_DIMENSIONS) -> list[float]:
    """The fake's vector for `text`: derived from its hash, so the same text always gets
    the same vector, and exact in float32 (multiples of 1/1024 within [-1, 1])."""
    seed = hashlib.sha256(text.encode()).digest()
    stream = b"".join(
        hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(-(-dimensions // 16))
    )
    return [
        (int.from_bytes(stream[2 * i : 2 * i + 2], "big") % 2049 - 1024) / 1024
        for i in range(dimensions)
    ]


def embedding_problem(shape: str, body: Any, bad_json: bool) -> str | None:
    """Why an embedding request would get a provider 400, or None if it is fine."""
    if bad_json or not isinstance(body, dict):
        return "Failed to parse the request body as JSON"
    if not body.get("model"):
        return "Missing required parameter: 'model'"
    texts = body.get("input")
    texts = [texts] if isinstance(texts, str) else texts
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        return "input must be a string or an array of strings"
    if len(texts) > MAX_EMBEDDING_INPUTS[shape]:
        return f"batch size is invalid, it should not be larger than {MAX_EMBEDDING_INPUTS[shape]}"
    dimensions = body.get("dimensions", EMBEDDING_DIMENSIONS)
    if not isinstance(dimensions, int) or not 0 < dimensions <= 4096:
        return "dimensions is invalid"
    if body.get("encoding_format", "float") != "float":
        return "encoding_format only supports float"
    return None


def embeddings(shape: str, body: dict, with_usage: bool) -> dict:
    """An embeddings answer in the provider's shape."""
    texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
    dimensions = body.get("dimensions", EMBEDDING_DIMENSIONS)
    data = [
        {"embedding": embedding_vector(text, dimensions), "index": i, "object": "embedding"}
        for i, text in enumerate(texts)
    ]
    answer: dict[str, Any] = {"data": data, "model": body["model"], "object": "list"}
    answer["id"] = str(uuid.uuid4())
    if shape == "ark":
        answer["created"] = int(time.time())
    if with_usage:
        prompt = sum(len(text.split()) for text in texts)
        answer["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt}
    return answer


def _new_id(shape: str) -> str:
    return f"chatcmpl-{uuid.uuid4()}" if shape == "dashscope" else str(uuid.uuid4())


def completion(shape: str, model: str, reply: Reply, with_usage: bool) -> dict:
    """Non-stream chat completion body."""
    message: dict[str, Any] = {"role": "assistant", "content": " ".join(reply.words)}
    if reply.tool_call:
        message["content"] = None
        message["tool_calls"] = _tool_calls(reply.tool_call, reply.tool_call["arguments"])
    if reply.reasoning:
        message["reasoning_content"] = " ".join(reply.reasoning)
    choice = {
        "index": 0,
        "message": message,
        "logprobs": None,
        "finish_reason": reply.finish_reason,
    }
    body = {
        "id": _new_id(shape),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        **_EXTRA[shape],
    }
    if with_usage:
        body["usage"] = reply.usage(shape)
    return body


def _spaced(words: list[str]) -> list[str]:
    """Stream pieces: each word plus a trailing space, except the last."""
    return [w if i == len(words) - 1 else w + " " for i, w in enumerate(words)]


Event = tuple[bytes, dict | None]  # SSE event wire bytes, usage it carries


def stream_events(
    shape: str, model: str, reply: Reply, include_usage: bool, usage_early: bool = False
) -> list[Event]:
    """SSE events (wire bytes, usage carried) for a streamed completion."""
    cid, created = _new_id(shape), int(time.time())
    prefix = b"data:" if shape == "dashscope" else b"data: "

    def event(delta: Any, finish: str | None = None, usage: dict | None = None):
        choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        chunk = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            **_EXTRA[shape],
            "choices": [] if delta is None else choices,
            "usage": usage,
        }
        return prefix + json.dumps(chunk).encode() + b"\n\n", usage

    usage = reply.usage(shape) if include_usage else None
    events = [event({"role": "assistant", "content": ""})]
    if usage and usage_early:
        events.append(event(None, usage=usage))
    events += [event({"reasoning_content": w, "content": None}) for w in _spaced(reply.reasoning)]
    if reply.tool_call:
        call, arguments = reply.tool_call, reply.tool_call["arguments"]
        events.append(event({"tool_calls": _tool_calls(call, "")}))
        pieces = [arguments[i : i + 10] for i in range(0, len(arguments), 10)]
        events += [
            event({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in pieces
        ]
    else:
        events += [event({"content": w}) for w in _spaced(reply.words)]
    # DeepSeek puts usage on the finish chunk; the others send a choices=[] chunk.
    final_usage = usage if shape == "deepseek" else None
    events.append(event({"content": ""}, reply.finish_reason, final_usage))
    if usage and shape != "deepseek":
        events.append(event(None, usage=usage))
    events.append((prefix + b"[DONE]\n\n", None))
    return events
