"""POST /v1/embeddings with the openai SDK, through a real server to the fake provider."""

from __future__ import annotations

import base64
import struct
import time
from typing import Any

import openai
import pytest
import requests

from keymeai.config import parse_config
from keymeai.ledger import keys
from keymeai.ledger.billing import Usage, cost_units
from keymeai.tables import ConfigError
from tests.helpers.config import PROVIDER_ENV, add_provider
from tests.helpers.fake_replies import embedding_vector
from tests.helpers.fake_upstream import FakeUpstream
from tests.helpers.ledger import usage_records
from tests.helpers.servers import Gateway

EMBEDDING_MODELS = {  # gateway id -> (provider, upstream model)
    "text-embedding-v4": ("dashscope", "text-embedding-v4"),
    "doubao-embedding-text": ("ark", "doubao-embedding-text-240715"),
}


def add_embedding_models(data: dict[str, Any]) -> None:
    for model_id, (provider, upstream) in EMBEDDING_MODELS.items():
        data["models"][model_id] = {
            "kind": "embedding",
            "upstreams": [{"provider": provider, "model": upstream}],
            "price": {"input": 0.072},
        }
    add_provider(data, "down", "http://127.0.0.1:9/dashscope/ok/compatible-mode/v1")
    data["models"]["embed-failover"] = {
        "kind": "embedding",
        "aliases": ["text-embedding-3-small"],
        "upstreams": [
            {"provider": "down", "model": "text-embedding-v4"},
            {"provider": "dashscope", "model": "text-embedding-v4"},
        ],
        "price": {"input": 0.072},
    }


@pytest.fixture
def gw(start_gateway: Any, config_data: dict[str, Any]) -> Gateway:
    add_embedding_models(config_data)
    return start_gateway(config_data)


@pytest.fixture
def client(gw: Gateway) -> openai.OpenAI:
    return gw.client(gw.create_key())


@pytest.mark.parametrize("model", list(EMBEDDING_MODELS))
def test_single_input_returns_the_providers_vector_and_is_metered(
    client: openai.OpenAI, upstream: FakeUpstream, model: str
) -> None:
    # The SDK asks for base64 by default and decodes it: the gateway asked for floats.
    response = client.embeddings.create(model=model, input="hello embedding world")
    sent = upstream.requests[-1]
    provider, upstream_model = EMBEDDING_MODELS[model]
    assert sent.shape == provider and sent.path.endswith("/embeddings")
    assert sent.body["model"] == upstream_model and sent.body["encoding_format"] == "float"
    assert len(response.data) == 1
    assert response.data[0].embedding == embedding_vector("hello embedding world")
    assert response.usage.prompt_tokens == sent.response_usage["prompt_tokens"] == 3
    assert response.usage.total_tokens == 3
    record = usage_records()[-1]
    assert (record.model, record.provider, record.upstream_model) == (
        model,
        provider,
        upstream_model,
    )
    assert (record.prompt_tokens, record.completion_tokens, record.total_tokens) == (3, 0, 3)
    assert not record.estimated and record.outcome == "ok" and not record.stream
    assert record.cost_units == 3 * 720  # 0.072 USD / 1M tokens = 720 units a token


def test_batch_input_in_order_with_float_encoding(
    client: openai.OpenAI, upstream: FakeUpstream
) -> None:
    texts = ["one", "two words", "three more words"]
    response = client.embeddings.create(
        model="text-embedding-v4", input=texts, encoding_format="float", dimensions=64
    )
    sent = upstream.requests[-1]
    assert sent.body["input"] == texts and sent.body["dimensions"] == 64
    assert [d.index for d in response.data] == [0, 1, 2]
    assert [d.embedding for d in response.data] == [embedding_vector(t, 64) for t in texts]
    assert response.usage.prompt_tokens == 6
    assert usage_records()[-1].prompt_tokens == 6


def test_base64_encoding_is_little_endian_float32(
    gw: Gateway, client: openai.OpenAI, upstream: FakeUpstream
) -> None:
    raw = client.embeddings.with_raw_response.create(
        model="doubao-embedding-text", input="abc", encoding_format="base64", dimensions=8
    )
    body = raw.http_response.json()
    encoded = body["data"][0]["embedding"]
    assert isinstance(encoded, str)
    assert list(struct.unpack("<8f", base64.b64decode(encoded))) == embedding_vector("abc", 8)
    assert body["usage"] == {"prompt_tokens": 1, "total_tokens": 1}
    assert upstream.requests[-1].body["encoding_format"] == "float"


def test_failover_to_the_second_upstream_and_alias(
    client: openai.OpenAI, upstream: FakeUpstream
) -> None:
    response = client.embeddings.create(model="text-embedding-3-small", input="x y")
    assert response.data[0].embedding == embedding_vector("x y")
    record = usage_records()[-1]
    assert record.model == "embed-failover"
    assert (record.provider, record.attempts) == ("dashscope", 2)
    assert record.prompt_tokens == 2


def test_failover_after_an_upstream_fault(
    gw: Gateway, start_gateway: Any, config_data: dict[str, Any], upstream: FakeUpstream
) -> None:
    add_provider(config_data, "flaky", f"{upstream.url}/ark/503/api/v3")
    config_data["models"]["embed-flaky"] = {
        "kind": "embedding",
        "upstreams": [
            {"provider": "flaky", "model": "doubao-embedding-text-240715"},
            {"provider": "ark", "model": "doubao-embedding-text-240715"},
        ],
        "price": {"input": 0.07},
    }
    other = start_gateway(config_data)
    client = other.client(other.create_key())
    client.embeddings.create(model="embed-flaky", input="hi")
    assert [r.mode for r in upstream.requests] == ["503", "ok"]
    assert usage_records()[-1].attempts == 2


def test_wrong_kind_gets_400_both_ways(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="deepseek-chat", input="hi")
    assert caught.value.code == "wrong_model_kind" and caught.value.param == "model"
    assert "/v1/chat/completions" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="text-embedding-v4", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.code == "wrong_model_kind"
    assert "/v1/embeddings" in caught.value.message
    assert upstream.count() == 0


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"input": [1, 2, 3]}, "input[0]"),
        ({"input": [[1, 2]]}, "input[0]"),
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": ["ok", 3.5]}, "input[1]"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
        ({"input": "x", "dimensions": "64"}, "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "x", "stream": True}, "stream"),
        ({}, "input"),
    ],
)
def test_bad_input_gets_400_without_an_upstream_call(
    gw: Gateway, upstream: FakeUpstream, extra: dict[str, Any], param: str
) -> None:
    key = gw.create_key()
    response = requests.post(
        f"{gw.url}/v1/embeddings",
        json={"model": "text-embedding-v4", **extra},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    if "token arrays" in response.text:
        assert param == "input[0]"
    assert upstream.count() == 0


def test_provider_refusal_is_a_400(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="text-embedding-v4", input=[str(i) for i in range(11)])
    assert "batch size is invalid" in caught.value.message
    assert upstream.count() == 1


@pytest.mark.parametrize("limit", [{"spend_cap_units": 1}, {"tokens_per_month": 3}])
def test_token_quota_and_spend_cap_refuse(
    gw: Gateway, upstream: FakeUpstream, limit: dict[str, int]
) -> None:
    _, key = keys.create_key("limited", "standard", **limit)
    client = gw.client(key)
    client.embeddings.create(model="text-embedding-v4", input="a b c")  # uses 3 tokens
    assert usage_records()[-1].prompt_tokens == 3
    with pytest.raises(openai.RateLimitError) as caught:
        client.embeddings.create(model="text-embedding-v4", input="more")
    assert caught.value.code == "insufficient_quota"
    assert upstream.count() == 1


def test_models_lists_embedding_models(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert {"text-embedding-v4", "doubao-embedding-text", "text-embedding-3-small"} <= set(ids)


def test_unauthenticated_is_401(gw: Gateway) -> None:
    with pytest.raises(openai.AuthenticationError):
        gw.client("km-nope").embeddings.create(model="text-embedding-v4", input="x")


def test_an_embedding_price_has_input_only(config_data: dict[str, Any]) -> None:
    add_embedding_models(config_data)
    config_data["models"]["text-embedding-v4"]["price"]["output"] = 1
    with pytest.raises(ConfigError, match=r"price.output: an embedding model's price"):
        parse_config(config_data, PROVIDER_ENV)
    config_data["models"]["text-embedding-v4"]["kind"] = "vector"
    with pytest.raises(ConfigError, match=r'kind: must be "chat" or "embedding"'):
        parse_config(config_data, PROVIDER_ENV)


def test_cost_matches_the_billing(gw: Gateway) -> None:
    model = gw.app.extensions["keymeai"].config.models["text-embedding-v4"]
    assert cost_units(model.price, Usage(prompt=3)) == 3 * 720


def test_chat_and_embeddings_share_the_keys_request_limit(
    start_gateway: Any, config_data: dict[str, Any], upstream: FakeUpstream
) -> None:
    add_embedding_models(config_data)
    config_data["tiers"]["tiny"] = {"requests": ["2 per minute"]}
    gw = start_gateway(config_data)
    client = gw.client(gw.create_key("tiny"))
    client.chat.completions.create(
        model="deepseek-chat", messages=[{"role": "user", "content": "hi"}]
    )
    client.embeddings.create(model="text-embedding-v4", input="hi")
    with pytest.raises(openai.RateLimitError) as caught:
        client.embeddings.create(model="text-embedding-v4", input="hi")
    assert caught.value.code == "rate_limit_exceeded"
    assert upstream.count() == 2


def test_an_embedding_takes_a_concurrency_slot(
    start_gateway: Any, config_data: dict[str, Any], upstream: FakeUpstream
) -> None:
    add_embedding_models(config_data)
    config_data["tiers"]["single"] = {"requests": ["100 per minute"], "max_concurrent": 1}
    gw = start_gateway(config_data)
    client = gw.client(gw.create_key("single"))
    stream = client.chat.completions.create(
        model="deepseek-chat",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_body={"fake": {"words": 40, "interval": 0.5}},
    )
    next(iter(stream))  # admitted, and held open
    with pytest.raises(openai.RateLimitError) as caught:
        client.embeddings.create(model="text-embedding-v4", input="hi")
    assert "Too many concurrent requests" in caught.value.message
    stream.close()
    deadline = time.monotonic() + 10
    while True:  # the slot frees once the gateway notices the hang-up
        try:
            client.embeddings.create(model="text-embedding-v4", input="hi")
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert [r.path.endswith("/embeddings") for r in upstream.requests] == [False, True]


def test_an_answer_without_data_is_a_500_and_recorded(
    start_gateway: Any, config_data: dict[str, Any], upstream: FakeUpstream
) -> None:
    add_provider(config_data, "odd", f"{upstream.url}/dashscope/wrongshape/compatible-mode/v1")
    config_data["models"]["embed-odd"] = {
        "kind": "embedding",
        "upstreams": [{"provider": "odd", "model": "text-embedding-v4"}],
        "price": {"input": 0.072},
    }
    gw = start_gateway(config_data)
    with pytest.raises(openai.InternalServerError) as caught:
        gw.client(gw.create_key()).embeddings.create(model="embed-odd", input="hi")
    assert caught.value.code == "upstream_model_error"
    record = usage_records()[-1]
    assert (record.model, record.status, record.outcome) == ("embed-odd", 500, "upstream_error")
    assert record.cost_units == 0
