"""The operator's side over plain HTTP: the admin API with its token, dashboard sessions,
and clients from other local addresses (the wrong-token limit counts per address)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from tests.helpers.servers import Gateway

ADMIN_TOKEN = "admin-test-token-0123456789abcdef"


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


def signed_in(gateway: Gateway, token: str = ADMIN_TOKEN) -> requests.Session:
    """A session signed in to the dashboard (its cookie held)."""
    session = requests.Session()
    response = session.post(f"{gateway.url}/dashboard/signin", data={"token": token}, timeout=10)
    assert response.status_code == 200 and response.url == f"{gateway.url}/dashboard/"
    return session


def csrf(session: requests.Session, url: str) -> str:
    """The CSRF token of the form on the page at `url`."""
    page = session.get(url, timeout=10).text
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, page
    return match.group(1)


class SourceAddress(HTTPAdapter):
    """Connections made from a given local address."""

    def __init__(self, address: str) -> None:
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, source_address=(self.address, 0), **kwargs)


def from_address(address: str) -> requests.Session:
    """A requests session whose connections come from `address` (e.g. 127.0.0.2)."""
    session = requests.Session()
    session.mount("http://", SourceAddress(address))
    return session
