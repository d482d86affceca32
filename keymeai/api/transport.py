"""HTTP to one provider with requests, at the level of its transport adapter.

`Session.post` merges the session's settings into each request (headers, cookies,
hooks, proxies, auth) on every call; in requests 2.34 that merging costs more than the
rest of the gateway's own work on a request. A provider's settings never change, so they
are prepared once into a template request, and each call copies it, sets the body, and
hands it to the provider's `HTTPAdapter` (requests' documented transport interface),
which keeps a pool of keep-alive connections, safe to share between threads. There is
no session, so no cookie jar: nothing a provider sets is replayed for another customer,
and no redirect is followed.
"""

from __future__ import annotations

import requests
from requests.adapters import HTTPAdapter

from ..catalogue import Provider

USER_AGENT = "keymeai-gateway/1.0"
PATHS = ("/chat/completions", "/embeddings")  # under the provider's base_url


class ProviderClient:
    """POSTs requests (chat completions, embeddings) to one provider."""

    def __init__(self, provider: Provider) -> None:
        self.adapter = HTTPAdapter(pool_connections=1, pool_maxsize=provider.max_connections)
        self.timeout = (provider.connect_timeout, provider.read_timeout)
        # Proxies come from the environment (HTTPS_PROXY, NO_PROXY) once, at start-up.
        self.proxies = requests.utils.get_environ_proxies(provider.base_url)
        headers = {
            "User-Agent": USER_AGENT,
            "Authorization": f"Bearer {provider.api_key}",
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
            "Accept-Encoding": "identity",
        }
        self.templates = {
            path: requests.Request("POST", f"{provider.base_url}{path}", headers=headers).prepare()
            for path in PATHS
        }

    def post(self, body: bytes, path: str = "/chat/completions") -> requests.Response:
        """Send `body` to `path` (one of PATHS); the response's body is left unread
        (stream=True)."""
        request = self.templates[path].copy()
        request.prepare_body(body, None)
        return self.adapter.send(
            request, stream=True, timeout=self.timeout, verify=True, cert=None, proxies=self.proxies
        )

    def close(self) -> None:
        self.adapter.close()
