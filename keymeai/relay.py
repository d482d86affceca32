"""Relaying the upstream's answer to the client, metering it on the way.

One path for both kinds of answer: every completion body or stream chunk goes through
the meter (usage, text for estimates), and the meter is finished exactly once however
the relay ends. Stream chunks are passed on as the upstream sent them, one write each,
re-serialised only when the usage the client did not ask for must be taken out.
"""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from typing import Any

from flask import Response

from . import metrics
from .errors import ApiError
from .metering import Meter
from .sse import EventReader, UpstreamEnded, UpstreamFailed
from .upstream import Opened, UpstreamModelError
from .validation import ChatRequest

PING = b": ping\n\n"
DONE = b"data: [DONE]\n\n"
# What a client sees when the upstream dies mid-stream: OpenAI's error shape, which the
# openai SDK raises as an APIError.
STREAM_FAILED = (
    b"event: error\ndata: "
    + json.dumps(
        ApiError(
            500,
            "The upstream model stopped responding before the answer was complete.",
            type="server_error",
            code="upstream_stream_failed",
        ).body()
    ).encode()
    + b"\n\n"
)


class _BrokenChunk(Exception):
    """A stream event that is not a chat completion chunk."""


def relay(opened: Opened, chat: ChatRequest, meter: Meter, keepalive: float) -> Response:
    """The client's response: the checked completion, or the stream of chunks."""
    if opened.events is None:
        assert opened.completion is not None
        meter.observe(opened.completion)
        meter.finish(200, "ok")
        return Response(opened.raw_body, mimetype="application/json")
    stream = ChunkRelay(opened.events, chat, meter, keepalive)
    try:
        first = stream.frame(opened.first_event)
    except _BrokenChunk as exc:
        opened.events.close()
        meter.finish(500, "upstream_error")
        raise UpstreamModelError(str(exc)) from None
    response = Response(stream.run(first), mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # tell nginx-style proxies not to buffer
    response.call_on_close(stream.close)  # runs even if the body was never iterated
    return response


class ChunkRelay:
    """Frames upstream events for the client and meters them."""

    def __init__(self, events: EventReader, chat: ChatRequest, meter: Meter, keepalive: float):
        self.events = events
        self.chat = chat
        self.meter = meter
        self.keepalive = keepalive
        self.saw_done = False
        self.saw_finish = False

    def frame(self, event: bytes | None) -> bytes | None:
        """The bytes to send for one upstream event (None: nothing to send)."""
        if event is None:
            return PING  # the upstream's own keep-alive comment
        if event.strip() == b"[DONE]":
            self.saw_done = True
            return DONE
        try:
            chunk: Any = json.loads(event)
        except ValueError:
            raise _BrokenChunk("stream event is not JSON") from None
        if not isinstance(chunk, dict):
            raise _BrokenChunk("stream event is not a JSON object")
        if "error" in chunk and "choices" not in chunk:
            raise _BrokenChunk(f"upstream error mid-stream: {str(chunk['error'])[:200]}")
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            raise _BrokenChunk("stream chunk without choices")
        self.meter.observe(chunk)
        if any(isinstance(c, dict) and c.get("finish_reason") for c in choices):
            self.saw_finish = True
        if chunk.get("usage") is not None and not self.chat.include_usage:
            if not choices:
                return None  # a usage-only chunk the client did not ask for
            del chunk["usage"]
            event = json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode()
        return b"data: " + event + b"\n\n"

    def run(self, first: bytes | None) -> Iterator[bytes]:
        """Relay events until the upstream ends; meter once, however it ends.

        The record is written before the client sees the end of the stream, so a client
        that reads its usage right after `[DONE]` finds it in the ledger.
        """
        metrics.STREAMS.inc()
        try:
            data = first
            while True:
                if self.saw_done:
                    self.meter.finish(200, "ok")
                if data is not None:
                    yield data
                try:
                    event = self.events.get(timeout=self.keepalive)
                except queue.Empty:
                    data = PING  # an idle upstream: a dead client shows up on this write
                    continue
                if isinstance(event, UpstreamEnded | UpstreamFailed):
                    break
                try:
                    data = self.frame(event)
                except _BrokenChunk:
                    event = UpstreamFailed("broken chunk")
                    break
            if self.saw_done:
                return
            if self.saw_finish and isinstance(event, UpstreamEnded):
                self.meter.finish(200, "ok")  # complete, but the upstream sent no [DONE]
                yield DONE
            else:
                self.meter.finish(200, "upstream_failed")
                yield STREAM_FAILED
        finally:
            metrics.STREAMS.dec()
            self.events.close()
            self.meter.finish(200, "client_closed")  # a no-op unless the client left

    def close(self) -> None:
        """Backstop for a body that was never iterated: stop reading, meter once."""
        self.events.close()
        self.meter.finish(200, "client_closed")
