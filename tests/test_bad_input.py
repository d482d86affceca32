"""Every bad input of SPEC §6 gets its 4xx in OpenAI's shape, never a 5xx, and costs nothing.

The gateway runs under Werkzeug in this process with a small `max_request_bytes`, so that
the 413 cases stay fast. A request the gateway rejects itself must not reach the fake
upstream (`upstream.requests` stays empty) nor leave a usage record.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keymeai import keys
from tests.checks import GENERATED_REQUEST_ID, assert_openai_error
from tests.conftest import Gateway
from tests.fake_upstream import FakeUpstream
from tests.support import usage_records

MAX_BYTES = 16 * 1024
MESSAGES = [{"role": "user", "content": "hi"}]
VALID = {"model": "deepseek-chat", "messages": MESSAGES}
DROP = object()  # a field to leave out of the body


@dataclass
class Api:
    """The live gateway, a valid key and a raw-HTTP helper."""

    gateway: Gateway
    key: str
    upstream: FakeUpstream

    @property
    def url(self) -> str:
        return f"{self.gateway.url}/v1/chat/completions"

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", **extra}

    def post(self, data: Any, content_type: str | None = "application/json", **kw: Any):
        headers = self.headers(**({"Content-Type": content_type} if content_type else {}))
        headers.update(kw.pop("headers", {}))
        return requests.post(self.url, data=data, headers=headers, timeout=10, **kw)

    def post_json(self, body: Any) -> requests.Response:
        return self.post(json.dumps(body))


@pytest.fixture
def api(
    start_gateway: Callable[..., Gateway], config_data: dict[str, Any], upstream: FakeUpstream
) -> Iterator[Api]:
    config_data["gateway"]["max_request_bytes"] = MAX_BYTES
    gateway = start_gateway()
    yield Api(gateway, gateway.create_key("standard"), upstream)


def json_type() -> dict[str, str]:
    return {"Content-Type": "application/json"}


def assert_rejected_for_free(api: Api) -> None:
    """Nothing reached the upstream and nothing was metered."""
    assert api.upstream.requests == []
    assert usage_records() == []


def body_with(**changes: Any) -> dict[str, Any]:
    body = {**VALID, **changes}
    return {k: v for k, v in body.items() if v is not DROP}


def msg(**fields: Any) -> list[Any]:
    return [{k: v for k, v in fields.items() if v is not DROP}]


# (body, status, param, code)
FIELD_CASES = {
    "model missing": (body_with(model=DROP), 400, "model", None),
    "model null": (body_with(model=None), 400, "model", None),
    "model number": (body_with(model=42), 400, "model", None),
    "model list": (body_with(model=["deepseek-chat"]), 400, "model", None),
    "model unknown": (body_with(model="gpt-17"), 404, "model", "model_not_found"),
    "model empty": (body_with(model=""), 404, "model", "model_not_found"),
    "messages missing": (body_with(messages=DROP), 400, "messages", None),
    "messages string": (body_with(messages="hi"), 400, "messages", None),
    "messages object": (body_with(messages={"role": "user"}), 400, "messages", None),
    "messages empty": (body_with(messages=[]), 400, "messages", None),
    "message string": (body_with(messages=["hi"]), 400, "messages[0]", None),
    "message null": (body_with(messages=[None]), 400, "messages[0]", None),
    "message list": (body_with(messages=[["user", "hi"]]), 400, "messages[0]", None),
    "role missing": (body_with(messages=msg(content="x")), 400, "messages[0].role", None),
    "role unknown": (
        body_with(messages=msg(role="wizard", content="x")),
        400,
        "messages[0].role",
        None,
    ),
    "role number": (body_with(messages=msg(role=1, content="x")), 400, "messages[0].role", None),
    "content missing": (body_with(messages=msg(role="user")), 400, "messages[0].content", None),
    "content number": (
        body_with(messages=msg(role="user", content=5)),
        400,
        "messages[0].content",
        None,
    ),
    "content object": (
        body_with(messages=msg(role="user", content={"text": "x"})),
        400,
        "messages[0].content",
        None,
    ),
    "content parts not objects": (
        body_with(messages=msg(role="user", content=[1, "a"])),
        400,
        "messages[0].content",
        None,
    ),
    "content part without type": (
        body_with(messages=msg(role="user", content=[{"text": "a"}])),
        400,
        "messages[0].content",
        None,
    ),
    "second message bad": (
        body_with(messages=[*MESSAGES, {"role": "user", "content": True}]),
        400,
        "messages[1].content",
        None,
    ),
    "temperature high": (body_with(temperature=2.5), 400, "temperature", None),
    "temperature negative": (body_with(temperature=-0.1), 400, "temperature", None),
    "temperature string": (body_with(temperature="0.5"), 400, "temperature", None),
    "temperature bool": (body_with(temperature=True), 400, "temperature", None),
    "temperature object": (body_with(temperature={}), 400, "temperature", None),
    "max_tokens zero": (body_with(max_tokens=0), 400, "max_tokens", None),
    "max_tokens negative": (body_with(max_tokens=-1), 400, "max_tokens", None),
    "max_tokens fraction": (body_with(max_tokens=1.5), 400, "max_tokens", None),
    "max_tokens whole float": (body_with(max_tokens=10.0), 400, "max_tokens", None),
    "max_tokens string": (body_with(max_tokens="10"), 400, "max_tokens", None),
    "max_tokens bool": (body_with(max_tokens=True), 400, "max_tokens", None),
    "stream string": (body_with(stream="yes"), 400, "stream", None),
    "stream number": (body_with(stream=1), 400, "stream", None),
    "stream_options string": (
        body_with(stream=True, stream_options="yes"),
        400,
        "stream_options",
        None,
    ),
    "stream_options list": (body_with(stream=True, stream_options=[]), 400, "stream_options", None),
    "include_usage string": (
        body_with(stream=True, stream_options={"include_usage": "yes"}),
        400,
        "stream_options.include_usage",
        None,
    ),
}


@pytest.mark.parametrize(("body", "status", "param", "code"), FIELD_CASES.values(), ids=FIELD_CASES)
def test_bad_field_is_named_in_param(
    api: Api, body: dict[str, Any], status: int, param: str, code: str | None
) -> None:
    error = assert_openai_error(api.post_json(body), status, param=param, code=code)
    assert error["type"] == "invalid_request_error"
    assert_rejected_for_free(api)


VALID_TEXT = json.dumps(VALID)
# (raw body, content type, what the message must mention)
RAW_CASES = {
    "invalid JSON": (b'{"model": "deepseek-chat", "messages": [', "application/json", "JSON"),
    "single quotes": (VALID_TEXT.replace('"', "'").encode(), "application/json", "JSON"),
    "trailing garbage": (VALID_TEXT.encode() + b" x", "application/json", "JSON"),
    "array": (b"[1, 2]", "application/json", "object"),
    "string": (b'"hello"', "application/json", "object"),
    "number": (b"42", "application/json", "object"),
    "null": (b"null", "application/json", "object"),
    "empty": (b"", "application/json", "empty"),
    "blank": (b" \n\t ", "application/json", "empty"),
    "NaN literal": (VALID_TEXT[:-1].encode() + b', "temperature": NaN}', "application/json", "NaN"),
    "Infinity literal": (
        VALID_TEXT[:-1].encode() + b', "temperature": Infinity}',
        "application/json",
        "Infinity",
    ),
    "non-UTF-8": (VALID_TEXT.replace("hi", "h\xe9").encode("latin-1"), "application/json", "UTF-8"),
    "UTF-16": (VALID_TEXT.encode("utf-16"), "application/json", "UTF-8"),
    "text/plain": (VALID_TEXT.encode(), "text/plain", "Content-Type"),
    "form-encoded": (
        b"model=deepseek-chat&messages=hi",
        "application/x-www-form-urlencoded",
        "Content-Type",
    ),
    "multipart": (VALID_TEXT.encode(), "multipart/form-data; boundary=x", "Content-Type"),
    "no content type": (VALID_TEXT.encode(), None, "Content-Type"),
    "deeply nested": (
        (VALID_TEXT[:-1] + ', "metadata": ' + "[" * 3000 + "]" * 3000 + "}").encode(),
        "application/json",
        "nested",
    ),
    "nested past forwarding": (
        (VALID_TEXT[:-1] + ', "metadata": ' + "[" * 500 + "]" * 500 + "}").encode(),
        "application/json",
        "nested",
    ),
    "lone surrogate": (
        VALID_TEXT.replace("hi", "hi \\ud800").encode(),
        "application/json",
        "Unicode",
    ),
    "lone surrogate key": (
        VALID_TEXT[:-1].encode() + b', "\\udc00": 1}',
        "application/json",
        "Unicode",
    ),
}


@pytest.mark.parametrize(("raw", "content_type", "mention"), RAW_CASES.values(), ids=RAW_CASES)
def test_malformed_body_is_400(
    api: Api, raw: bytes, content_type: str | None, mention: str
) -> None:
    error = assert_openai_error(api.post(raw, content_type), 400, param=None)
    assert mention.lower() in error["message"].lower()
    assert_rejected_for_free(api)


def test_overflowing_number_is_not_a_temperature(api: Api) -> None:
    raw = VALID_TEXT[:-1] + ', "temperature": 1e999}'  # parses as float("inf")
    assert_openai_error(api.post(raw), 400, param="temperature")
    assert_rejected_for_free(api)


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", "Application/JSON"],
)
def test_json_content_types_are_accepted(api: Api, content_type: str) -> None:
    """The control group: a valid body with a JSON content type is answered."""
    emoji = VALID_TEXT.replace("hi", "hi \\ud83d\\ude00")  # an escaped surrogate *pair* is fine
    response = api.post(emoji, content_type)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Echo: hi \U0001f600"
    assert len(usage_records()) == 1


def body_of(size: int) -> bytes:
    """A valid request of exactly `size` bytes."""
    raw = json.dumps(body_with(messages=msg(role="user", content=""))).encode()
    return raw.replace(b'"content": ""', b'"content": "' + b"a" * (size - len(raw)) + b'"')


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_body_limit_is_exact(api: Api, chunked: bool) -> None:
    """At the limit: served. One byte more: 413, also for a chunked body without a length
    (which Werkzeug would otherwise hand over silently truncated)."""

    def send(raw: bytes) -> requests.Response:
        response = api.post(iter([raw[:1000], raw[1000:]]) if chunked else raw)
        assert ("Content-Length" in response.request.headers) is not chunked
        return response

    assert len(body_of(MAX_BYTES)) == MAX_BYTES
    assert send(body_of(MAX_BYTES)).status_code == 200
    api.upstream.reset()
    assert_openai_error(send(body_of(MAX_BYTES + 1)), 413, code="request_too_large")
    assert_openai_error(send(body_of(20 * MAX_BYTES)), 413, code="request_too_large")
    assert api.upstream.requests == []
    assert len(usage_records()) == 1  # only the first request


def test_body_limits_hold_under_gunicorn(
    start_gunicorn: Callable[..., Any], config_data: dict[str, Any], ledger: None
) -> None:
    """gunicorn hands the app its own input stream: the limit and the parser still hold."""
    config_data["gateway"]["max_request_bytes"] = MAX_BYTES
    server = start_gunicorn()
    url = f"{server.url}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {keys.create_key('g', 'standard')[1]}", **json_type()}
    for size, status in ((MAX_BYTES, 200), (MAX_BYTES + 1, 413)):
        raw = body_of(size)
        for data in (raw, iter([raw[:1000], raw[1000:]])):
            response = requests.post(url, data=data, headers=headers, timeout=10)
            assert response.status_code == status, response.text
    for name in ("non-UTF-8", "deeply nested", "lone surrogate"):
        raw = RAW_CASES[name][0]
        assert_openai_error(requests.post(url, data=raw, headers=headers, timeout=10), 400)


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Basic dXNlcjpwYXNz",
        "km-abcdefghijklmnopqrstuvwxyz0123456789",
        "Bearer",
        "Bearer ",
        "Token km-abcdefghijklmnopqrstuvwxyz0123456789",
        "Bearer not-a-km-key",
        "Bearer km-short",
        "Bearer km-" + "a" * 5000,
        "Bearer km-abcdefghijklmnopqrstuvwxyz0123456789 extra",
        b"Bearer km-\xff\xfe\xc3\xa9abcdefghijklmnopqrstuvwxyz0123456",
    ],
    ids=lambda a: repr(a)[:40],
)
def test_bad_authorization_headers_are_401(api: Api, authorization: Any) -> None:
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    response = requests.post(api.url, data=VALID_TEXT, headers=headers, timeout=10)
    error = assert_openai_error(response, 401, code="invalid_api_key")
    assert "a" * 100 not in error["message"]  # an overlong key is not echoed
    assert_rejected_for_free(api)


def test_lower_case_bearer_and_extra_spaces_work(api: Api) -> None:
    for value in (f"bearer {api.key}", f"BEARER {api.key}", f"Bearer   {api.key}  "):
        response = requests.post(
            api.url, data=VALID_TEXT, headers={"Authorization": value, **json_type()}, timeout=10
        )
        assert response.status_code == 200, (value, response.text)


def test_two_authorization_headers_are_refused(api: Api) -> None:
    """Two keys in one request are ambiguous: neither is used."""
    host, port = api.gateway.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Authorization", f"Bearer {api.key}")
    conn.putheader("Authorization", f"Bearer {api.key}")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(len(VALID_TEXT)))
    conn.endheaders(VALID_TEXT.encode())
    raw = conn.getresponse()
    response = requests.Response()
    response.status_code, response._content = raw.status, raw.read()
    response.headers.update(dict(raw.getheaders()))
    conn.close()
    assert_openai_error(response, 401, code="invalid_api_key")
    assert_rejected_for_free(api)


@pytest.mark.parametrize(
    "request_id",
    ["has spaces in it", "tab\there", "ctl\x01char", "x" * 500, "quote\"and'", "ünïcode"],
    ids=["spaces", "tab", "control", "long", "quotes", "unicode"],
)
def test_weird_request_id_is_replaced(api: Api, request_id: str) -> None:
    headers = api.headers(**json_type())
    headers["X-Request-Id"] = request_id.encode() if not request_id.isascii() else request_id
    response = requests.post(api.url, data=VALID_TEXT, headers=headers, timeout=10)
    assert response.status_code == 200
    assert GENERATED_REQUEST_ID.fullmatch(response.headers["x-request-id"])
    assert usage_records()[-1].request_id == response.headers["x-request-id"]


def test_sane_request_id_is_echoed_on_errors_too(api: Api) -> None:
    response = api.post("{", headers={"X-Request-Id": "trace-42.a/b:c"})
    assert_openai_error(response, 400)
    assert response.headers["x-request-id"] == "trace-42.a/b:c"


def test_get_on_chat_completions_is_405_json(api: Api) -> None:
    response = requests.get(api.url, headers=api.headers(), timeout=10)
    assert_openai_error(response, 405, code="method_not_allowed")
    assert "POST" in response.headers["Allow"]
    assert_rejected_for_free(api)


@pytest.mark.parametrize("path", ["/v1/nope", "/v1/chat/completion", "/nope", "/v1/"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_unknown_url_is_404_json(api: Api, path: str, method: str) -> None:
    response = requests.request(
        method, api.gateway.url + path, data=VALID_TEXT, headers=api.headers(), timeout=10
    )
    assert_openai_error(response, 404, code="unknown_url")
    assert_rejected_for_free(api)


def test_head_and_options(api: Api) -> None:
    base = api.gateway.url
    head = requests.head(f"{base}/v1/models", headers=api.headers(), timeout=10)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["x-request-id"]
    head = requests.head(f"{base}/v1/models", timeout=10)
    assert head.status_code == 401  # HEAD says what GET would, without the body
    head = requests.head(api.url, headers=api.headers(), timeout=10)
    assert head.status_code == 405 and "POST" in head.headers["Allow"]
    for headers in ({}, api.headers()):
        options = requests.options(api.url, headers=headers, timeout=10)
        assert options.status_code in (200, 204), options.text
        assert "POST" in options.headers["Allow"]
        assert options.headers["x-request-id"]
    assert_rejected_for_free(api)


def test_sdk_sees_the_errors_as_openai_exceptions(api: Api) -> None:
    client = api.gateway.client(api.key)
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="gpt-17", messages=MESSAGES)  # type: ignore[arg-type]
    assert not_found.value.code == "model_not_found" and not_found.value.param == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="deepseek-chat",
            messages=MESSAGES,  # type: ignore[arg-type]
            temperature=3,
        )
    assert bad.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="deepseek-chat",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            extra_body={"max_tokens": "ten"},
        )
    assert bad.value.param == "max_tokens"
    assert_rejected_for_free(api)


# -- random documents ----------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
_message = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["system", "user", "assistant", "tool", "wizard"]) | _json,
        "content": st.text(max_size=20) | st.just([{"type": "text", "text": "hi"}]) | _json,
        "name": _json,
    },
)
_body = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["deepseek-chat", "qwen-max", "doubao-pro-32k", "gpt-4"]) | _json,
        "messages": st.lists(_message | _json, max_size=3) | _json,
        "temperature": st.floats(-1, 3) | _json,
        "max_tokens": st.integers(-3, 30) | _json,
        "stream": st.booleans() | _json,
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": _json}) | _json,
        "top_p": _json,
        "stop": _json,
        "user": _json,
        "seed": _json,
        "n": _json,
    },
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(document=_body | _json)
def test_random_documents_never_get_a_5xx(api: Api, document: Any) -> None:
    """Whatever the JSON, the answer is a completion, a stream or an OpenAI error; every
    request that reached the upstream is metered once, and no other."""
    before = (len(api.upstream.requests), len(usage_records()))
    response = api.post(json.dumps(document))
    assert response.status_code < 500, (document, response.text)
    assert response.headers["x-request-id"]
    if response.status_code >= 400:
        assert_openai_error(response, response.status_code)
    elif response.headers["Content-Type"].startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n")
    else:
        assert response.json()["object"] == "chat.completion"
    reached = len(api.upstream.requests) - before[0]
    assert len(usage_records()) - before[1] == reached
