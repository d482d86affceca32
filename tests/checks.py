"""Shared by the HTTP-level tests: what every gateway error must look like, and raw HTTP."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import requests
from hypothesis import strategies as st

from tests.fake_upstream import FakeUpstream
from tests.support import usage_records

if TYPE_CHECKING:
    from tests.conftest import Gateway

GENERATED_REQUEST_ID = re.compile(r"req_[0-9a-f]{32}")
SMALL_BODY_LIMIT = 16 * 1024  # gateway.max_request_bytes of the `api` fixture
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


@dataclass
class Api:
    """A live gateway with a valid key, for raw HTTP (exact bytes and headers)."""

    gateway: Gateway
    key: str
    upstream: FakeUpstream

    @property
    def url(self) -> str:
        return f"{self.gateway.url}/v1/chat/completions"

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}", **extra}

    def post(
        self, data: Any, content_type: str | None = "application/json", **kw: Any
    ) -> requests.Response:
        headers = self.headers(**({"Content-Type": content_type} if content_type else {}))
        headers.update(kw.pop("headers", {}))
        return requests.post(self.url, data=data, headers=headers, timeout=10, **kw)

    def post_json(self, body: Any) -> requests.Response:
        return self.post(json.dumps(body))

    def assert_rejected_for_free(self) -> None:
        """Nothing reached the upstream and nothing was metered."""
        assert self.upstream.requests == []
        assert usage_records() == []


# Any string a JSON document can carry, including lone surrogates (from \\ud800 escapes),
# which plain text() never draws.
any_text = st.text(max_size=12) | st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2)


def any_json(max_leaves: int) -> st.SearchStrategy[Any]:
    """Any JSON document: scalars (big integers and surrogates included), lists, objects."""
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-(2**70), 2**70)
        | st.floats(allow_nan=False, allow_infinity=False)
        | any_text
    )
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
        ),
        max_leaves=max_leaves,
    )
