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

Standalone: ``python tests/fake_upstream.py --port 8900`` (that script is its command line).
"""

from __future__ import annotations

import contextlib
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
from urllib.parse import urlsplit

from tests.helpers.fake_replies import (
    BASE_PATHS,
    MODELS,
    MODES,
    SHAPES,
    STREAM_MODES,
    Event,
    Reply,
    chat_problem,
    completion,
    embedding_problem,
    embeddings,
    error_body,
    leak_body,
    plain_reply,
    stream_events,
)

HANG_SECONDS = 60.0
SLOW_INTERVAL = 0.5
HELD_LIMIT = 30.0  # seconds a `held` request waits for release()
KEEPALIVE_INTERVAL = 0.2


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
    # Every read and write on the connection gives up after this long, so no thread waits
    # forever on a client that went quiet (an idle keep-alive connection is then closed).
    timeout = 2 * HANG_SECONDS
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
        """An error body echoing the key this request was sent and the fake's address."""
        host, port = self.server.server_address[:2]
        key = self.headers.get("Authorization", "").removeprefix("Bearer ")
        return leak_body(self.shape, status, key, str(host), int(port), self.path)

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
            if problem := embedding_problem(shape, body, bad_json):
                return self._send_json(400, error_body(shape, 400, problem))
            return self._send_plain(embeddings(shape, body, mode != "nousage"))
        if problem := chat_problem(body, bad_json):
            return self._send_json(400, error_body(shape, 400, problem))
        knobs = body["fake"] if isinstance(body.get("fake"), dict) else {}
        try:
            reply = Reply.plan(shape, body, knobs)
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
            events = stream_events(shape, body["model"], reply, usage, early)
            return self._stream(events, delay, interval)
        payload = completion(shape, body["model"], reply, mode != "nousage")
        prefix = b"\n\n" if shape == "deepseek" else b""  # DeepSeek's queue keep-alives
        return self._send_plain(payload, prefix, delay)

    def _send_plain(self, payload: dict, prefix: bytes = b"", delay: float = 0) -> None:
        """Send a Content-Length response: the payload, or the mode's fault."""
        mode, shape = self.mode, self.shape
        if self._wait(delay) or mode == "die-before-body":
            return self._abort()
        if mode == "hang":
            return self._hang()
        status, ctype, data, extra = plain_reply(shape, mode, payload, prefix, self._leak)
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

    def _stream(self, events: list[Event], delay: float, interval: float) -> None:
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
