"""Every bad input (docs/api.md) gets its 4xx in OpenAI's shape, never a 5xx, and costs nothing.

The gateway runs under Werkzeug in this process with a small `max_request_bytes`, so that
the 413 cases stay fast. A request the gateway rejects itself must not reach the fake
upstream (`upstream.requests` stays empty) nor leave a usage record.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable
from typing import Any

import openai
import pytest
import requests

from keymeai.ledger import keys
from tests.helpers.clients import SMALL_BODY_LIMIT, Api
from tests.helpers.errors import GENERATED_REQUEST_ID, assert_openai_error
from tests.helpers.ledger import usage_records

MESSAGES = [{"role": "user", "content": "hi"}]
VALID = {"model": "deepseek-chat", "messages": MESSAGES}
DROP = object()  # a field to leave out of the body


def body_with(**changes: Any) -> dict[str, Any]:
    body = {**VALID, **changes}
    return {k: v for k, v in body.items() if v is not DROP}


def msg(**fields: Any) -> list[Any]:
    return [{k: v for k, v in fields.items() if v is not DROP}]


def content(value: Any) -> list[Any]:
    return msg(role="user", content=value)


# Each body is refused with 400 and `param` naming the field.
FIELD_CASES = {
    "model missing": ("model", body_with(model=DROP)),
    "model null": ("model", body_with(model=None)),
    "model number": ("model", body_with(model=42)),
    "model list": ("model", body_with(model=["deepseek-chat"])),
    "messages missing": ("messages", body_with(messages=DROP)),
    "messages string": ("messages", body_with(messages="hi")),
    "messages object": ("messages", body_with(messages={"role": "user"})),
    "messages empty": ("messages", body_with(messages=[])),
    "message string": ("messages[0]", body_with(messages=["hi"])),
    "message null": ("messages[0]", body_with(messages=[None])),
    "message list": ("messages[0]", body_with(messages=[["user", "hi"]])),
    "role missing": ("messages[0].role", body_with(messages=msg(content="x"))),
    "role unknown": ("messages[0].role", body_with(messages=msg(role="wizard", content="x"))),
    "role number": ("messages[0].role", body_with(messages=msg(role=1, content="x"))),
    "content missing": ("messages[0].content", body_with(messages=msg(role="user"))),
    "content number": ("messages[0].content", body_with(messages=content(5))),
    "content object": ("messages[0].content", body_with(messages=content({"text": "x"}))),
    "content parts": ("messages[0].content", body_with(messages=content([1, "a"]))),
    "part without type": ("messages[0].content", body_with(messages=content([{"text": "a"}]))),
    "second message": ("messages[1].content", body_with(messages=[*MESSAGES, *content(True)])),
    "temperature high": ("temperature", body_with(temperature=2.5)),
    "temperature negative": ("temperature", body_with(temperature=-0.1)),
    "temperature string": ("temperature", body_with(temperature="0.5")),
    "temperature bool": ("temperature", body_with(temperature=True)),
    "temperature object": ("temperature", body_with(temperature={})),
    "max_tokens zero": ("max_tokens", body_with(max_tokens=0)),
    "max_tokens negative": ("max_tokens", body_with(max_tokens=-1)),
    "max_tokens fraction": ("max_tokens", body_with(max_tokens=1.5)),
    "max_tokens whole float": ("max_tokens", body_with(max_tokens=10.0)),
    "max_tokens string": ("max_tokens", body_with(max_tokens="10")),
    "max_tokens bool": ("max_tokens", body_with(max_tokens=True)),
    "max_tokens huge": ("max_tokens", body_with(max_tokens=2**63)),
    "stream string": ("stream", body_with(stream="yes")),
    "stream number": ("stream", body_with(stream=1)),
    "stream_options string": ("stream_options", body_with(stream=True, stream_options="yes")),
    "stream_options list": ("stream_options", body_with(stream=True, stream_options=[])),
    "include_usage string": (
        "stream_options.include_usage",
        body_with(stream=True, stream_options={"include_usage": "yes"}),
    ),
}


@pytest.mark.parametrize(("param", "body"), FIELD_CASES.values(), ids=FIELD_CASES)
def test_bad_field_is_named_in_param(api: Api, param: str, body: dict[str, Any]) -> None:
    error = assert_openai_error(api.post_json(body), 400, param=param, code=None)
    assert error["type"] == "invalid_request_error"
    api.assert_rejected_for_free()


@pytest.mark.parametrize("model", ["gpt-17", "", "DeepSeek-Chat", "deepseek-chat "])
def test_unknown_model_is_404_model_not_found(api: Api, model: str) -> None:
    response = api.post_json(body_with(model=model))
    assert_openai_error(response, 404, param="model", code="model_not_found")
    api.assert_rejected_for_free()


VALID_TEXT = json.dumps(VALID)


def extra(field: str) -> bytes:
    """The valid body with one more field, as raw JSON text."""
    return f"{VALID_TEXT[:-1]}, {field}}}".encode()


# Bodies sent as application/json, refused with 400; the message mentions the word given.
RAW_CASES = {
    "invalid JSON": (b'{"model": "deepseek-chat", "messages": [', "JSON"),
    "single quotes": (VALID_TEXT.replace('"', "'").encode(), "JSON"),
    "trailing garbage": (VALID_TEXT.encode() + b" x", "JSON"),
    "array": (b"[1, 2]", "object"),
    "string": (b'"hello"', "object"),
    "number": (b"42", "object"),
    "null": (b"null", "object"),
    "empty": (b"", "empty"),
    "blank": (b" \n\t ", "empty"),
    "NaN literal": (extra('"temperature": NaN'), "NaN"),
    "Infinity literal": (extra('"temperature": -Infinity'), "Infinity"),
    "non-UTF-8": (VALID_TEXT.replace("hi", "h\xe9").encode("latin-1"), "UTF-8"),
    "UTF-16": (VALID_TEXT.encode("utf-16"), "UTF-8"),
    "deeply nested": (extra('"metadata": ' + "[" * 3000 + "]" * 3000), "nested"),
    "nested past forwarding": (extra('"metadata": ' + "[" * 500 + "]" * 500), "nested"),
    "lone surrogate": (VALID_TEXT.replace("hi", "hi \\ud800").encode(), "Unicode"),
    "lone surrogate key": (extra('"\\udc00": 1'), "Unicode"),
}


@pytest.mark.parametrize(("raw", "mention"), RAW_CASES.values(), ids=RAW_CASES)
def test_malformed_body_is_400(api: Api, raw: bytes, mention: str) -> None:
    error = assert_openai_error(api.post(raw), 400, param=None)
    assert mention.lower() in error["message"].lower()
    api.assert_rejected_for_free()


@pytest.mark.parametrize(
    ("raw", "content_type"),
    [
        (VALID_TEXT.encode(), "text/plain"),
        (b"model=deepseek-chat&messages=hi", "application/x-www-form-urlencoded"),
        (VALID_TEXT.encode(), "multipart/form-data; boundary=x"),
        (VALID_TEXT.encode(), None),
    ],
    ids=["text", "form", "multipart", "missing"],
)
def test_wrong_content_type_is_400(api: Api, raw: bytes, content_type: str | None) -> None:
    error = assert_openai_error(api.post(raw, content_type), 400, param=None)
    assert "Content-Type must be application/json" in error["message"]
    api.assert_rejected_for_free()


# Numbers JSON cannot carry, anywhere in the body: each would reach the provider as the
# non-JSON `Infinity` or `NaN` if it were parsed and forwarded.
NON_FINITE = {
    "overflow": '"top_p": 1e400',
    "negative overflow": '"top_p": -1e400',
    "capital E": '"presence_penalty": 1E+999',
    "overflow without exponent": '"top_p": 1' + "0" * 400 + ".5",
    "NaN": '"top_p": NaN',
    "Infinity": '"frequency_penalty": Infinity',
    "-Infinity": '"top_p": -Infinity',
    "temperature": '"temperature": 1e999',
    "in a stream": '"stream": true, "top_p": 1e400',
    "in a tool schema": '"tools": [{"type": "function", "function": {"name": "f", '
    '"parameters": {"type": "object", "properties": {"x": {"maximum": 1e400}}}}}]',
    "deep in metadata": '"metadata": {"a": [[{"b": [0.5, -1e400]}]]}',
}


@pytest.mark.parametrize("field", NON_FINITE.values(), ids=NON_FINITE)
def test_non_finite_numbers_are_400(api: Api, field: str) -> None:
    error = assert_openai_error(api.post(extra(field)), 400, param=None, code=None)
    assert error["type"] == "invalid_request_error"
    assert "numbers must be finite" in error["message"]
    api.assert_rejected_for_free()


def test_huge_integers_are_numbers_not_errors(api: Api) -> None:
    """An integer too large for a float is a number out of range, not a 500 (OverflowError);
    elsewhere in the body it is valid JSON and passes through as it came."""
    huge = "1" + "0" * 400
    assert_openai_error(api.post(extra(f'"temperature": {huge}')), 400, param="temperature")
    api.assert_rejected_for_free()
    assert api.post(extra(f'"seed": {huge}, "top_p": 1e-400')).status_code == 200
    [forwarded] = api.upstream.requests
    assert forwarded.body["seed"] == 10**400 and forwarded.body["top_p"] == 0.0


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

    assert len(body_of(SMALL_BODY_LIMIT)) == SMALL_BODY_LIMIT
    assert send(body_of(SMALL_BODY_LIMIT)).status_code == 200
    api.upstream.reset()
    assert_openai_error(send(body_of(SMALL_BODY_LIMIT + 1)), 413, code="request_too_large")
    assert_openai_error(send(body_of(20 * SMALL_BODY_LIMIT)), 413, code="request_too_large")
    assert api.upstream.requests == []
    assert len(usage_records()) == 1  # only the first request


def test_body_limits_hold_under_gunicorn(
    start_gunicorn: Callable[..., Any], config_data: dict[str, Any], ledger: None
) -> None:
    """gunicorn hands the app its own input stream: the limit and the parser still hold."""
    config_data["gateway"]["max_request_bytes"] = SMALL_BODY_LIMIT
    server = start_gunicorn()
    url = f"{server.url}/v1/chat/completions"
    key = keys.create_key("g", "standard")[1]
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    for size, status in ((SMALL_BODY_LIMIT, 200), (SMALL_BODY_LIMIT + 1, 413)):
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
    api.assert_rejected_for_free()


def test_lower_case_bearer_and_extra_spaces_work(api: Api) -> None:
    for value in (f"bearer {api.key}", f"BEARER {api.key}", f"Bearer   {api.key}  "):
        response = api.post(VALID_TEXT, headers={"Authorization": value})
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
    api.assert_rejected_for_free()


@pytest.mark.parametrize(
    "request_id",
    ["has spaces in it", "tab\there", "ctl\x01char", "x" * 500, "quote\"and'", "ünïcode"],
    ids=["spaces", "tab", "control", "long", "quotes", "unicode"],
)
def test_weird_request_id_is_replaced(api: Api, request_id: str) -> None:
    header = request_id if request_id.isascii() else request_id.encode()
    response = api.post(VALID_TEXT, headers={"X-Request-Id": header})
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
    api.assert_rejected_for_free()


@pytest.mark.parametrize("path", ["/v1/nope", "/v1/chat/completion", "/nope", "/v1/"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_unknown_url_is_404_json(api: Api, path: str, method: str) -> None:
    response = requests.request(
        method, api.gateway.url + path, data=VALID_TEXT, headers=api.headers(), timeout=10
    )
    assert_openai_error(response, 404, code="unknown_url")
    api.assert_rejected_for_free()


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
    api.assert_rejected_for_free()


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
    api.assert_rejected_for_free()
