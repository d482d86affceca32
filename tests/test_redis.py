"""Shared limiter storage: REDIS_URL, RATELIMIT_STORAGE_URI over it, and rediss:// (TLS)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.helpers import services
from tests.helpers.servers import Gateway


def chat_statuses(gateway: Gateway, key: str, count: int) -> list[int]:
    return [
        requests.post(
            f"{gateway.url}/v1/chat/completions",
            json={"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        ).status_code
        for _ in range(count)
    ]


def limiter_keys(url: str) -> list[str]:
    with services.redis_client(url) as client:
        return [k.decode() for k in client.keys("*")]


@pytest.fixture
def tiny_tier(config_data: dict[str, Any]) -> dict[str, Any]:
    """The config with a "tiny" tier of 2 requests an hour, on memory:// in the file."""
    config_data["tiers"]["tiny"] = {"requests": ["2 per hour"]}
    assert config_data["ratelimit"]["storage_uri"] == "memory://"
    return config_data


@pytest.mark.redis
def test_redis_url_from_the_environment_holds_the_limits(
    start_gateway: Callable[..., Gateway], tiny_tier: dict[str, Any], redis_url: str
) -> None:
    first = start_gateway(env={"REDIS_URL": redis_url})
    key = first.create_key("tiny")
    assert chat_statuses(first, key, 1) == [200]
    assert any("key:" in k for k in limiter_keys(redis_url))
    # Another gateway on the same Redis sees the same count (memory:// would not).
    second = start_gateway(env={"REDIS_URL": redis_url})
    assert chat_statuses(second, key, 2) == [200, 429]
    assert chat_statuses(first, key, 1) == [429]


@pytest.mark.redis
def test_ratelimit_storage_uri_wins_over_redis_url(
    start_gateway: Callable[..., Gateway], tiny_tier: dict[str, Any], redis_url: str
) -> None:
    with services.redis_database() as chosen:
        gateway = start_gateway(env={"REDIS_URL": redis_url, "RATELIMIT_STORAGE_URI": chosen})
        assert chat_statuses(gateway, gateway.create_key("tiny"), 3) == [200, 200, 429]
        assert any("key:" in k for k in limiter_keys(chosen))
        assert limiter_keys(redis_url) == []


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[services.RedisServer]:
    """A TLS-only redis-server with a self-signed certificate, like hosted Redis."""
    server = services.RedisServer(tmp_path, tls=True).start()
    yield server
    server.kill()


@pytest.mark.parametrize("verify", ["none", "ca"])
def test_rediss_url_holds_the_limits_over_tls(
    start_gateway: Callable[..., Gateway],
    tiny_tier: dict[str, Any],
    tls_redis: services.RedisServer,
    verify: str,
) -> None:
    query = "ssl_cert_reqs=none" if verify == "none" else f"ssl_ca_certs={tls_redis.cert_path}"
    url = f"{tls_redis.url}?{query}"
    assert url.startswith("rediss://")
    gateway = start_gateway(env={"REDIS_URL": url})
    assert requests.get(f"{gateway.url}/readyz", timeout=10).json()["checks"] == {
        "ledger": True,
        "ratelimit_storage": True,
    }
    assert chat_statuses(gateway, gateway.create_key("tiny"), 3) == [200, 200, 429]
    with tls_redis.client(f"{tls_redis.url}?ssl_cert_reqs=none") as client:
        assert any(b"key:" in k for k in client.keys("*"))


def test_rediss_with_an_unverifiable_certificate_is_not_ready(
    start_gateway: Callable[..., Gateway], tiny_tier: dict[str, Any], tls_redis: Any
) -> None:
    """A self-signed certificate fails verification by default: /readyz says so."""
    gateway = start_gateway(env={"REDIS_URL": tls_redis.url})
    ready = requests.get(f"{gateway.url}/readyz", timeout=10)
    assert ready.status_code == 503
    assert ready.json()["checks"]["ratelimit_storage"] is False


def test_tls_verify_false_accepts_a_self_signed_redis_url_as_given(
    start_gateway: Callable[..., Gateway],
    tiny_tier: dict[str, Any],
    tls_redis: services.RedisServer,
) -> None:
    """Heroku's REDIS_URL as it comes (no query string): `tls_verify = false` is enough."""
    tiny_tier["ratelimit"]["tls_verify"] = False
    gateway = start_gateway(env={"REDIS_URL": tls_redis.url})
    assert requests.get(f"{gateway.url}/readyz", timeout=10).status_code == 200
    assert chat_statuses(gateway, gateway.create_key("tiny"), 3) == [200, 200, 429]
