"""Assertions shared by the HTTP-level tests: what every gateway error must look like."""

from __future__ import annotations

import re
from typing import Any

import requests

GENERATED_REQUEST_ID = re.compile(r"req_[0-9a-f]{32}")
_ANY: Any = object()


def assert_openai_error(
    response: requests.Response,
    status: int,
    *,
    param: Any = _ANY,
    code: Any = _ANY,
    type: Any = _ANY,
) -> dict[str, Any]:
    """The response is `status` with OpenAI's error body, as JSON, with a request id.

    Returns the `error` object; `param`, `code` and `type` are checked when given.
    """
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
