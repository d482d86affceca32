"""What the gateway's errors and logs must look like: OpenAI's error body, and no
provider secret in anything a client or a log line gets."""

from __future__ import annotations

import re
from typing import Any

import pytest
import requests

from keymeai.ops.logs import JsonFormatter
from tests.helpers.config import UPSTREAM_KEY

GENERATED_REQUEST_ID = re.compile(r"req_[0-9a-f]{32}")
_ANY: Any = object()


def assert_openai_error(
    response: requests.Response,
    status: int | None = None,
    *,
    param: Any = _ANY,
    code: Any = _ANY,
    type: Any = _ANY,
) -> dict[str, Any]:
    """The response is OpenAI's error body, as JSON, with a request id (and `status`,
    when given).

    Returns the `error` object; `param`, `code` and `type` are checked when given.
    """
    if status is not None:
        assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers.get("Content-Type", "").startswith("application/json")
    assert response.headers.get("x-request-id")
    body = response.json()
    assert list(body) == ["error"], body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"].strip()
    assert isinstance(error["type"], str) and error["type"]
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)
    assert "Traceback" not in response.text
    for name, expected in (("param", param), ("code", code), ("type", type)):
        if expected is not _ANY:
            assert error[name] == expected, (name, error)
    return dict(error)


def assert_no_secrets(text: str, fake_url: str, *keys: str) -> None:
    """`text` (an error, a stream, a log) names no provider key, provider address or km- key."""
    host = fake_url.removeprefix("http://")
    for secret in (UPSTREAM_KEY, host, *keys):
        assert secret not in text, f"{secret!r} leaked"
    assert "Traceback" not in text


def log_text(caplog: pytest.LogCaptureFixture) -> str:
    """Captured log records as the JSON lines production writes (message and extras)."""
    formatter = JsonFormatter()
    return "\n".join(formatter.format(record) for record in caplog.records)
