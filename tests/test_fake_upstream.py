"""Tests for the fake provider server, over real HTTP with requests and the SDK.

Why: the gateway's own tests trust this fake to look like DeepSeek, DashScope and
Ark on the wire, so its framing, usage numbers and fault modes are pinned here.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from tests.helpers.fake_replies import SHAPES, embedding_vector
from tests.helpers.fake_upstream import FakeUpstream

KEY = "sk-fake-upstream"
AUTH = {"Authorization": f"Bearer {KEY}"}
MSGS: list[Any] = [{"role": "user", "content": "hello there"}]  # prompt 2 + 3 = 5 tokens


@pytest.fixture(scope="module")
def server() -> Iterator[FakeUpstream]:
    with FakeUpstream() as fake:
        yield fake


@pytest.fixture
def fake(server: FakeUpstream) -> FakeUpstream:
    server.reset()
    return server


def client(fake: FakeUpstream, shape: str = "deepseek", mode: str = "ok", **kw):
    options = {"max_retries": 0, "timeout": 30, **kw}
    return openai.OpenAI(base_url=fake.base_url(shape, mode), api_key=KEY, **options)


def post(
    fake: FakeUpstream,
    /,
    shape: str = "deepseek",
    mode: str = "ok",
    http: requests.Session | None = None,
    timeout: float = 5,
    stream: bool = False,
    **body,
) -> requests.Response:
    """POST a chat completion; ``stream`` asks for SSE and reads the body lazily."""
    payload: dict[str, Any] = {
        "model": "m",
        "messages": MSGS,
        **({"stream": True} if stream else {}),
    }
    payload.update(body)
    url = fake.base_url(shape, mode) + "/chat/completions"
    return (http or requests).post(url, json=payload, headers=AUTH, timeout=timeout, stream=stream)


def get(fake: FakeUpstream, path: str) -> requests.Response:
    return requests.get(fake.url + path, headers=AUTH, timeout=5)


def events(raw: bytes) -> list[str]:
    """The data payloads of an SSE byte stream (either framing)."""
    return [m.strip() for m in re.findall(rb"^data:(.*)$", raw, re.MULTILINE)]


def raw_exchange(fake: FakeUpstream, path: str, body: dict) -> bytes:
    """Send one request over a bare socket and return every byte received."""
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        "Connection: close\r\n\r\n"
    )
    port = int(fake.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head.encode() + data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


def dechunk(body: bytes) -> list[bytes]:
    """Split a chunked transfer-encoded body into its chunks (strictly)."""
    chunks: list[bytes] = []
    while True:
        size_line, body = body.split(b"\r\n", 1)
        size = int(size_line, 16)
        if size == 0:
            assert body == b"\r\n"
            return chunks
        chunks.append(body[:size])
        assert body[size : size + 2] == b"\r\n"
        body = body[size + 2 :]


# -- normal responses -----------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
def test_sdk_non_stream(fake: FakeUpstream, shape: str) -> None:
    res = client(fake, shape).chat.completions.create(model="m1", messages=MSGS)
    assert res.choices[0].message.content == "Echo: hello there"
    assert res.choices[0].finish_reason == "stop"
    assert res.model == "m1"
    assert res.usage is not None
    assert (res.usage.prompt_tokens, res.usage.completion_tokens) == (5, 3)
    assert res.usage.total_tokens == 8
    assert fake.requests[-1].response_usage == res.usage.model_dump(exclude_unset=True)
    assert fake.count(shape=shape, mode="ok") == 1


@pytest.mark.parametrize("shape", SHAPES)
def test_sdk_stream_with_usage(fake: FakeUpstream, shape: str) -> None:
    chunks = list(
        client(fake, shape).chat.completions.create(
            model="m",
            messages=MSGS,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo: hello there"
    usages = [c.usage for c in chunks if c.usage]
    assert len(usages) == 1
    assert (usages[0].prompt_tokens, usages[0].completion_tokens) == (5, 3)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals[0].choices[0].finish_reason == "stop"
    # DeepSeek reports usage on the finish chunk, the others in a choices=[] chunk.
    assert (finals[0].usage is not None) == (shape == "deepseek")
    rec = fake.requests[-1]
    assert rec.response_usage is not None and rec.completed
    assert rec.chunks_sent == len(chunks) + 1  # + [DONE]


@pytest.mark.parametrize("shape", SHAPES)
def test_stream_without_include_usage_has_no_usage(fake: FakeUpstream, shape: str) -> None:
    stream = client(fake, shape).chat.completions.create(model="m", messages=MSGS, stream=True)
    assert all(c.usage is None for c in stream)
    assert fake.requests[-1].response_usage is None


def test_dashscope_framing_has_no_space_after_colon(fake: FakeUpstream) -> None:
    res = post(fake, "dashscope", stream=True, stream_options={"include_usage": True})
    raw = b"".join(res.iter_content(None))
    assert raw.startswith(b"data:{") and b"data: " not in raw
    assert raw.endswith(b"data:[DONE]\n\n")
    usage_event = json.loads(events(raw)[-2])
    assert usage_event["choices"] == [] and usage_event["usage"]["total_tokens"] == 8


def test_each_sse_event_is_its_own_http_chunk(fake: FakeUpstream) -> None:
    req = {"model": "m", "messages": MSGS, "stream": True}
    out = raw_exchange(fake, "/deepseek/ok/v1/chat/completions", req)
    head, body = out.split(b"\r\n\r\n", 1)
    assert b"Transfer-Encoding: chunked" in head
    chunks = dechunk(body)
    assert chunks[0] == b": keep-alive\n\n"
    assert all(c.startswith(b"data: ") and c.endswith(b"\n\n") for c in chunks[1:])
    assert chunks[-1] == b"data: [DONE]\n\n"
    assert len(chunks) == 1 + 1 + 3 + 1 + 1  # keep-alive, role, 3 words, finish, DONE


def test_deepseek_non_stream_leading_blank_lines(fake: FakeUpstream) -> None:
    res = post(fake, "deepseek")
    assert res.content.startswith(b"\n\n{")
    assert res.headers["Content-Type"] == "application/json"
    assert res.json()["system_fingerprint"] == "fp_fake"
    assert not post(fake, "ark").content.startswith(b"\n")


def test_keep_alive_reuses_connection(fake: FakeUpstream) -> None:
    with requests.Session() as http:
        post(fake, http=http).json()
        b"".join(post(fake, "ark", http=http, stream=True).iter_content(None))
        post(fake, http=http).json()
    assert len({r.client for r in fake.requests}) == 1


def test_deepseek_reasoner(fake: FakeUpstream) -> None:
    sdk = client(fake)
    res = sdk.chat.completions.create(model="deepseek-reasoner", messages=MSGS)
    msg = res.choices[0].message.model_dump()
    assert msg["reasoning_content"] == "Thinking about the question."
    assert res.usage and res.usage.completion_tokens_details
    assert res.usage.completion_tokens_details.reasoning_tokens == 4
    assert res.usage.completion_tokens == 3 + 4
    chunks = list(
        sdk.chat.completions.create(
            model="m",
            messages=MSGS,
            stream=True,
            extra_body={"fake": {"reasoning_words": 2}},
        )
    )
    deltas = [c.choices[0].delta.model_dump() for c in chunks]
    reasoning = [d["reasoning_content"] for d in deltas if d.get("reasoning_content")]
    assert reasoning == ["r1 ", "r2"]


def test_list_content_parts_and_echo_truncation(fake: FakeUpstream) -> None:
    parts = [{"type": "text", "text": "a b"}, {"type": "text", "text": "c"}]
    body = post(fake, messages=[{"role": "user", "content": parts}]).json()
    assert body["choices"][0]["message"]["content"] == "Echo: a b c"
    long = " ".join(["x"] * 100)
    body = post(fake, messages=[{"role": "user", "content": long}]).json()
    assert len(body["choices"][0]["message"]["content"].split()) == 60
    assert body["usage"]["prompt_tokens"] == 103


def test_max_tokens_truncates(fake: FakeUpstream) -> None:
    body = post(fake, max_tokens=4, fake={"words": 10}).json()
    assert body["choices"][0]["message"]["content"] == "w1 w2 w3 w4"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 4


def test_fake_words_stream(fake: FakeUpstream) -> None:
    stream = client(fake, "ark").chat.completions.create(
        model="m", messages=MSGS, stream=True, extra_body={"fake": {"words": 5}}
    )
    pieces = [c.choices[0].delta.content for c in stream if c.choices]
    assert [p for p in pieces if p] == ["w1 ", "w2 ", "w3 ", "w4 ", "w5"]


def test_fake_cached(fake: FakeUpstream) -> None:
    usage = post(fake, fake={"cached": 3}).json()["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 3}
    hit_miss = usage["prompt_cache_hit_tokens"], usage["prompt_cache_miss_tokens"]
    assert hit_miss == (3, 2)
    usage = post(fake, "dashscope", fake={"cached": 99}).json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 5  # clamped to prompt


def test_first_delay_sends_deepseek_keep_alives(fake: FakeUpstream) -> None:
    start = time.monotonic()
    res = post(fake, stream=True, fake={"first_delay": 0.5})
    raw = b"".join(res.iter_content(None))
    assert time.monotonic() - start >= 0.5
    assert raw.split(b"data:")[0].count(b": keep-alive\n\n") >= 3


def test_models_list(fake: FakeUpstream) -> None:
    ids = [m.id for m in client(fake, "dashscope").models.list()]
    assert "qwen-plus" in ids
    assert get(fake, "/ark/503/api/v3/models").status_code == 503


@pytest.mark.parametrize("shape", ["dashscope", "ark"])
def test_embeddings_are_deterministic_with_usage(fake: FakeUpstream, shape: str) -> None:
    sdk = client(fake, shape)
    first = sdk.embeddings.create(
        model="text-embedding-v4", input=["a b", "c"], encoding_format="float", dimensions=16
    )
    again = sdk.embeddings.create(
        model="text-embedding-v4", input="a b", encoding_format="float", dimensions=16
    )
    assert first.data[0].embedding == again.data[0].embedding == embedding_vector("a b", 16)
    assert first.data[1].embedding != first.data[0].embedding
    assert all(abs(x) <= 1 and (x * 1024).is_integer() for x in first.data[0].embedding)
    assert (first.usage.prompt_tokens, first.usage.total_tokens) == (3, 3)
    assert fake.requests[-2].response_usage == {"prompt_tokens": 3, "total_tokens": 3}


def test_embeddings_refuse_what_dashscope_refuses(fake: FakeUpstream) -> None:
    sdk = client(fake, "dashscope")
    for bad in ({"input": [str(i) for i in range(11)]}, {"input": [[1, 2]]}, {"input": "x"}):
        with pytest.raises(openai.BadRequestError):
            sdk.embeddings.create(model="text-embedding-v4", **bad)  # base64 by default
    with pytest.raises(openai.InternalServerError):
        client(fake, "ark", "503").embeddings.create(model="e", input="x", encoding_format="float")


# -- request validation ---------------------------------------------------------


def test_wrong_api_key_is_401_and_recorded(fake: FakeUpstream) -> None:
    sdk = openai.OpenAI(
        base_url=fake.base_url("deepseek"), api_key="sk-wrong-abcd", max_retries=0, timeout=30
    )
    with pytest.raises(openai.AuthenticationError):
        sdk.chat.completions.create(model="m", messages=MSGS)
    res = requests.post(fake.base_url("deepseek") + "/chat/completions", json={}, timeout=10)
    assert res.status_code == 401
    assert fake.count() == 2
    assert fake.requests[0].headers["authorization"] == "Bearer sk-wrong-abcd"
    assert fake.requests[0].body["model"] == "m"
    assert fake.requests[0].response_usage is None
    bad_key = {"Authorization": "Bearer sk-wrong-abcd"}
    url = fake.base_url("deepseek") + "/chat/completions"
    assert requests.post(url, json={}, headers=bad_key, timeout=10).json()["error"] == {
        "message": "Authentication Fails, Your api key: ****abcd is invalid",
        "type": "authentication_error",
        "param": None,
        "code": "invalid_request_error",
    }


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"messages": [{"role": "user", "content": "x"}]}',
        b'{"model": "m", "messages": []}',
    ],
)
def test_invalid_request_is_400(fake: FakeUpstream, body: bytes) -> None:
    url = fake.base_url("dashscope") + "/chat/completions"
    res = requests.post(url, data=body, headers=AUTH, timeout=10)
    assert res.status_code == 400
    assert res.json()["error"]["type"] == "invalid_request_error"
    assert fake.requests[-1].raw_body == body


def test_bad_knobs_are_400(fake: FakeUpstream) -> None:
    res = post(fake, "ark", fake={"words": "many"})
    assert res.status_code == 400 and "Bad 'fake'" in res.json()["error"]["message"]


def test_chunked_request_body(fake: FakeUpstream) -> None:
    data = json.dumps({"model": "m", "messages": MSGS}).encode()
    url = fake.base_url("dashscope") + "/chat/completions"
    res = requests.post(url, data=iter([data[:10], data[10:]]), headers=AUTH, timeout=10)
    assert res.json()["choices"][0]["message"]["content"] == "Echo: hello there"
    assert fake.requests[-1].headers["transfer-encoding"] == "chunked"


def test_unknown_path_is_404(fake: FakeUpstream) -> None:
    assert get(fake, "/nope").status_code == 404
    assert get(fake, "/ark/ok/api/v3/files").status_code == 404
    assert get(fake, "/ark/bogus/api/v3/models").status_code == 404  # unknown mode


# -- fault modes ----------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("status", [400, 401, 402, 403, 404, 422, 429, 500, 502, 503])
def test_error_statuses(fake: FakeUpstream, shape: str, status: int) -> None:
    res = post(fake, shape, str(status), stream=True)
    assert res.status_code == status
    assert res.headers["Content-Type"] == "application/json"
    assert set(res.json()["error"]) == {"message", "type", "param", "code"}
    assert res.headers.get("Retry-After") == ("1" if status in (429, 503) else None)


def test_provider_specific_errors(fake: FakeUpstream) -> None:
    ds402 = post(fake, "deepseek", "402").json()["error"]
    assert ds402["message"] == "Insufficient Balance"
    ark429 = post(fake, "ark", "429").json()["error"]
    assert ark429["code"] == "ServerOverloaded" and ark429["type"] == "TooManyRequests"
    assert ark429["param"] == ""
    assert post(fake, "ark", "403").json()["error"]["code"] == "AccountOverdueError"
    ds429 = post(fake, "dashscope", "429").json()
    assert ds429["error"]["code"] == "limit_requests" and ds429["request_id"]
    arrears = post(fake, "dashscope", "arrearage")
    assert arrears.status_code == 400
    assert arrears.json()["error"]["code"] == "Arrearage"
    assert arrears.json()["error"]["type"] == "Arrearage"


def test_sdk_maps_errors(fake: FakeUpstream) -> None:
    cases = [
        ("429", openai.RateLimitError),
        ("401", openai.AuthenticationError),
        ("500", openai.InternalServerError),
        ("die-before-body", openai.APIConnectionError),
    ]
    for mode, exc in cases:
        with pytest.raises(exc):
            client(fake, "ark", mode).chat.completions.create(model="m", messages=MSGS)


def test_octet_error(fake: FakeUpstream) -> None:
    res = post(fake, "deepseek", "octet-error")
    assert res.status_code == 500
    assert res.headers["Content-Type"] == "application/octet-stream"
    assert json.loads(res.content)["error"]


@pytest.mark.parametrize("stream", [False, True])
def test_hang_times_out(fake: FakeUpstream, stream: bool) -> None:
    start = time.monotonic()
    with pytest.raises(requests.Timeout):
        post(fake, mode="hang", timeout=0.5, stream=stream)
    assert time.monotonic() - start < 10  # the read timeout, not the 60 s hang
    assert post(fake).status_code == 200  # other requests are unaffected


def test_hang_after_headers(fake: FakeUpstream) -> None:
    res = post(fake, "dashscope", "hang-after-headers", timeout=0.5, stream=True)
    assert res.status_code == 200
    lines = res.iter_lines()
    assert next(lines).startswith(b"data:{")
    with pytest.raises(requests.ConnectionError):  # read timeout mid-body
        list(lines)
    with pytest.raises(requests.ConnectionError):
        post(fake, "ark", "hang-after-headers", timeout=0.5)


def test_hang_does_not_block_stop() -> None:
    fake = FakeUpstream().start()
    errors: list[Exception] = []

    def call() -> None:
        try:
            post(fake, mode="hang", timeout=5)
        except requests.RequestException as exc:
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + 2
    while not fake.count() and time.monotonic() < deadline:
        time.sleep(0.01)
    start = time.monotonic()
    fake.stop()
    thread.join(10)
    assert time.monotonic() - start < 10 and errors  # not the 60 s hang


def test_slow_spaces_chunks(fake: FakeUpstream) -> None:
    res = post(fake, "ark", "slow", stream=True)
    lines = (line for line in res.iter_lines() if line)
    next(lines)
    start = time.monotonic()
    next(lines)
    assert time.monotonic() - start >= 0.4
    res.close()


def test_interval_knob(fake: FakeUpstream) -> None:
    start = time.monotonic()
    assert post(fake, stream=True, fake={"words": 2, "interval": 0.05}).content
    assert time.monotonic() - start >= 0.2  # 4 gaps between 5 events


@pytest.mark.parametrize("shape", SHAPES)
def test_die_mid_stream(fake: FakeUpstream, shape: str) -> None:
    res = post(fake, shape, "die", stream=True, fake={"words": 10})
    got: list[bytes] = []
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        got.extend(res.iter_lines())
    assert len(events(b"\n".join(got))) == 3 and b"[DONE]" not in b"".join(got)
    assert fake.requests[-1].chunks_sent == 3 and not fake.requests[-1].completed


def test_die_non_stream_and_before_body(fake: FakeUpstream) -> None:
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        post(fake, "dashscope", "die")
    with pytest.raises(requests.ConnectionError):
        post(fake, "ark", "die-before-body")
    assert fake.count(mode="die") == 1 and fake.count(mode="die-before-body") == 1


@pytest.mark.parametrize("stream", [False, True])
def test_garbage(fake: FakeUpstream, stream: bool) -> None:
    res = post(fake, mode="garbage", stream=stream)
    assert res.status_code == 200 and res.headers["Content-Type"] == "text/html"
    assert res.content == b"<html>Bad Gateway</html>"


def test_badjson(fake: FakeUpstream) -> None:
    res = post(fake, "ark", "badjson")
    assert res.content == b'{"id": "x", "choices": '
    with pytest.raises(ValueError):
        res.json()
    res = post(fake, "ark", "badjson", stream=True)
    assert res.headers["Content-Type"] == "text/event-stream"
    first, second = events(res.content)
    assert json.loads(first)["choices"] and second == b"{not json}"


def test_wrongshape(fake: FakeUpstream) -> None:
    assert "choices" not in post(fake, "dashscope", "wrongshape").json()
    raw = post(fake, "dashscope", "wrongshape", stream=True).content
    assert all("choices" not in json.loads(e) for e in events(raw)[:-1])


def test_nousage(fake: FakeUpstream) -> None:
    assert "usage" not in post(fake, "ark", "nousage").json()
    for shape in SHAPES:
        res = post(fake, shape, "nousage", stream=True, stream_options={"include_usage": True})
        parsed = [json.loads(e) for e in events(res.content)[:-1]]
        assert parsed and all(p.get("usage") is None for p in parsed)
    assert all(r.response_usage is None for r in fake.requests)


def test_empty(fake: FakeUpstream) -> None:
    res = post(fake, mode="empty")
    assert (res.status_code, res.content) == (200, b"")
    assert res.headers["Content-Type"] == "application/json"


def test_switches_and_count(fake: FakeUpstream) -> None:
    assert post(fake, "ark", "sw-primary").status_code == 200
    fake.switches["primary"] = "503"
    assert post(fake, "ark", "sw-primary").status_code == 503
    fake.switches["primary"] = "ok"
    assert post(fake, "ark", "sw-primary").status_code == 200
    assert fake.count(shape="ark", mode="sw-primary") == 3
    assert [r.effective_mode for r in fake.requests] == ["ok", "503", "ok"]
    assert fake.count(shape="deepseek") == 0
    fake.reset()
    assert fake.count() == 0 and fake.switches == {}


def _default_sigint() -> None:
    """In the child: SIGINT as a terminal's Ctrl-C finds it. A shell that starts the tests
    in the background (`pytest &` in a script) ignores SIGINT, and children inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_standalone_cli() -> None:
    """`python tests/fake_upstream.py` prints its address, serves, and exits 0 on Ctrl-C."""
    script = Path(__file__).with_name("fake_upstream.py")
    cmd = [sys.executable, str(script), "--port", "0", "--api-key", KEY]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    assert proc.stdout is not None
    pool = ThreadPoolExecutor(1)  # a stuck readline ends when the process is killed
    try:
        line = pool.submit(proc.stdout.readline).result(timeout=20)
        found = re.search(r"Fake upstream at (http://\S+) \(key sk-fake-", line)
        assert found and "/dashscope/ok/compatible-mode/v1" in line
        res = requests.get(found[1] + "/deepseek/ok/v1/models", headers=AUTH, timeout=5)
        assert res.json()["object"] == "list"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)
        pool.shutdown()
        proc.stdout.close()
