"""A fast fake OpenAI-style provider for the benchmark: raw asyncio, one process.

tests/helpers/fake_upstream.py is a stdlib http.server, far too slow to load-test a gateway
against; this one parses just enough HTTP/1.1 (keep-alive, Content-Length bodies) to
answer `POST .../chat/completions` with a fixed completion, or with an SSE stream in
chunked encoding that ends with a usage chunk and `[DONE]`, as DashScope and Ark do.

Knobs ride in the request body (the gateway passes unknown fields through), read with
a regex rather than a JSON parse: `"bench_chunks": N` content chunks, one every
`"bench_interval_ms": M` on a fixed schedule (chunk i at start + i*M, not drifting).
Each content chunk carries its send time as `"content":"t<monotonic_ns> "`, so a client
on this machine can tell the relay delay of every chunk (CLOCK_MONOTONIC is one clock
for all processes on Linux). `GET /stats` reports requests served and how late the
sends ran against their schedule (the fake's own lag); `GET /stats?reset=1` zeroes it.

Run: python bench/fastfake.py --port 0 --port-file PATH  (prints/writes the port).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import time
from pathlib import Path

STREAM_RE = re.compile(rb'"stream"\s*:\s*true')
CHUNKS_RE = re.compile(rb'"bench_chunks"\s*:\s*(\d+)')
INTERVAL_RE = re.compile(rb'"bench_interval_ms"\s*:\s*(\d+)')
USAGE = {"prompt_tokens": 12, "completion_tokens": 40, "total_tokens": 52}
COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1735689600,
        "model": "deepseek-chat",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello! " * 24},
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    }
).encode()
JSON_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
CHUNK_PREFIX = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1735689600,'
)
CONTENT = CHUNK_PREFIX + b'"model":"m","choices":[{"index":0,"delta":{"content":"t%d "},'
CONTENT_END = b'"finish_reason":%s}]}\n\n'
USAGE_EVENT = (
    CHUNK_PREFIX + b'"model":"m","choices":[],"usage":' + json.dumps(USAGE).encode() + b"}\n\n"
)
DONE_EVENT = b"data: [DONE]\n\n"
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


def http_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Stats:
    """Requests served and the lag of scheduled stream sends (the fake's own delay)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.streams = 0
        self.lags_us: list[int] = []

    def report(self) -> bytes:
        lags = sorted(self.lags_us)
        pick = lags[min(len(lags) - 1, int(len(lags) * 0.99))] if lags else 0
        body = {
            "requests": self.requests,
            "streams": self.streams,
            "scheduled_sends": len(lags),
            "send_lag_p99_us": pick,
            "send_lag_max_us": lags[-1] if lags else 0,
        }
        return json.dumps(body).encode()


STATS = Stats()


class Provider(asyncio.Protocol):
    """One client connection: requests in order, answered as they complete."""

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.timers: list[asyncio.TimerHandle] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in self.timers:
            timer.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            length = 0
            lowered = head.lower()
            at = lowered.find(b"content-length:")
            if at >= 0:
                line_end = lowered.find(b"\r\n", at)
                length = int(lowered[at + 15 : line_end if line_end >= 0 else None])
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            self.answer(head[: head.find(b"\r\n")] if b"\r\n" in head else head, body)

    def answer(self, request_line: bytes, body: bytes) -> None:
        assert self.transport is not None
        method, _, rest = request_line.partition(b" ")
        path = rest.partition(b" ")[0]
        if method == b"POST" and path.endswith(b"/chat/completions"):
            STATS.requests += 1
            if STREAM_RE.search(body):
                self.stream(body)
            else:
                self.transport.write(JSON_HEAD % len(COMPLETION) + COMPLETION)
        elif path.startswith(b"/stats"):
            report = STATS.report()
            if b"reset=1" in path:
                STATS.reset()
            self.transport.write(JSON_HEAD % len(report) + report)
        else:
            self.transport.write(NOT_FOUND)

    def stream(self, body: bytes) -> None:
        STATS.streams += 1
        chunks_match = CHUNKS_RE.search(body)
        interval_match = INTERVAL_RE.search(body)
        chunks = int(chunks_match.group(1)) if chunks_match else 5
        interval_ns = int(interval_match.group(1)) * 1_000_000 if interval_match else 0
        assert self.transport is not None
        if interval_ns == 0:
            events = [self.content(i, chunks) for i in range(chunks)]
            self.transport.write(SSE_HEAD + b"".join(http_chunk(e) for e in events) + self.tail())
            return
        self.transport.write(SSE_HEAD + http_chunk(self.content(0, chunks)))
        loop = asyncio.get_running_loop()
        start = time.monotonic_ns()
        for i in range(1, chunks):
            due = start + i * interval_ns
            self.timers.append(loop.call_at(due / 1e9, self.send_scheduled, i, chunks, due))

    def send_scheduled(self, i: int, chunks: int, due_ns: int) -> None:
        if self.transport is None:
            return
        STATS.lags_us.append((time.monotonic_ns() - due_ns) // 1000)
        data = http_chunk(self.content(i, chunks))
        if i == chunks - 1:
            data += self.tail()
            self.timers.clear()
        self.transport.write(data)

    @staticmethod
    def content(i: int, chunks: int) -> bytes:
        finish = b'"stop"' if i == chunks - 1 else b"null"
        return CONTENT % time.monotonic_ns() + CONTENT_END % finish

    @staticmethod
    def tail() -> bytes:
        return http_chunk(USAGE_EVENT) + http_chunk(DONE_EVENT) + b"0\r\n\r\n"


async def serve(port: int, port_file: str | None) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Provider, "127.0.0.1", port, backlog=4096)
    bound = server.sockets[0].getsockname()[1]
    if port_file:
        Path(port_file).write_text(str(bound))
    print(f"fastfake listening on 127.0.0.1:{bound}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.port_file))


if __name__ == "__main__":
    main()
