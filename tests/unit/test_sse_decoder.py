"""The SSE decoder (keymeai.api.sse): providers' framings, read boundaries anywhere."""

from __future__ import annotations

import json

import pytest
import requests
import urllib3

from keymeai.api.sse import MAX_EVENT_BYTES, READ_SIZE, EventTooLarge, SSEDecoder, describe_error

Events = list[bytes | None]


def decode(*reads: bytes) -> Events:
    """Every event of a stream that arrived in `reads`, the end included."""
    decoder = SSEDecoder()
    events = [event for read in reads for event in decoder.feed(read)]
    return events + decoder.finish()


def data(events: Events) -> list[bytes]:
    """The data payloads alone (keep-alive comments dropped)."""
    return [event for event in events if event is not None]


CHUNK = {"id": "c1", "choices": [{"index": 0, "delta": {"content": "你好, world"}}]}
PAYLOAD = json.dumps(CHUNK, ensure_ascii=False).encode()
# A DeepSeek stream whose request was queued: blank lines and keep-alive comments first.
DEEPSEEK = b"\n\n: keep-alive\n\n: keep-alive\n\ndata: " + PAYLOAD + b"\n\ndata: [DONE]\n\n"
# DashScope: no space after the colon.
DASHSCOPE = b"data:" + PAYLOAD + b"\n\ndata:[DONE]\n\n"
# The same with CRLF line ends, a multi-line event and fields the gateway ignores.
CRLF = (
    b': hello\r\n\r\nid: 7\r\nevent: message\r\nretry: 100\r\ndata: {"a":\r\ndata: 1}\r\n\r\n'
    b"data: " + PAYLOAD + b"\r\n\r\ndata: [DONE]\r\n\r\n"
)
STREAMS = {"deepseek": DEEPSEEK, "dashscope": DASHSCOPE, "crlf": CRLF}
EXPECTED = {
    "deepseek": [PAYLOAD, b"[DONE]"],
    "dashscope": [PAYLOAD, b"[DONE]"],
    "crlf": [b'{"a":\n1}', PAYLOAD, b"[DONE]"],
}


@pytest.mark.parametrize("name", STREAMS)
def test_each_framing_decodes_to_its_payloads(name: str) -> None:
    events = decode(STREAMS[name])
    assert data(events) == EXPECTED[name]
    if name != "dashscope":  # the comment before the first event is reported, first
        assert events[0] is None


@pytest.mark.parametrize("name", STREAMS)
def test_a_read_boundary_at_any_byte_changes_nothing(name: str) -> None:
    stream = STREAMS[name]
    for cut in range(len(stream) + 1):
        assert data(decode(stream[:cut], stream[cut:])) == EXPECTED[name], cut
    assert data(decode(*(stream[i : i + 1] for i in range(len(stream))))) == EXPECTED[name]


def test_events_come_out_as_soon_as_their_blank_line_arrives() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: one\n") == []
    assert decoder.feed(b"\ndata: two") == [b"one"]
    assert decoder.feed(b"\r") == []  # the CR of a CRLF split from its LF
    assert decoder.feed(b"\n\r\n") == [b"two"]
    assert decoder.finish() == []


def test_each_read_of_keep_alives_is_a_sign_of_life() -> None:
    """A comment yields None (read_timeout restarts): once per read, however many."""
    decoder = SSEDecoder()
    assert decoder.feed(b": keep-alive\n\n") == [None]
    assert decoder.feed(b": keep-alive\n\n: keep-alive\n\n") == [None]
    assert decoder.feed(b"data: x\n\n: keep-alive\n\n") == [b"x", None]
    assert decoder.feed(b"\n\n\n") == []  # blank lines alone are nothing


def test_a_stream_cut_without_its_last_blank_line_still_yields_its_event() -> None:
    assert decode(b"data: last") == [b"last"]
    assert decode(b"data: last\r") == [b"last"]
    assert decode(b"data: a\ndata: b\n") == [b"a\nb"]
    assert decode(b"") == []
    assert decode(b": bye") == [None]


def test_only_one_space_after_the_colon_is_framing() -> None:
    assert decode(b"data:  two spaces\n\n") == [b" two spaces"]
    assert decode(b"data:\n\n") == [b""]  # an empty data line is an (empty) event
    assert decode(b"data: a: b\n\n") == [b"a: b"]


def test_lines_are_not_bounded_a_large_event_arrives_whole() -> None:
    """DashScope without incremental output repeats the whole text in every chunk: an
    event may span many reads; the decoder keeps it whole (it does not cut lines)."""
    text = "长" * (3 * READ_SIZE)
    line = b"data: " + json.dumps({"t": text}, ensure_ascii=False).encode() + b"\n\n"
    reads = [line[i : i + READ_SIZE] for i in range(0, len(line), READ_SIZE)]
    assert len(reads) > 9
    (event,) = decode(*reads)
    assert json.loads(event)["t"] == text


def test_describe_error_names_the_classes_never_the_messages() -> None:
    url = "https://secret-host.example:8443/v1"
    inner = urllib3.exceptions.ReadTimeoutError(None, url, f"read timed out at {url}")  # type: ignore[arg-type]
    error = requests.ConnectionError(inner)
    assert describe_error(error) == "ConnectionError: ReadTimeoutError"
    retries = urllib3.exceptions.MaxRetryError(None, url, reason=OSError("refused"))  # type: ignore[arg-type]
    assert describe_error(requests.ConnectionError(retries)) == (
        "ConnectionError: MaxRetryError: OSError"
    )
    assert describe_error(ValueError(f"bad {url}")) == "ValueError"


def test_describe_error_stops_after_four_causes() -> None:
    error: BaseException = KeyError("innermost")
    for _ in range(6):
        error = RuntimeError(error)
    assert describe_error(error) == "RuntimeError: RuntimeError: RuntimeError: RuntimeError"


def test_a_line_past_the_bound_ends_the_stream_as_the_upstreams_fault() -> None:
    decoder = SSEDecoder()
    piece = b"x" * READ_SIZE
    with pytest.raises(EventTooLarge):
        for _ in range(MAX_EVENT_BYTES // READ_SIZE + 1):
            decoder.feed(piece)  # one line that never ends
    assert describe_error(EventTooLarge("big")) == "EventTooLarge"


def test_an_event_of_many_lines_past_the_bound_is_refused_too() -> None:
    line = b"data: " + b"y" * (1024 * 1024) + b"\n"
    decoder = SSEDecoder()
    with pytest.raises(EventTooLarge):
        for _ in range(MAX_EVENT_BYTES // (1024 * 1024) + 1):
            decoder.feed(line)  # data lines of one event: no blank line between them


def test_a_large_event_within_the_bound_arrives_whole() -> None:
    payload = b'{"choices": [{"delta": {"content": "' + b"z" * (4 * 1024 * 1024) + b'"}}]}'
    raw = b"data: " + payload + b"\n\n"
    reads = [raw[i : i + READ_SIZE] for i in range(0, len(raw), READ_SIZE)]
    assert data(decode(*reads)) == [payload]
