"""Property test: random Messages bodies never get a 5xx from a live gateway.

Mostly valid Anthropic bodies with fields replaced by random JSON (blocks, tools,
tool_choice, system included), sometimes any JSON at all. The answer is a message, a
stream that ends with message_stop, or an error in Anthropic's shape; every request
that reached the provider is metered once, and no other.
"""

from __future__ import annotations

import json
from typing import Any

import requests
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.helpers.clients import Api
from tests.helpers.ledger import usage_records
from tests.helpers.strategies import any_json, any_text

_json = any_json(max_leaves=8)
_block = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, any_text),
    st.just({"type": "image", "source": {"type": "url", "url": "https://e.test/a.png"}}),
    st.just({"type": "tool_result", "tool_use_id": "call_1", "content": "done"}),
)
_assistant_block = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, any_text),
    st.just({"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}}),
    st.just({"type": "thinking", "thinking": "hm", "signature": ""}),
)
_message = st.one_of(
    st.fixed_dictionaries({"role": st.just("user"), "content": any_text | st.lists(_block)}),
    st.fixed_dictionaries(
        {"role": st.just("assistant"), "content": any_text | st.lists(_assistant_block)}
    ),
)
_valid_body = st.fixed_dictionaries(
    {
        "model": st.sampled_from(["deepseek-chat", "qwen-max", "claude-3"]),
        "max_tokens": st.integers(1, 30),
        "messages": st.lists(_message, min_size=1, max_size=3),
    },
    optional={
        "system": any_text | st.just([{"type": "text", "text": "be brief"}]),
        "stream": st.booleans(),
        "temperature": st.floats(0, 1),
        "stop_sequences": st.lists(st.text(max_size=5), max_size=2),
        "tools": st.just([{"name": "f", "input_schema": {"type": "object"}}]),
        "tool_choice": st.sampled_from([{"type": t} for t in ("auto", "any", "none")]),
        "metadata": st.fixed_dictionaries({"user_id": st.text(max_size=8)}),
        "thinking": st.just({"type": "enabled", "budget_tokens": 1024}),
    },
)
_PATHS = [
    ("model",),
    ("max_tokens",),
    ("messages",),
    ("messages", 0),
    ("messages", 0, "role"),
    ("messages", 0, "content"),
    ("messages", 0, "content", 0),
    ("system",),
    ("stream",),
    ("stop_sequences",),
    ("tools",),
    ("tools", 0),
    ("tool_choice",),
    ("metadata",),
]


@st.composite
def documents(draw: st.DrawFn) -> Any:
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


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(document=documents())
def test_random_messages_never_get_a_5xx(api: Api, document: Any) -> None:
    before = (len(api.upstream.requests), len(usage_records()))
    response = requests.post(
        f"{api.gateway.url}/v1/messages",
        data=json.dumps(document),
        headers={"x-api-key": api.key, "Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code < 500, (document, response.text)
    event(f"status {response.status_code}")
    if response.status_code >= 400:
        body = response.json()
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    elif response.headers["Content-Type"].startswith("text/event-stream"):
        assert response.text.endswith('event: message_stop\ndata: {"type":"message_stop"}\n\n')
    else:
        assert response.json()["type"] == "message"
    reached = len(api.upstream.requests) - before[0]
    assert len(usage_records()) - before[1] == reached
