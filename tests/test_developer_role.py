"""The `developer` role: accepted, and sent to every provider as `system`."""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI

from tests.helpers.fake_upstream import FakeUpstream
from tests.helpers.ledger import usage_records

# One model per provider shape: DeepSeek, Ark, DashScope.
MODELS = ["deepseek-chat", "doubao-pro-32k", "qwen-plus"]


@pytest.mark.parametrize("model", MODELS)
def test_developer_message_goes_upstream_as_system(
    client: OpenAI, upstream: FakeUpstream, model: str
) -> None:
    response = client.chat.completions.create(
        model=model,
        messages=[
            {"role": "developer", "content": "Answer in French."},
            {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": "hello there"},
        ],
    )
    assert response.choices[0].message.content == "Echo: hello there"
    sent = upstream.requests[-1].body["messages"]
    assert sent == [
        {"role": "system", "content": "Answer in French."},
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": "hello there"},
    ]
    record = usage_records()[-1]
    assert record.model == model and record.outcome == "ok"


def test_developer_message_follows_the_content_rules(
    client: OpenAI, upstream: FakeUpstream
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="deepseek-chat",
            messages=[{"role": "developer"}, {"role": "user", "content": "hi"}],
        )
    assert caught.value.body["param"] == "messages[0].content"
    assert upstream.count() == 0


def test_a_request_without_developer_messages_goes_as_sent(
    client: OpenAI, upstream: FakeUpstream
) -> None:
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"}]
    client.chat.completions.create(model="qwen-plus", messages=messages)
    assert upstream.requests[-1].body["messages"] == messages
