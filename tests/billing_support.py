"""Helpers for the billing, report and admin tests: the admin API over HTTP, the CLI in a
subprocess, a PostgreSQL database of its own, and costs worked out independently."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import pytest
import requests

from tests.conftest import Gateway
from tests.support import PRICES, PROVIDER_ENV, ROOT, write_toml

ADMIN_TOKEN = "admin-test-token-0123456789abcdef"
MILLION = Decimal(1_000_000)
POSTGRES_URL = os.environ.get(
    "KEYMEAI_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
DATABASE_PREFIX = "keymeai_t_"


def expected_cost(
    model: str,
    prompt: int,
    cached: int,
    completion: int,
    prices: Mapping[str, Mapping[str, float]] = PRICES,
) -> Decimal:
    """The pricing rule of docs/metering.md in Decimal dollars, from the test prices."""
    price = {name: Decimal(str(value)) for name, value in prices[model].items()}
    uncached = prompt - cached
    return (
        uncached * price["input"] + cached * price["cached_input"] + completion * price["output"]
    ) / MILLION


class Admin:
    """The admin API over real HTTP, with the admin token unless told otherwise."""

    def __init__(self, base_url: str, token: str | None = ADMIN_TOKEN) -> None:
        self.base = f"{base_url}/admin"
        self.session = requests.Session()
        if token is not None:
            self.session.headers["Authorization"] = f"Bearer {token}"

    def request(self, method: str, path: str, **options: Any) -> requests.Response:
        return self.session.request(method, f"{self.base}{path}", timeout=10, **options)

    def get(self, path: str, **options: Any) -> requests.Response:
        return self.request("GET", path, **options)

    def post(self, path: str, **options: Any) -> requests.Response:
        return self.request("POST", path, **options)

    def patch(self, path: str, **options: Any) -> requests.Response:
        return self.request("PATCH", path, **options)

    def delete(self, path: str, **options: Any) -> requests.Response:
        return self.request("DELETE", path, **options)

    def create(self, **fields: Any) -> dict[str, Any]:
        """A new key (`key` holds the plain key); fails the test unless it is a 201."""
        response = self.post("/keys", json={"name": "test", "tier": "standard", **fields})
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body


def admin_gateway(
    start_gateway: Callable[..., Gateway], data: dict[str, Any] | None = None
) -> tuple[Gateway, Admin]:
    """The gateway with the admin API enabled, and an admin client for it."""
    gateway = start_gateway(data, env={"KEYMEAI_ADMIN_TOKEN": ADMIN_TOKEN})
    return gateway, Admin(gateway.url)


def openai_error(response: requests.Response) -> dict[str, Any]:
    """The `error` object of an OpenAI-shaped error response (checked to be one)."""
    assert response.headers["Content-Type"].startswith("application/json"), response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    error: dict[str, Any] = body["error"]
    return error


def run_cli(config_data: dict[str, Any], path: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m flask --app app ARGS` in a subprocess, on the test's config and ledger."""
    config = write_toml(config_data, path)
    env = {**os.environ, **PROVIDER_ENV, "KEYMEAI_CONFIG": str(config)}
    for name in ("DATABASE_URL", "REDIS_URL", "RATELIMIT_STORAGE_URI", "KEYMEAI_ADMIN_TOKEN"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _maintenance() -> Any:
    conn = psycopg2.connect(POSTGRES_URL, connect_timeout=3)
    conn.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
    return conn


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A new, uniquely named PostgreSQL database (dropped afterwards); its URL.

    Skipped where the server is unreachable, unless KEYMEAI_REQUIRE_SERVICES=1 (CI).
    """
    try:
        conn = _maintenance()
    except psycopg2.Error as exc:
        if os.environ.get("KEYMEAI_REQUIRE_SERVICES") == "1":
            pytest.fail(f"PostgreSQL is required (KEYMEAI_REQUIRE_SERVICES=1): {exc}")
        pytest.skip(f"PostgreSQL unreachable: {str(exc).strip()}")
    name = f"{DATABASE_PREFIX}{uuid.uuid4().hex[:8]}"
    with contextlib.closing(conn), conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(POSTGRES_URL)._replace(path=f"/{name}"))
    finally:
        with contextlib.closing(_maintenance()) as conn, conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
