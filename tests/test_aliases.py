"""Model aliases: other ids that reach a model, validated at start-up."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from keymeai.config import parse_config
from keymeai.ledger import keys
from keymeai.tables import ConfigError
from tests.helpers.config import PROVIDER_ENV
from tests.helpers.fake_upstream import FakeUpstream
from tests.helpers.ledger import usage_records
from tests.helpers.servers import Gateway

ALIASES = ["claude-sonnet-4-5", "gpt-4o"]


@pytest.fixture
def aliased(start_gateway: Any, config_data: dict[str, Any]) -> Gateway:
    config_data["models"]["deepseek-chat"]["aliases"] = ALIASES
    return start_gateway(config_data)


def test_an_alias_is_routed_metered_and_priced_as_its_model(
    aliased: Gateway, upstream: FakeUpstream
) -> None:
    client = aliased.client(aliased.create_key())
    response = client.chat.completions.create(
        model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}]
    )
    assert response.choices[0].message.content == "Echo: hi"
    sent = upstream.requests[-1]
    assert sent.shape == "deepseek" and sent.body["model"] == "deepseek-chat"
    record = usage_records()[-1]
    assert record.model == "deepseek-chat"  # reports group by the real model
    direct = client.chat.completions.create(
        model="deepseek-chat", messages=[{"role": "user", "content": "hi"}]
    )
    assert direct.usage == response.usage
    assert usage_records()[-1].cost_units == record.cost_units > 0


def test_models_lists_and_retrieves_aliases(aliased: Gateway) -> None:
    client = aliased.client(aliased.create_key())
    ids = [m.id for m in client.models.list().data]
    assert ids[:5] == [
        "deepseek-chat",
        "deepseek-reasoner",
        "doubao-pro-32k",
        "qwen-max",
        "qwen-plus",
    ]
    assert ids[5:] == ALIASES
    model = client.models.retrieve("gpt-4o")
    assert (model.id, model.owned_by) == ("gpt-4o", "deepseek")


def test_an_allow_list_of_ids_admits_the_aliases_of_its_models(aliased: Gateway) -> None:
    _, key = keys.create_key("limited", "standard", allowed_models="deepseek-chat")
    client = aliased.client(key)
    assert [m.id for m in client.models.list().data] == ["deepseek-chat", *ALIASES]
    client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    _, other = keys.create_key("other", "standard", allowed_models="qwen-plus")
    with pytest.raises(openai.PermissionDeniedError):
        aliased.client(other).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x"}]
        )
    assert [m.id for m in aliased.client(other).models.list().data] == ["qwen-plus"]


@pytest.mark.parametrize(
    ("aliases", "message"),
    [
        (["qwen-plus"], "'qwen-plus' is already the id of the model 'qwen-plus'"),
        (["a b"], "models.deepseek-chat.aliases[0]: a model id is"),
        ([3], "models.deepseek-chat.aliases[0]: expected a string"),
        ("gpt-4o", "models.deepseek-chat.aliases: expected an array"),
    ],
)
def test_bad_aliases_stop_start_up(config_data: dict[str, Any], aliases: Any, message: str) -> None:
    config_data["models"]["deepseek-chat"]["aliases"] = aliases
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(config_data, PROVIDER_ENV)


def test_two_models_may_not_share_an_alias(config_data: dict[str, Any]) -> None:
    config_data["models"]["deepseek-chat"]["aliases"] = ["gpt-4o"]
    config_data["models"]["qwen-plus"]["aliases"] = ["gpt-4o"]
    with pytest.raises(
        ConfigError, match="'gpt-4o' is already an alias of the model 'deepseek-chat'"
    ):
        parse_config(config_data, PROVIDER_ENV)


def test_an_alias_may_not_be_a_later_models_id(config_data: dict[str, Any]) -> None:
    config_data["models"]["deepseek-chat"]["aliases"] = ["qwen-max"]
    with pytest.raises(ConfigError, match="already the id of the model 'qwen-max'"):
        parse_config(config_data, PROVIDER_ENV)
