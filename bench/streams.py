"""Stream clients that timestamp every chunk: first-chunk latency, relay delay, capacity.

The fake upstream stamps each content chunk with its send time (`"content":"t<ns> "`,
CLOCK_MONOTONIC), so `arrival - stamp` is the delay the path added to that chunk.
`timed_streams` runs streams one after another on plain sockets (TTFC, per-chunk delay,
and whether chunks that were sent apart arrived batched in one read); `hold_streams`
holds N slow streams at once on asyncio sockets, cheap enough for 1,000 connections.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from dataclasses import dataclass, field

STAMP_RE = re.compile(rb'"content":"t(\d+) ')


def request_bytes(port: int, body: bytes, key: str | None, keep_alive: bool = False) -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    connection = "" if keep_alive else "Connection: close\r\n"
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{auth}"
        f"{connection}\r\n"
    )
    return head.encode() + body


class _Events:
    """Splits a raw HTTP/chunked SSE byte stream into events; chunk framing is ignored
    because only the status line, the stamps and `[DONE]` matter."""

    def __init__(self) -> None:
        self.buffer = b""
        self.status = b""
        self.done = False
        self.ended = False  # the chunked body's last chunk came: the connection is free

    def feed(self, data: bytes) -> list[int]:
        """The send stamps (ns) of the content events completed by `data`."""
        self.ended = (self.buffer[-8:] + data).endswith(b"\r\n0\r\n\r\n")
        self.buffer += data
        if not self.status and b"\r\n" in self.buffer:
            self.status = self.buffer.split(b"\r\n", 1)[0]
        *events, self.buffer = self.buffer.split(b"\n\n")
        stamps = []
        for event in events:
            match = STAMP_RE.search(event)
            if match:
                stamps.append(int(match.group(1)))
            elif b"[DONE]" in event:
                self.done = True
        return stamps

    @property
    def ok(self) -> bool:
        return self.status.startswith(b"HTTP/1.1 200") and self.done


@dataclass
class StreamStats:
    """Aggregates over streams, in microseconds."""

    ttfc_us: list[float] = field(default_factory=list)
    delays_us: list[float] = field(default_factory=list)
    batched_reads: int = 0  # reads that brought two or more chunks sent apart
    errors: dict[str, int] = field(default_factory=dict)
    streams: int = 0
    peak_open: int = 0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def timed_streams(port: int, body: bytes, key: str | None, count: int) -> StreamStats:
    """`count` streams one at a time on one keep-alive connection, as an SDK client
    would: each content chunk's delay, and the time to the first one (TTFC)."""
    stats = StreamStats()
    payload = request_bytes(port, body, key, keep_alive=True)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            stats.streams += 1
            events = _Events()
            sent = time.monotonic_ns()
            sock.sendall(payload)
            first = True
            while not events.ended:
                data = sock.recv(65536)
                now = time.monotonic_ns()
                if not data:
                    break
                stamps = events.feed(data)
                if stamps and first:
                    stats.ttfc_us.append((now - sent) / 1000)
                    first = False
                stats.delays_us.extend((now - s) / 1000 for s in stamps)
                if len(stamps) > 1 and stamps[-1] - stamps[0] > 1_000_000:
                    stats.batched_reads += 1
            if not events.ok:
                stats.error("incomplete" if events.status.startswith(b"HTTP/1.1 200") else "status")
                break  # the connection's state is unknown
    return stats


async def _hold_one(
    port: int, payload: bytes, deadline: float, stats: StreamStats, open_now: list[int]
) -> None:
    events = _Events()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        stats.error("connect")
        return
    sent = time.monotonic_ns()
    writer.write(payload)
    first = True
    try:
        while not events.done:
            remaining = deadline - time.monotonic()
            data = await asyncio.wait_for(reader.read(65536), max(0.01, remaining))
            now = time.monotonic_ns()
            if not data:
                break
            stamps = events.feed(data)
            if stamps and first:
                first = False
                stats.ttfc_us.append((now - sent) / 1000)
                open_now[0] += 1
                stats.peak_open = max(stats.peak_open, open_now[0])
            stats.delays_us.extend((now - s) / 1000 for s in stamps)
    except TimeoutError:
        stats.error("timeout")
        return
    except OSError:
        stats.error("reset")
        return
    finally:
        if not first:
            open_now[0] -= 1
        writer.close()
    if not events.ok:
        stats.error("incomplete" if events.status.startswith(b"HTTP/1.1 200") else "status")


async def _hold(
    port: int, body: bytes, key: str | None, count: int, seconds: float, ramp: float
) -> StreamStats:
    stats = StreamStats(streams=count)
    payload = request_bytes(port, body, key)
    open_now = [0]
    tasks = []
    for i in range(count):
        # Each stream must end within its own schedule plus a grace period.
        deadline = time.monotonic() + seconds + 10
        tasks.append(asyncio.create_task(_hold_one(port, payload, deadline, stats, open_now)))
        await asyncio.sleep(ramp / count if i < count - 1 else 0)
    await asyncio.gather(*tasks)
    return stats


def hold_streams(
    port: int, body: bytes, key: str | None, count: int, seconds: float, ramp: float
) -> StreamStats:
    """`count` slow streams opened over `ramp` seconds and held to their end."""
    return asyncio.run(_hold(port, body, key, count, seconds, ramp))
