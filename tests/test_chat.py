"""Chat completions through the gateway with the official openai SDK, as customers use it."""

from __future__ import annotations

import pytest
from openai import OpenAI

from keymeai.ledger.models import UsageRecord
from tests.helpers.config import UPSTREAM_KEY
from tests.helpers.fake_upstream import FakeUpstream
from tests.helpers.ledger import usage_records

MODELS = ["deepseek-chat", "deepseek-reasoner", "doubao-pro-32k", "qwen-max", "qwen-plus"]


def last_record() -> UsageRecord:
    return usage_records()[-1]


@pytest.mark.parametrize("model", MODELS)
def test_non_stream_answer_and_ledger_match_upstream(
    client: OpenAI, upstream: FakeUpstream, model: str
) -> None:
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Explain quantum computing"}]
    )
    assert response.choices[0].message.content == "Echo: Explain quantum computing"
    sent = upstream.requests[-1]
    reported = sent.response_usage
    assert response.usage is not None
    assert response.usage.prompt_tokens == reported["prompt_tokens"]
    record = last_record()
    assert (record.prompt_tokens, record.completion_tokens) == (
        reported["prompt_tokens"],
        reported["completion_tokens"],
    )
    assert record.total_tokens == reported["prompt_tokens"] + reported["completion_tokens"]
    assert not record.estimated
    assert record.model == model
    assert record.status == 200 and record.outcome == "ok"
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("include_usage", [True, False])
def test_stream_relays_chunks_and_meters_exactly(
    client: OpenAI, upstream: FakeUpstream, model: str, include_usage: bool
) -> None:
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "one two three four"}],
        stream=True,
        **options,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo: one two three four"
    usages = [c.usage for c in chunks if c.usage is not None]
    sent = upstream.requests[-1]
    assert sent.body["stream_options"] == {"include_usage": True}  # always asked upstream
    reported = sent.response_usage
    if include_usage:
        assert len(usages) == 1
        assert usages[0].completion_tokens == reported["completion_tokens"]
    else:
        assert usages == []
    record = last_record()
    assert record.prompt_tokens == reported["prompt_tokens"]
    assert record.completion_tokens == reported["completion_tokens"]
    assert not record.estimated and record.stream


def test_reasoning_content_and_cache_fields_pass_through(client: OpenAI) -> None:
    response = client.chat.completions.create(
        model="deepseek-reasoner",
        messages=[{"role": "user", "content": "think"}],
        extra_body={"fake": {"cached": 2}},
    )
    message = response.choices[0].message.model_dump()
    assert message["reasoning_content"] == "Thinking about the question."
    usage = response.usage.model_dump()
    assert usage["prompt_cache_hit_tokens"] == 2
    record = last_record()
    assert record.cached_tokens == 2
    assert record.reasoning_tokens == 4


def test_other_parameters_pass_through_and_model_is_mapped(
    client: OpenAI, upstream: FakeUpstream
) -> None:
    client.chat.completions.create(
        model="doubao-pro-32k",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        temperature=0.2,
        top_p=0.9,
        stop=["\n\n"],
        seed=7,
        presence_penalty=0.1,
        user="customer-42",
        response_format={"type": "text"},
    )
    body = upstream.requests[-1].body
    assert body["model"] == "doubao-pro-32k-241215"
    for name, value in [
        ("temperature", 0.2),
        ("top_p", 0.9),
        ("stop", ["\n\n"]),
        ("seed", 7),
        ("presence_penalty", 0.1),
        ("user", "customer-42"),
        ("response_format", {"type": "text"}),
    ]:
        assert body[name] == value


def test_integers_beyond_64_bits_reach_the_upstream_exactly(
    client: OpenAI, upstream: FakeUpstream
) -> None:
    """orjson writes the upstream's body, but not such integers: they must not turn into
    floats or be refused (the provider decides what it makes of them)."""
    big = 2**70 + 1
    client.chat.completions.create(
        model="deepseek-chat",
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"seed": big, "metadata": {"n": -big, "ok": 1.5}},
    )
    body = upstream.requests[-1].body
    assert body["seed"] == big and body["metadata"] == {"n": -big, "ok": 1.5}


def test_raw_response_headers(client: OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="deepseek-chat",
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"X-Request-Id": "my-trace-123"},
    )
    assert raw.headers["x-request-id"] == "my-trace-123"
    assert raw.headers["x-ratelimit-limit-requests"] == "3000"
    assert raw.headers["x-ratelimit-remaining-requests"] == "2999"
    assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
    assert raw.parse().choices[0].message.content == "Echo: hi"
    assert last_record().request_id == "my-trace-123"


def test_models_list_and_retrieve(client: OpenAI) -> None:
    listed = client.models.list()
    assert [m.id for m in listed.data] == MODELS
    assert all(m.object == "model" for m in listed.data)
    assert client.models.retrieve("qwen-max").owned_by == "alibaba"
