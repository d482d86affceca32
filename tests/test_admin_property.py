"""Property test: whatever JSON or query an admin client sends, the admin API answers
with a key, a report or an OpenAI-shaped 4xx, never a 5xx, and stores only valid keys."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keymeai.ledger import keys
from tests.helpers.admin import admin_gateway
from tests.helpers.errors import assert_openai_error
from tests.helpers.servers import Gateway
from tests.helpers.strategies import any_json, any_text

_json = any_json(max_leaves=6)
# Each field: values it accepts, mixed with anything JSON can hold.
_fields = {
    "name": st.sampled_from(["Acme", "  padded  ", "名前"]) | _json,
    "tier": st.sampled_from(["free", "hobby", "scale", "gold"]) | _json,
    "expires_at": st.sampled_from(["2099-01-01", "2099-01-01T00:00:00+08:00", "2001-01-01"])
    | _json,
    "allowed_models": st.lists(st.sampled_from(["qwen-plus", "deepseek-chat", "gpt-4"]), max_size=3)
    | _json,
    "requests": st.lists(st.sampled_from(["5 per minute", "1/second", "x per y"]), max_size=3)
    | _json,
    "tokens_per_month": st.sampled_from([1, 2**63 - 1, 2**63, 0]) | _json,
    "spend_cap": st.sampled_from(["25.00", "0.0000000001", "1e9", "-1", 7, 0.1]) | _json,
}
_bodies = st.fixed_dictionaries({}, optional=_fields) | st.dictionaries(any_text, _json, max_size=3)
_queries = st.dictionaries(
    st.sampled_from(["month", "key", "by", "format", "other"]),
    st.sampled_from(["2026-01", "9999-12", "1", "km-aaaaaaaa", "day", "csv", ""])
    | st.text(max_size=8),
    max_size=4,
)


def _check_answer(response: Any, ok: int) -> None:
    assert response.status_code in (ok, 400, 404), (response.status_code, response.text[:500])
    if response.status_code != ok:
        assert_openai_error(response)


def test_any_input_gets_a_key_a_report_or_a_4xx(start_gateway: Callable[..., Gateway]) -> None:
    _, api = admin_gateway(start_gateway)  # one gateway for all the examples

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(body=_bodies, patch=_bodies, query=_queries)
    def check(body: dict[str, Any], patch: dict[str, Any], query: dict[str, str]) -> None:
        created = api.post("/keys", json=body)
        _check_answer(created, 201)
        if created.status_code == 201:
            shown = created.json()
            row = keys.find_key(str(shown["id"]))
            assert row.tier in ("free", "hobby", "scale") and row.name.strip() == row.name
            assert shown["prefix"] == row.prefix == shown["key"][:11]
            changed = api.patch(f"/keys/{shown['id']}", json=patch)
            _check_answer(changed, 200)
            if changed.status_code == 400:
                unchanged = api.get(f"/keys/{shown['id']}").json()
                assert unchanged == {k: v for k, v in shown.items() if k != "key"}
        _check_answer(api.get("/usage", params=query), 200)

    check()
