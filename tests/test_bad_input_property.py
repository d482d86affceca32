"""Property test for bad input: random JSON documents never get a 5xx from a live gateway.

Hypothesis throws documents with random types in every documented field (and in a few
pass-through ones) at the gateway over real HTTP. Whatever it sends, the answer is a
completion, a stream or an error in OpenAI's shape, and the ledger holds one record per
request that reached the upstream, and no other.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.helpers.clients import Api
from tests.helpers.errors import assert_openai_error
from tests.helpers.ledger import usage_records
from tests.helpers.strategies import any_json, any_text

_json = any_json(max_leaves=8)
# Where integer types end: int32, float64's exact range, int64, uint64.
_INT_EDGES = [2**31 - 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64]
_valid_body = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["deepseek-chat", "qwen-max", "doubao-pro-32k", "gpt-4"]),
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["system", "user", "assistant"]), "content": any_text}
            ),
            min_size=1,
            max_size=3,
        ),
    },
    optional={
        "temperature": st.floats(0, 2),
        "max_tokens": st.integers(1, 30) | st.sampled_from(_INT_EDGES),
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "top_p": st.floats(0, 1),
        "stop": st.lists(st.text(max_size=5), max_size=2),
        "user": st.text(max_size=10),
        "seed": st.integers(0, 2**31),
    },
)
# Where a mutation may strike: a documented field, a message's parts, an extra field.
_PATHS = [
    ("model",),
    ("messages",),
    ("messages", 0),
    ("messages", 0, "role"),
    ("messages", 0, "content"),
    ("messages", -1, "content"),
    ("temperature",),
    ("max_tokens",),
    ("stream",),
    ("stream_options",),
    ("stream_options", "include_usage"),
    ("n",),
    ("tools",),
    ("response_format",),
]


@st.composite
def documents(draw: st.DrawFn) -> Any:
    """Mostly a valid body with up to three fields replaced by random JSON or removed;
    sometimes any JSON document at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(_json)
    body = draw(_valid_body)
    for path in draw(st.lists(st.sampled_from(_PATHS), max_size=3, unique=True)):
        parent: Any = body
        for step in path[:-1]:
            if isinstance(parent, dict):
                parent = parent.get(step)
            elif isinstance(parent, list) and parent and isinstance(step, int):
                parent = parent[step]
            else:
                parent = None
        if isinstance(parent, dict) and draw(st.booleans()):
            parent.pop(path[-1], None)
        elif isinstance(parent, dict) or (
            isinstance(parent, list) and parent and isinstance(path[-1], int)
        ):
            parent[path[-1]] = draw(_json)
    return body


@pytest.fixture
def quota_api(api: Api) -> Api:
    """The `api` gateway, with a key on the tier that has a monthly token quota, so that
    the quota's bookkeeping sees the random values too."""
    api.key = api.gateway.create_key("hobby")
    return api


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(document=documents())
def test_random_documents_never_get_a_5xx(quota_api: Api, document: Any) -> None:
    """Whatever the JSON, the answer is a completion, a stream or an OpenAI error; every
    request that reached the upstream is metered once, and no other."""
    api = quota_api
    before = (len(api.upstream.requests), len(usage_records()))
    response = api.post(json.dumps(document))
    assert response.status_code < 500, (document, response.text)
    event(f"status {response.status_code}")  # see --hypothesis-show-statistics
    assert response.headers["x-request-id"]
    if response.status_code >= 400:
        assert_openai_error(response, response.status_code)
    elif response.headers["Content-Type"].startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n")
    else:
        assert response.json()["object"] == "chat.completion"
    reached = len(api.upstream.requests) - before[0]
    assert len(usage_records()) - before[1] == reached
