"""Operator endpoints in one process: /healthz, /readyz, /metrics and what it counts."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest
import requests
from prometheus_client import REGISTRY

from keymeai.ops import metrics
from tests.helpers import services
from tests.helpers.config import UPSTREAM_KEY, add_model, add_provider
from tests.helpers.fake_upstream import FakeUpstream
from tests.helpers.metrics import scrape, value
from tests.helpers.servers import Gateway, free_port

ADMIN_TOKEN = "admin-secret-0123456789"
CHAT = "/v1/chat/completions"


def chat(
    gateway: Gateway, key: str, model: str = "deepseek-chat", **body: Any
) -> requests.Response:
    return requests.post(
        f"{gateway.url}{CHAT}",
        json={"model": model, "messages": [{"role": "user", "content": "a b c"}], **body},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )


def test_healthz_and_readyz_answer_when_all_is_up(gateway: Gateway) -> None:
    health = requests.get(f"{gateway.url}/healthz", timeout=5)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    ready = requests.get(f"{gateway.url}/readyz", timeout=5)
    assert ready.status_code == 200
    assert ready.json() == {"status": "ok", "checks": {"ledger": True, "ratelimit_storage": True}}
    assert ready.headers["x-request-id"].startswith("req_")


@pytest.mark.postgres
@pytest.mark.parametrize("database_backend", ["postgres"], indirect=True)
def test_readyz_is_503_once_the_postgres_database_is_gone(
    gateway: Gateway, database_url: str
) -> None:
    assert requests.get(f"{gateway.url}/readyz", timeout=5).status_code == 200
    services.drop_postgres_database(database_url)
    ready = requests.get(f"{gateway.url}/readyz", timeout=10)
    assert ready.status_code == 503
    assert ready.json() == {
        "status": "unavailable",
        "checks": {"ledger": False, "ratelimit_storage": True},
    }
    assert requests.get(f"{gateway.url}/healthz", timeout=5).status_code == 200  # still alive


def test_readyz_is_503_while_redis_is_down(
    start_gateway: Callable[..., Gateway],
    config_data: dict[str, Any],
    redis_server: services.RedisServer,
) -> None:
    config_data["ratelimit"]["storage_uri"] = redis_server.url
    gateway = start_gateway()
    assert requests.get(f"{gateway.url}/readyz", timeout=5).status_code == 200
    redis_server.stop()
    ready = requests.get(f"{gateway.url}/readyz", timeout=10)
    assert ready.status_code == 503
    assert ready.json()["checks"] == {"ledger": True, "ratelimit_storage": False}


def test_readyz_is_503_when_redis_was_never_there(
    start_gateway: Callable[..., Gateway], config_data: dict[str, Any]
) -> None:
    config_data["ratelimit"]["storage_uri"] = f"redis://127.0.0.1:{free_port()}/6"
    gateway = start_gateway()
    ready = requests.get(f"{gateway.url}/readyz", timeout=10)
    assert ready.status_code == 503
    assert ready.json()["checks"] == {"ledger": True, "ratelimit_storage": False}


def test_metrics_need_the_admin_token_when_one_is_set(
    start_gateway: Callable[..., Gateway],
) -> None:
    gateway = start_gateway(env={"KEYMEAI_ADMIN_TOKEN": ADMIN_TOKEN})
    url = f"{gateway.url}/metrics"
    missing = requests.get(url, timeout=5)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_admin_token"
    for header in (f"Bearer {ADMIN_TOKEN}x", "Bearer wrong", f"Basic {ADMIN_TOKEN}", ADMIN_TOKEN):
        assert requests.get(url, headers={"Authorization": header}, timeout=5).status_code == 401
    ok = requests.get(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=5)
    assert ok.status_code == 200
    assert ok.headers["Content-Type"].startswith("text/plain; version=")
    assert "keymeai_requests_total" in ok.text or "# TYPE keymeai_requests counter" in ok.text


def test_metrics_are_open_without_an_admin_token(gateway: Gateway) -> None:
    assert requests.get(f"{gateway.url}/metrics", timeout=5).status_code == 200


def test_metrics_count_requests_tokens_latency_failovers_and_rejections(
    start_gateway: Callable[..., Gateway], config_data: dict[str, Any], upstream: FakeUpstream
) -> None:
    add_provider(config_data, "down", f"{upstream.url}/deepseek/503/v1")
    add_model(config_data, "fallback-chat", [("down", "x"), ("deepseek", "deepseek-chat")])
    config_data["tiers"]["tiny"] = {"requests": ["2 per hour"]}
    config_data["tiers"]["sip"] = {"requests": ["100 per hour"], "tokens_per_month": 1}
    gateway = start_gateway()
    key = gateway.create_key("standard")
    tiny = gateway.create_key("tiny")
    sip = gateway.create_key("sip")
    before = scrape(gateway.url)

    ok = chat(gateway, key)
    assert ok.status_code == 200
    usage = ok.json()["usage"]
    assert chat(gateway, key, "fallback-chat").status_code == 200
    assert [chat(gateway, tiny).status_code for _ in range(3)] == [200, 200, 429]
    assert [chat(gateway, sip).status_code for _ in range(2)] == [200, 429]  # 1 token a month

    after = scrape(gateway.url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ok_labels = {"status": "200", "outcome": "ok"}
    assert delta("keymeai_requests_total", model="deepseek-chat", **ok_labels) == 4
    assert delta("keymeai_requests_total", model="fallback-chat", **ok_labels) == 1
    assert delta("keymeai_tokens_total", kind="prompt") == 5 * usage["prompt_tokens"]
    assert delta("keymeai_tokens_total", kind="completion") == 5 * usage["completion_tokens"]
    assert delta("keymeai_upstream_latency_seconds_count", provider="deepseek") == 5
    assert delta("keymeai_upstream_latency_seconds_count", provider="down") == 0
    assert delta("keymeai_upstream_failures_total", provider="down", reason="http_503") == 1
    assert delta("keymeai_upstream_failures_total", provider="deepseek") == 0
    assert delta("keymeai_limit_rejections_total", reason="requests") == 1
    assert delta("keymeai_limit_rejections_total", reason="tokens") == 1


def test_werkzeug_request_log_has_no_keys(
    gateway: Gateway, key: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        assert chat(gateway, key).status_code == 200
        assert chat(gateway, key[:-2] + "zz").status_code == 401
    assert "POST /v1/chat/completions" in caplog.text
    for secret in (key, key[11:], key[:-2] + "zz", UPSTREAM_KEY, "Bearer"):
        assert secret not in caplog.text


def test_streams_in_flight_gauge_follows_a_stream(gateway: Gateway, key: str) -> None:
    assert value(scrape(gateway.url), "keymeai_streams_in_flight") == 0
    started = threading.Event()
    lines: list[bytes] = []

    def stream() -> None:
        body = {"stream": True, "fake": {"words": 8, "interval": 0.2}}
        with chat_stream(gateway, key, body) as response:
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                    started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(10)
    assert value(scrape(gateway.url), "keymeai_streams_in_flight") == 1
    reader.join(20)
    assert lines[-1] == b"data: [DONE]" and len(lines) > 8
    assert value(scrape(gateway.url), "keymeai_streams_in_flight") == 0


def chat_stream(gateway: Gateway, key: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(
        f"{gateway.url}{CHAT}",
        json={"model": "deepseek-chat", "messages": [{"role": "user", "content": "x"}], **body},
        headers={"Authorization": f"Bearer {key}"},
        stream=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("detail", "reason"),
    [
        ("HTTP 503 server_overloaded", "http_503"),
        ("HTTP 429", "http_429"),
        ("ConnectTimeout", "ConnectTimeout"),
        ("ConnectionError: NewConnectionError: ConnectionRefusedError", "ConnectionError"),
        ("stream ended before its first event: UpstreamEnded", "stream_ended"),
        ("body read failed: ChunkedEncodingError", "body_read_failed"),
        ("anything a provider says, <script>", "other"),
    ],
)
def test_failover_reasons_are_a_bounded_set(detail: str, reason: str) -> None:
    before = REGISTRY.get_sample_value(
        "keymeai_upstream_failures_total", {"provider": "p", "reason": reason}
    )
    metrics.upstream_failed_over("p", detail)
    after = REGISTRY.get_sample_value(
        "keymeai_upstream_failures_total", {"provider": "p", "reason": reason}
    )
    assert after == (before or 0) + 1
