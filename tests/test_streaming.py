"""Streaming under real gunicorn, as the Procfile runs it, with both worker models
(gevent, the default, and gthread).

What only the production HTTP layer can show: chunks reach the client one by one as the
upstream sends them, a client that hangs up is noticed and metered within seconds, an
idle stream is kept alive with SSE comments, concurrent streams are each metered once,
and SIGTERM lets a stream in flight finish.
"""

from __future__ import annotations

import itertools
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from openai import OpenAI

from keymeai.ledger import keys
from keymeai.ledger.models import UsageRecord
from tests.helpers.fake_upstream import FakeUpstream, RecordedRequest
from tests.helpers.ledger import usage_records, wait_for_records
from tests.helpers.servers import Gunicorn

Start = Callable[..., Gunicorn]
Serve = Callable[[], "Served"]


def ask(content: str, model: str = "qwen-max", **fake: Any) -> dict[str, Any]:
    """A streamed chat request; `fake` holds the fake upstream's knobs."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "stream": True,
        "fake": fake,
    }


@dataclass
class Served:
    server: Gunicorn
    key: str
    client: OpenAI  # the official SDK with the key


@pytest.fixture(params=["gevent", "gthread"])
def serve(start_gunicorn: Start, ledger: None, request: pytest.FixtureRequest) -> Iterator[Serve]:
    """Start gunicorn (each worker model) on the test's config (edited first) with a key
    made in this process's ledger. The SDK clients are closed before gunicorn is stopped:
    idle keep-alive connections would make its graceful stop take seconds."""
    made: list[Served] = []

    def start() -> Served:
        server = start_gunicorn(env={"KEYMEAI_WORKER_CLASS": request.param})
        key = keys.create_key("streamer", "standard")[1]
        client = OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=20)
        made.append(Served(server, key, client))
        return made[-1]

    yield start
    for served in made:
        served.client.close()


def post_stream(served: Served, body: dict[str, Any]) -> requests.Response:
    response = requests.post(
        f"{served.server.url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {served.key}"},
        stream=True,
        timeout=20,
    )
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return response


def assert_metered_as_reported(record: UsageRecord, sent: RecordedRequest) -> None:
    assert sent.response_usage is not None
    assert record.prompt_tokens == sent.response_usage["prompt_tokens"]
    assert record.completion_tokens == sent.response_usage["completion_tokens"]
    assert record.outcome == "ok" and not record.estimated and record.stream


def test_chunks_flow_one_by_one(serve: Serve, upstream: FakeUpstream) -> None:
    """Each word reaches the client while the upstream is still sending the next ones
    (0.3 s apart): the upstream's progress is read as each word arrives."""
    served = serve()
    progress, text = [], ""
    for chunk in served.client.chat.completions.create(
        model="qwen-max",
        messages=[{"role": "user", "content": "ignored"}],
        stream=True,
        extra_body={"fake": {"words": 6, "interval": 0.3}},
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            sent = upstream.requests[0]
            progress.append((sent.chunks_sent, sent.completed))
            text += chunk.choices[0].delta.content
    assert text == "w1 w2 w3 w4 w5 w6"
    assert not progress[0][1], "the first word came after the upstream's whole answer"
    # Not bursts of buffered chunks: the words came at (nearly) as many points of the
    # upstream's progress (a busy machine may make the client miss one or two).
    assert len({sent for sent, _ in progress}) >= 4, progress
    assert_metered_as_reported(wait_for_records(1)[0], upstream.requests[0])


def test_client_that_hangs_up_is_metered_within_two_seconds(
    serve: Serve, upstream: FakeUpstream
) -> None:
    response = post_stream(serve(), ask("tell me a long story", words=30, interval=0.2))
    events = 0
    for line in response.iter_lines():
        events += line.startswith(b"data:")
        if events == 2:
            break
    response.close()
    closed = time.monotonic()
    records = wait_for_records(1, timeout=2.0)
    assert records, "no usage record 2 s after the client left"
    assert time.monotonic() - closed < 2.0
    record = records[0]
    assert (record.outcome, record.status, record.stream) == ("client_closed", 200, True)
    assert record.estimated
    assert record.prompt_tokens > 0 and record.completion_tokens > 0
    assert record.total_tokens == record.prompt_tokens + record.completion_tokens
    # The gateway hung up on the upstream too: it stops long before its 34 events.
    sent, seen = upstream.requests[0], -1
    while sent.chunks_sent != seen:
        seen = sent.chunks_sent
        time.sleep(0.5)  # over two of the upstream's intervals
    assert seen < 20 and not sent.completed
    assert len(usage_records()) == 1


def test_client_that_hangs_up_on_a_quiet_upstream_is_metered_within_two_seconds(
    serve: Serve, upstream: FakeUpstream, config_data: dict[str, Any]
) -> None:
    """With the default 10 s keep-alive no ping would be written for a while: the gateway
    notices the closed connection itself while it waits for the upstream."""
    assert config_data["gateway"]["stream_keepalive_seconds"] >= 10
    response = post_stream(serve(), ask("think hard", words=4, interval=8))
    for line in response.iter_lines():
        if line.startswith(b"data:"):
            break  # the first chunk; the next one is 8 s away
    response.close()
    closed = time.monotonic()
    records = wait_for_records(1, timeout=2.0)
    assert records and time.monotonic() - closed < 2.0, "not metered 2 s after the client left"
    assert records[0].outcome == "client_closed" and records[0].estimated


def test_idle_stream_gets_ping_comments(
    serve: Serve, config_data: dict[str, Any], upstream: FakeUpstream
) -> None:
    """Pings while the upstream is silent (DashScope between slow chunks) or queued
    (DeepSeek's own `: keep-alive` before the first chunk); the SDK ignores them."""
    config_data["gateway"]["stream_keepalive_seconds"] = 0.2
    served = serve()

    def wire(body: dict[str, Any]) -> list[tuple[float, bytes]]:
        with post_stream(served, body) as response:
            return [(time.monotonic(), line) for line in response.iter_lines() if line]

    def with_sdk() -> str:
        stream = served.client.chat.completions.create(
            model="qwen-max",
            messages=[{"role": "user", "content": "slow"}],
            stream=True,
            extra_body={"fake": {"interval": 0.6}},
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with ThreadPoolExecutor(3) as pool:
        slow = pool.submit(wire, ask("slow", interval=0.6))
        queued = pool.submit(wire, ask("queued", model="deepseek-chat", first_delay=1.0))
        parsed = pool.submit(with_sdk)
        slow_lines, queued_lines = slow.result(), queued.result()
    assert parsed.result() == "Echo: slow"
    for lines in (slow_lines, queued_lines):
        pings = [t for t, line in lines if line == b": ping"]
        assert len(pings) >= 3, lines
        assert lines[-1][1] == b"data: [DONE]"
        assert not any(line.startswith(b":") and line != b": ping" for _, line in lines)
    # Between two slow DashScope chunks (0.6 s apart) the client always gets a ping.
    kinds = [line.startswith(b"data:") for _, line in slow_lines]
    assert not any(a and b for a, b in itertools.pairwise(kinds)), slow_lines
    assert len(wait_for_records(3)) == 3


def test_concurrent_streams_are_each_metered_once(serve: Serve, upstream: FakeUpstream) -> None:
    client = serve().client
    count = 20

    def one(i: int) -> str:
        stream = client.chat.completions.create(
            model=["qwen-max", "deepseek-chat", "doubao-pro-32k"][i % 3],
            messages=[{"role": "user", "content": f"stream {i}"}],
            stream=True,
            extra_body={"fake": {"interval": 0.05}},
            extra_headers={"X-Request-Id": f"conc-{i}"},
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with ThreadPoolExecutor(count) as pool:
        texts = list(pool.map(one, range(count)))
    assert texts == [f"Echo: stream {i}" for i in range(count)]
    records = wait_for_records(count)
    assert sorted(r.request_id for r in records) == sorted(f"conc-{i}" for i in range(count))
    sent = {r.body["messages"][0]["content"]: r for r in upstream.requests}
    assert len(sent) == count
    for record in records:
        assert_metered_as_reported(record, sent[f"stream {record.request_id[5:]}"])
    time.sleep(0.3)
    assert len(usage_records()) == count  # and nothing more turned up later


# The gevent worker's case, with more checks (no new connections, the stream outlived the
# signal): test_gunicorn.py::test_sigterm_lets_an_in_flight_stream_finish_and_record.
@pytest.mark.parametrize("serve", ["gthread"], indirect=True)
def test_sigterm_lets_a_stream_in_flight_finish(serve: Serve, upstream: FakeUpstream) -> None:
    served = serve()
    stream = served.client.chat.completions.create(
        model="deepseek-chat",
        messages=[{"role": "user", "content": "finish me"}],
        stream=True,
        extra_body={"fake": {"words": 5, "interval": 0.25}},
    )
    text = ""
    signalled = threading.Event()
    for chunk in stream:
        text += (chunk.choices[0].delta.content or "") if chunk.choices else ""
        if text and not signalled.is_set():
            assert served.server.process is not None
            served.server.process.send_signal(signal.SIGTERM)
            signalled.set()
    assert signalled.is_set()
    assert text == "w1 w2 w3 w4 w5"
    assert served.server.process is not None and served.server.process.wait(timeout=30) == 0
    assert_metered_as_reported(wait_for_records(1)[0], upstream.requests[0])
