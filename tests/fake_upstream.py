"""Fake OpenAI-compatible LLM providers (DeepSeek, DashScope, Ark) with fault injection.

Why: the gateway's tests need real HTTP/1.1 upstreams (keep-alive, chunked SSE,
abrupt disconnects) that mimic each provider's quirks, and new users need something
to point the gateway at without provider accounts.

URLs: ``/{shape}/{mode}/<anything>/chat/completions`` and ``.../embeddings`` (POST), and
``.../models`` (GET). Embeddings are deterministic: each input's vector follows from its
text (and ``dimensions``, default EMBEDDING_DIMENSIONS), its values multiples of 1/1024,
exact in float32; usage counts the words of the inputs, as prompt and total tokens.
``mode`` is ``ok``, an HTTP error status such as ``503``, a fault from ``FAULTS`` or
``sw-<name>``, which behaves as ``fake.switches.get(name, "ok")`` at request time.
Per-request knobs come from a ``"fake"`` object in the JSON body: ``words``,
``interval``, ``cached``, ``reasoning_words``, ``first_delay``, ``usage_early`` (a stream
also reports its usage right after its first chunk, as for an answer billed up front),
``held`` (the answer waits until the test calls ``release()``, at most HELD_LIMIT s),
``tool_call`` (``{"name", "arguments"}``: the answer is that function call, id
``call_fake1``, no text).
A request that forces a tool (``tool_choice`` ``required`` or a named function) gets a
call of it (the first tool for ``required``) with the arguments ``{"echo": <answer>}``,
streamed in fragments, and ``finish_reason`` ``tool_calls``.

Standalone: ``python tests/fake_upstream.py --port 8900``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import select
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import quote, quote_plus, urlsplit

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
HANG_SECONDS = 60.0
SLOW_INTERVAL = 0.5
HELD_LIMIT = 30.0  # seconds a `held` request waits for release()
KEEPALIVE_INTERVAL = 0.2
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


@dataclass
class RecordedRequest:
    """One request as the fake saw it, updated while the response is written."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    raw_body: bytes
    shape: str | None
    mode: str | None  # the path segment, e.g. "ok", "503" or "sw-primary"
    response_usage: dict | None = None  # usage actually put on the wire
    chunks_sent: int = 0  # SSE data events sent, [DONE] included
    effective_mode: str | None = None  # mode after resolving "sw-<name>"
    client: tuple[str, int] | None = None  # client (host, port): keep-alive checks
    completed: bool = False  # the full response was written


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
class _Reply:
    """What the fake will answer, in whitespace-separated "tokens"."""

    words: list[str]
    reasoning: list[str]
    prompt_tokens: int
    cached: int
    finish_reason: str
    tool_call: dict | None = None  # {"id", "name", "arguments"} when a tool was forced

    @classmethod
    def plan(cls, shape: str, body: dict, knobs: dict) -> _Reply:
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


def _invalid(body: Any, bad_json: bool) -> str | None:
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


def _embedding_problem(shape: str, body: Any, bad_json: bool) -> str | None:
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


def _embeddings(shape: str, body: dict, with_usage: bool) -> dict:
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


def _completion(shape: str, model: str, reply: _Reply, with_usage: bool) -> dict:
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


_Event = tuple[bytes, dict | None]  # SSE event wire bytes, usage it carries


def _stream_events(
    shape: str, model: str, reply: _Reply, include_usage: bool, usage_early: bool = False
) -> list[_Event]:
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


class _Server(ThreadingHTTPServer):
    """Threaded server that can drop every open connection on stop."""

    daemon_threads = True
    block_on_close = False
    # socketserver's default backlog of 5 drops connections (the client sees a connect
    # timeout) when a load test opens dozens at once on a busy machine.
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], fake: FakeUpstream) -> None:
        super().__init__(address, _Handler)
        self.fake = fake
        self.stopping = threading.Event()
        self.conns: set[socket.socket] = set()
        self.conns_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.conns_lock:
            self.conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.conns_lock:
            self.conns.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Disconnects are the point of many fault tests; don't spam tracebacks.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """Serves one connection; ``rec``, ``shape`` and ``mode`` describe the request."""

    protocol_version = "HTTP/1.1"
    # Headers and body are separate writes: without TCP_NODELAY, Nagle plus the client's
    # delayed ACK adds ~40 ms to every keep-alive response.
    disable_nagle_algorithm = True
    server: _Server
    rec: RecordedRequest
    shape: str
    mode: str

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the default per-request stderr log."""

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    # -- plumbing ---------------------------------------------------------------

    def _read_body(self) -> bytes:
        if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        out = b""
        while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
            out += self.rfile.read(size)
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass  # trailers
        return out

    def _wait(self, seconds: float) -> bool:
        """Sleep, waking early (returning True) when the server is stopping."""
        return self.server.stopping.wait(seconds) if seconds > 0 else False

    def _headers(self, status: int, ctype: str, length: int | None, **extra) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        if length is None:
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Cache-Control", "no-cache")
        else:
            self.send_header("Content-Length", str(length))
        self.send_header("x-request-id", uuid.uuid4().hex)
        for name, value in extra.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()

    def _send_json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self._headers(status, "application/json", len(data))
        self.wfile.write(data)

    def _chunk(self, data: bytes) -> None:
        # wfile is unbuffered (wbufsize=0): one write = one chunk sent right away.
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _abort(self) -> None:
        """Close the TCP connection mid-exchange (FIN, no chunk terminator)."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _hang(self) -> None:
        """Send nothing until the client leaves, HANG_SECONDS pass or we stop."""
        self.close_connection = True
        deadline = time.monotonic() + HANG_SECONDS
        while time.monotonic() < deadline and not self.server.stopping.is_set():
            if select.select([self.connection], [], [], 0.1)[0]:
                try:
                    if not self.connection.recv(1, socket.MSG_PEEK):
                        return  # client closed
                except OSError:
                    return
                time.sleep(0.1)  # client sent more data; keep ignoring it

    def _leak(self, status: int) -> dict:
        """An error body echoing what a provider's text must never carry to the gateway's
        clients or logs: the key it was sent and its own address, in several spellings."""
        key = self.headers.get("Authorization", "").removeprefix("Bearer ")
        host, port = self.server.server_address[:2]
        url = f"http://{host}:{port}{self.path.removesuffix('/chat/completions')}"
        encoded = quote(key, safe="")
        text = (
            f"Key {key} ({key.upper()}, {encoded}, {encoded.lower()}, {quote(key)}, "
            f"{quote_plus(key)}) "
            f"is not valid on {host}:{port} (HTTPConnectionPool(host='{host}', port={port}); "
            f"host {host}), see {url} or {quote(url, safe='')}"
        )
        body = error_body(self.shape, status, text)
        body["error"]["code"] = f"{key.upper()}@{host}:{port}"
        return body

    # -- request handling -------------------------------------------------------

    def _handle(self) -> None:
        raw = self._read_body()
        parts = urlsplit(self.path).path.strip("/").split("/")
        shape = parts[0] if len(parts) >= 3 and parts[0] in SHAPES else None
        try:
            body, bad_json = (json.loads(raw) if raw else None), False
        except ValueError:
            body, bad_json = None, True
        self.rec = RecordedRequest(
            method=self.command,
            path=self.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            raw_body=raw,
            shape=shape,
            mode=parts[1] if shape else None,
            client=self.client_address[:2],
        )
        self.server.fake._record(self.rec)
        try:
            self._respond(body, bad_json)
        except OSError:  # client went away mid-response
            self.close_connection = True
            self.rec.completed = False

    def _respond(self, body: Any, bad_json: bool) -> None:
        fake, rec = self.server.fake, self.rec
        path = urlsplit(self.path).path
        endpoint = None
        if self.command == "POST" and path.endswith("/chat/completions"):
            endpoint = "chat"
        elif self.command == "POST" and path.endswith("/embeddings"):
            endpoint = "embeddings"
        elif self.command == "GET" and path.endswith("/models"):
            endpoint = "models"
        if rec.shape is None or rec.mode is None or endpoint is None:
            return self._send_json(404, error_body(None, 404, f"Not Found: {path}"))
        shape = self.shape = rec.shape
        mode = self.mode = rec.effective_mode = fake._resolve(rec.mode)
        if mode not in MODES:
            return self._send_json(404, error_body(shape, 404, f"No mode {mode!r}"))
        if self.headers.get("Authorization") != f"Bearer {fake.api_key}":
            tail = self.headers.get("Authorization", "")[-4:]
            ds = f"Authentication Fails, Your api key: ****{tail} is invalid"
            msg = ds if shape == "deepseek" else None  # others use their own wording
            return self._send_json(401, error_body(shape, 401, msg))
        if endpoint == "models":
            models = [{"id": m, "object": "model", "owned_by": shape} for m in MODELS[shape]]
            return self._send_plain({"object": "list", "data": models})
        if endpoint == "embeddings":
            if problem := _embedding_problem(shape, body, bad_json):
                return self._send_json(400, error_body(shape, 400, problem))
            return self._send_plain(_embeddings(shape, body, mode != "nousage"))
        if problem := _invalid(body, bad_json):
            return self._send_json(400, error_body(shape, 400, problem))
        knobs = body["fake"] if isinstance(body.get("fake"), dict) else {}
        try:
            reply = _Reply.plan(shape, body, knobs)
            delay = float(knobs.get("first_delay", 0))
            interval = float(knobs.get("interval", SLOW_INTERVAL if mode == "slow" else 0))
        except (TypeError, ValueError) as exc:  # a typo in a test's knobs
            return self._send_json(400, error_body(shape, 400, f"Bad 'fake': {exc}"))
        if knobs.get("held"):
            fake.released.wait(HELD_LIMIT)
        if body.get("stream") and mode in STREAM_MODES:
            opts = body.get("stream_options")
            asked = isinstance(opts, dict) and bool(opts.get("include_usage"))
            usage = asked and mode != "nousage"
            early = bool(knobs.get("usage_early"))
            events = _stream_events(shape, body["model"], reply, usage, early)
            return self._stream(events, delay, interval)
        payload = _completion(shape, body["model"], reply, mode != "nousage")
        prefix = b"\n\n" if shape == "deepseek" else b""  # DeepSeek's queue keep-alives
        return self._send_plain(payload, prefix, delay)

    def _send_plain(self, payload: dict, prefix: bytes = b"", delay: float = 0) -> None:
        """Send a Content-Length response: the payload, or the mode's fault."""
        mode, shape = self.mode, self.shape
        if self._wait(delay) or mode == "die-before-body":
            return self._abort()
        if mode == "hang":
            return self._hang()
        status, ctype, extra = 200, "application/json", {}
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
            data = json.dumps(self._leak(status)).encode()
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
        self._headers(status, ctype, len(data), **extra)
        if mode == "hang-after-headers":
            return self._hang()
        if mode == "die":
            self.wfile.write(data[: len(data) // 2])
            return self._abort()
        # Record before writing: the client may inspect the record as soon as it reads.
        if mode in ("ok", "slow", "nousage"):
            self.rec.response_usage = payload.get("usage")
        self.rec.completed = True
        self.wfile.write(data)

    def _stream(self, events: list[_Event], delay: float, interval: float) -> None:
        """Send SSE events as HTTP chunks, applying the stream fault modes."""
        mode, shape, rec = self.mode, self.shape, self.rec
        prefix = b"data:" if shape == "dashscope" else b"data: "
        if mode == "badjson":
            events = [events[0], (prefix + b"{not json}\n\n", None)]
        elif mode == "wrongshape":
            wrong = b'{"object": "chat.completion.chunk", "result": "hello"}\n\n'
            events = [(prefix + wrong, None)] * 2 + events[-1:]
        elif mode == "leak-stream":
            events = [*events[:2], (prefix + json.dumps(self._leak(500)).encode() + b"\n\n", None)]
        charset = "; charset=utf-8" if shape == "deepseek" else ""
        self._headers(200, "text/event-stream" + charset, None)
        if shape == "deepseek":
            self._chunk(b": keep-alive\n\n")
        deadline = time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0:
            step = min(KEEPALIVE_INTERVAL, left) if shape == "deepseek" else left
            if self._wait(step):
                return self._abort()
            if shape == "deepseek":
                self._chunk(b": keep-alive\n\n")
        complete = mode not in ("die", "hang-after-headers", "leak-stream")
        for i, (data, usage) in enumerate(events, 1):
            if rec.chunks_sent and self._wait(interval):
                return self._abort()
            # Record before writing: the client may look as soon as it has read.
            rec.chunks_sent += 1
            rec.response_usage = usage or rec.response_usage
            rec.completed = complete and i == len(events)
            self._chunk(data)
            if mode == "hang-after-headers":
                return self._hang()
            if mode == "die" and rec.chunks_sent >= 3:
                return self._abort()
        self.wfile.write(b"0\r\n\r\n")


class FakeUpstream:
    """A fake provider server on loopback; see the module docstring for URLs."""

    def __init__(
        self, host: str = "127.0.0.1", port: int = 0, api_key: str = "sk-fake-upstream"
    ) -> None:
        self.api_key = api_key
        self.requests: list[RecordedRequest] = []
        self.switches: dict[str, str] = {}
        self.released = threading.Event()  # `held` requests answer once it is set
        self._lock = threading.Lock()
        self._server = _Server((host, port), self)  # bind now so url is known
        self._thread: threading.Thread | None = None
        self.url = f"http://{host}:{self._server.server_address[1]}"

    def start(self) -> Self:
        """Serve in a daemon thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="fake-upstream",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop open connections, including hanging ones."""
        if self._server.stopping.is_set():
            return
        self._server.stopping.set()
        self.release()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
        with self._server.conns_lock:
            conns = list(self._server.conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def base_url(self, shape: str, mode: str = "ok") -> str:
        """The OpenAI base_url for a provider shape and mode."""
        return f"{self.url}/{shape}/{mode}/{BASE_PATHS[shape]}"

    def release(self) -> None:
        """Let the `held` requests (and any later ones, until reset) answer."""
        self.released.set()

    def reset(self) -> None:
        """Forget recorded requests (and so counts) and switches; hold `held` requests."""
        with self._lock:
            self.requests.clear()
            self.switches.clear()
            self.released.clear()

    def count(self, shape: str | None = None, mode: str | None = None) -> int:
        """How many requests reached the fake, filtered by shape and path mode."""
        with self._lock:
            return sum(
                1 for r in self.requests if shape in (None, r.shape) and mode in (None, r.mode)
            )

    def _record(self, rec: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(rec)

    def _resolve(self, mode: str) -> str:
        return self.switches.get(mode[3:], "ok") if mode.startswith("sw-") else mode


def main(argv: list[str] | None = None) -> None:
    """Serve until Ctrl-C so the gateway can be tried without provider accounts."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8900)
    parser.add_argument("--api-key", default="sk-fake-upstream")
    args = parser.parse_args(argv)
    fake = FakeUpstream(args.host, args.port, args.api_key).start()
    bases = ", ".join(fake.base_url(shape) for shape in SHAPES)
    print(f"Fake upstream at {fake.url} (key {fake.api_key}): base URLs {bases}")
    print(f"Replace 'ok' in a URL with one of: {', '.join(sorted(MODES))}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
