"""Routing order, failover and cooldowns (keymeai.api.upstream.Router), without a network.

Each provider's client is replaced by a fake that answers from a script, in memory; the
breakers run on a clock the tests move. `chat` is served by `first` then `second`,
`solo` by `first` alone (tests/unit/build.py); failure_threshold 2, cooldown 30 s.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import pytest
import requests
import urllib3

from keymeai.api.embeddings import parse_embedding_request
from keymeai.api.upstream import Router, UpstreamModelError
from keymeai.api.validation import ChatRequest, parse_chat_request
from keymeai.errors import ApiError
from tests.unit.build import ENV, config, config_data, meter

COOLDOWN = 30.0
COMPLETION = {"id": "c", "choices": [{"index": 0, "message": {"content": "hi"}}]}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def response(status: int, body: Any = COMPLETION, content_type: str = "application/json") -> Any:
    """A `requests.Response` whose body is read from memory."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    answer = requests.Response()
    answer.status_code = status
    answer.headers["Content-Type"] = content_type
    answer.raw = urllib3.HTTPResponse(body=io.BytesIO(raw), status=status, preload_content=False)
    return answer


Script = Callable[[], Any]  # a response, or raises what requests would


def ok() -> Any:
    return response(200)


def refused() -> Any:
    raise requests.ConnectionError(OSError("connection refused"))


class FakeClient:
    """Stands in for a provider's ProviderClient: `script()` answers each post."""

    def __init__(self, script: Script = ok) -> None:
        self.script = script
        self.posts: list[tuple[str, dict[str, Any]]] = []

    def post(self, body: bytes, path: str = "/chat/completions") -> Any:
        self.posts.append((path, json.loads(body)))
        return self.script()

    def close(self) -> None:
        pass


class Setup:
    def __init__(self, data: dict[str, Any] | None = None, env: dict[str, str] = ENV) -> None:
        self.clock = Clock()
        self.config = config(data, env)
        self.router = Router(self.config, clock=self.clock)
        self.first, self.second = FakeClient(), FakeClient()
        self.router.clients.update(first=self.first, second=self.second)  # type: ignore[dict-item]

    def request(self, model: str = "chat", **body: Any) -> ChatRequest:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **body}
        return parse_chat_request(body, self.config.model_names)

    def open(self, model: str = "chat", **body: Any) -> tuple[str, int]:
        """Which provider served, after how many attempts."""
        m = meter(self.request(model, **body))
        self.router.open(m.chat, m)
        assert m.upstream is not None
        return m.upstream.provider, m.attempts

    def refused_with(self, model: str = "chat") -> ApiError:
        chat = self.request(model)
        with pytest.raises(ApiError) as caught:
            self.router.open(chat, meter(chat))
        return caught.value

    def counts(self) -> tuple[int, int]:
        return len(self.first.posts), len(self.second.posts)


@pytest.fixture
def s() -> Setup:
    return Setup()


def test_upstreams_are_tried_in_order(s: Setup) -> None:
    assert s.open() == ("first", 1)
    s.first.script = refused
    assert s.open() == ("second", 2)
    assert s.counts() == (2, 1)


def test_the_upstream_gets_its_own_model_name_and_streams_ask_for_usage(s: Setup) -> None:
    s.open("chat-latest", temperature=0.5)  # an alias reaches the model
    path, sent = s.first.posts[-1]
    assert (path, sent["model"], sent["temperature"]) == ("/chat/completions", "first-chat", 0.5)
    assert "stream_options" not in sent
    s.first.script = lambda: response(200, b"", "text/event-stream")  # no event: next one
    s.second.script = lambda: response(200, b": keep-alive\n\n", "text/event-stream")
    chat = s.request(stream=True, stream_options={"include_usage": False, "x": 1})
    opened = s.router.open(chat, meter(chat))
    assert opened.first_event is None and opened.events is not None  # the comment counts
    opened.events.close()
    assert s.second.posts[-1][1]["stream_options"] == {"include_usage": True, "x": 1}
    assert chat.body["stream_options"] == {"include_usage": False, "x": 1}  # left as it was


def test_after_the_threshold_an_upstream_is_skipped_until_its_cooldown_ends(s: Setup) -> None:
    s.first.script = refused
    for _ in range(2):
        assert s.open() == ("second", 2)
    assert s.open() == ("second", 1)  # open: first costs nothing now
    s.clock.now += COOLDOWN - 0.01
    assert s.open() == ("second", 1)
    assert s.counts() == (2, 4)
    s.clock.now += 0.01
    assert s.open() == ("second", 2)  # the probe fails...
    assert s.open() == ("second", 1)  # ...and it is open again at once
    s.clock.now += COOLDOWN
    s.first.script = ok
    assert s.open() == ("first", 1)  # the probe succeeds: first serves again
    assert s.open() == ("first", 1)
    assert s.counts() == (5, 6)


def test_when_all_cool_down_the_one_whose_cooldown_ends_first_is_tried() -> None:
    data = config_data()
    data["routing"]["failure_threshold"] = 1
    s = Setup(data)
    s.first.script = refused
    assert s.open() == ("second", 2)  # first opens until t0 + 30
    s.clock.now += 10
    s.second.script = refused
    assert s.refused_with().status == 503  # second opens until t0 + 40
    assert s.counts() == (1, 2)
    s.clock.now += 10
    error = s.refused_with()  # both cooling down: first's ends sooner
    assert s.counts() == (2, 2)
    # first now reopens until t0 + 50, second until t0 + 40: 20 s from now
    assert (error.code, error.headers["Retry-After"]) == ("upstream_unavailable", "20")
    s.clock.now += 1
    s.refused_with()
    assert s.counts() == (2, 3)  # second's ended sooner this time


def test_a_models_last_upstream_is_always_tried(s: Setup) -> None:
    s.first.script = refused
    for _ in range(2):
        s.refused_with("solo")
    s.first.script = ok
    assert s.open("solo") == ("first", 1)  # open, yet tried: it serves again at once
    assert len(s.first.posts) == 3


@pytest.mark.parametrize(("cooldown", "retry_after"), [(0.2, "1"), (7.5, "8"), (1000, "30")])
def test_retry_after_is_the_cooldown_left_between_1_and_30(
    cooldown: float, retry_after: str
) -> None:
    data = config_data()
    data["routing"] = {"failure_threshold": 1, "cooldown_seconds": cooldown}
    s = Setup(data)
    s.first.script = refused
    assert s.refused_with("solo").headers["Retry-After"] == retry_after


def timed_out() -> Any:
    raise requests.ReadTimeout("read timed out")


FAILOVERS: dict[str, tuple[Script, bool]] = {  # the answer, and whether the request streams
    "429": (lambda: response(429, {"error": {"message": "slow down"}}), False),
    "500": (lambda: response(500, b"<html>oops</html>"), False),
    "503": (lambda: response(503, b""), False),
    "401": (lambda: response(401, {"error": {"code": "invalid_api_key"}}), False),
    "arrearage": (lambda: response(400, {"error": {"code": "Arrearage", "message": "pay"}}), False),
    "quota": (lambda: response(400, {"code": "insufficient_quota"}), False),
    "refused": (refused, False),
    "timeout": (timed_out, True),
    "empty-stream": (lambda: response(200, b"", "text/event-stream"), True),
}


@pytest.mark.parametrize(("answer", "stream"), FAILOVERS.values(), ids=FAILOVERS)
def test_upstream_side_failures_fail_over(s: Setup, answer: Script, stream: bool) -> None:
    s.first.script = answer
    s.second.script = lambda: response(200, b"data: {}\n\n", "text/event-stream")
    if not stream:
        s.second.script = ok
    assert s.open(stream=stream) == ("second", 2)
    assert s.router.routes["chat"][0].breaker.failures == 1


@pytest.mark.parametrize("status", [400, 413, 422])
def test_a_complaint_about_the_request_is_the_clients_400_scrubbed(s: Setup, status: int) -> None:
    s.first.script = refused
    s.open()  # one failure on the first's breaker
    message = f"bad temperature (key {ENV['FIRST_KEY']} at https://first.example/v1)"
    s.first.script = lambda: response(status, {"error": {"message": message}})
    error = s.refused_with()
    assert (error.status, error.type) == (400, "invalid_request_error")
    assert error.message.startswith("Upstream rejected the request: bad temperature")
    assert ENV["FIRST_KEY"] not in error.message and "first.example" not in error.message
    assert s.counts() == (2, 1)  # no failover: the next upstream would refuse it too
    assert s.router.routes["chat"][0].breaker.failures == 0  # it answered: it is up


def test_a_400_without_a_message_gets_a_generic_one(s: Setup) -> None:
    s.first.script = lambda: response(400, b"not json")
    assert s.refused_with().message == (
        "Upstream rejected the request: The upstream provider rejected the request."
    )


INVALID: dict[str, tuple[Script, bool]] = {
    "not-json": (lambda: response(200, b"<html>"), False),
    "no-choices": (lambda: response(200, {"object": "list"}), False),
    "stream-not-sse": (lambda: response(200, b"data: {}\n\n", "text/plain"), True),
}


@pytest.mark.parametrize(("answer", "stream"), INVALID.values(), ids=INVALID)
def test_an_invalid_200_is_a_500_and_a_failure(s: Setup, answer: Script, stream: bool) -> None:
    s.first.script = answer
    chat = s.request(stream=stream)
    with pytest.raises(UpstreamModelError) as caught:
        s.router.open(chat, meter(chat))
    assert (caught.value.status, caught.value.code) == (500, "upstream_model_error")
    assert s.counts() == (1, 0)  # no failover: the client gets the 500
    assert s.router.routes["chat"][0].breaker.failures == 1


def test_upstreams_without_an_api_key_are_left_out() -> None:
    s = Setup(env={"FIRST_KEY": "sk-first-0123456789"})
    assert [r.upstream.provider for r in s.router.routes["chat"]] == ["first"]
    assert s.router.unconfigured == frozenset({"embed"})
    s.first.script = refused
    assert s.refused_with().status == 503
    assert s.counts() == (1, 0)


def test_embeddings_go_to_the_embeddings_path_and_need_data() -> None:
    s = Setup()
    request = parse_embedding_request({"model": "embed", "input": "hi"}, s.config.model_names)
    s.second.script = lambda: response(200, {"data": [{"embedding": [0.1]}], "usage": {}})
    opened = s.router.open(request, meter(request))
    assert opened.completion is not None and opened.completion["data"]
    assert s.second.posts[-1][0] == "/embeddings"
    s.second.script = ok  # a chat completion is not an embedding
    with pytest.raises(UpstreamModelError):
        s.router.open(request, meter(request))
