"""Wrong admin tokens are limited per client address: /admin, /metrics and the dashboard's
sign-in share one count of 10 a minute, in the app's limiter storage (Redis across
instances). Clients are told apart by their real source address (all of 127/8 is local)
or, behind a trusted proxy, by X-Forwarded-For."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests

from tests.helpers.admin import ADMIN_TOKEN, admin_gateway, from_address
from tests.helpers.errors import assert_openai_error
from tests.helpers.servers import Gateway, Gunicorn, free_port
from tests.helpers.services import redis_client

ADMIN_ENV = {"KEYMEAI_ADMIN_TOKEN": ADMIN_TOKEN}
LIMIT = 10


class Client:
    """One client address trying the three doors that take the admin token."""

    def __init__(self, url: str, address: str) -> None:
        self.url = url
        self.http = from_address(address)

    def admin(self, token: str) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"}
        return self.http.get(f"{self.url}/admin/keys", headers=headers, timeout=10)

    def metrics(self, token: str) -> requests.Response:
        headers = {"Authorization": f"Bearer {token}"}
        return self.http.get(f"{self.url}/metrics", headers=headers, timeout=10)

    def sign_in(self, token: str) -> requests.Response:
        self.http.cookies.clear()
        return self.http.post(
            f"{self.url}/dashboard/signin",
            data={"token": token},
            allow_redirects=False,
            timeout=10,
        )

    def all_doors(self, token: str) -> list[requests.Response]:
        return [self.admin(token), self.metrics(token), self.sign_in(token)]


def assert_blocked(response: requests.Response) -> None:
    """A 429 with a Retry-After of at most the window: JSON for the APIs, HTML for the page."""
    assert response.status_code == 429, response.text
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert ADMIN_TOKEN not in response.text
    if response.url.endswith("/dashboard/signin"):
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        assert "Too many wrong admin tokens from your address" in response.text
    else:
        error = assert_openai_error(response)
        assert error["code"] == "too_many_attempts"
        assert "Too many wrong admin tokens" in error["message"]


def statuses(responses: list[requests.Response]) -> list[int]:
    return [response.status_code for response in responses]


def test_wrong_tokens_count_together_on_admin_metrics_and_sign_in(
    start_gunicorn: Callable[..., Gunicorn],
) -> None:
    server = start_gunicorn(env=ADMIN_ENV)
    guesser, other = Client(server.url, "127.0.0.2"), Client(server.url, "127.0.0.3")

    # Right tokens are not counted, however many; nor is no token at all (a scraper
    # not given the token yet).
    for _ in range(2 * LIMIT):
        assert statuses([guesser.admin(ADMIN_TOKEN), guesser.metrics(ADMIN_TOKEN)]) == [200, 200]
    for _ in range(LIMIT + 1):
        bare = guesser.http.get(f"{server.url}/metrics", timeout=10)
        assert bare.status_code == 401
        assert guesser.admin("").status_code == 401

    wrong = [guesser.admin(f"guess-{n}") for n in range(4)]
    wrong += [guesser.metrics(f"guess-{n}") for n in range(4)]
    wrong += [guesser.sign_in(f"guess-{n}") for n in range(2)]
    assert statuses(wrong) == [401] * LIMIT
    assert assert_openai_error(wrong[0])["code"] == "invalid_admin_token"

    eleventh = guesser.sign_in("guess-10")  # the 3rd sign-in: under the form's own 5 a minute
    assert_blocked(eleventh)
    for response in guesser.all_doors("guess-11") + guesser.all_doors(ADMIN_TOKEN):
        assert_blocked(response)  # the right token too, on every door

    # Another address is not affected.
    assert statuses(other.all_doors(ADMIN_TOKEN)) == [200, 200, 303]
    assert statuses(other.all_doors("guess")) == [401, 401, 401]


def test_behind_a_trusted_proxy_the_forwarded_client_is_counted(
    start_gateway: Callable[..., Gateway], config_data: dict[str, Any]
) -> None:
    config_data["gateway"]["trusted_proxies"] = 1
    gateway = admin_gateway(start_gateway)[0]

    def admin(client: str, token: str) -> requests.Response:
        return requests.get(
            f"{gateway.url}/admin/keys",
            headers={"Authorization": f"Bearer {token}", "X-Forwarded-For": client},
            timeout=10,
        )

    assert statuses([admin("203.0.113.7", "guess") for _ in range(LIMIT)]) == [401] * LIMIT
    assert_blocked(admin("203.0.113.7", ADMIN_TOKEN))
    assert admin("198.51.100.9", ADMIN_TOKEN).status_code == 200  # same proxy, another client


@pytest.mark.redis
def test_concurrent_guesses_get_at_most_ten_answers(
    start_gunicorn: Callable[..., Gunicorn], config_data: dict[str, Any], redis_url: str
) -> None:
    """Each wrong token is counted atomically before it is answered: however many guesses
    are in flight at once, only 10 of them learn that they were wrong."""
    config_data["ratelimit"]["storage_uri"] = redis_url
    server = start_gunicorn(env={**ADMIN_ENV, "WEB_CONCURRENCY": "2"})

    def guess(n: int) -> int:
        with from_address("127.0.0.2") as http:
            headers = {"Authorization": f"Bearer guess-{n}"}
            return http.get(f"{server.url}/admin/keys", headers=headers, timeout=10).status_code

    with ThreadPoolExecutor(20) as pool:
        answers = Counter(pool.map(guess, range(60)))
    assert answers == {401: LIMIT, 429: 60 - LIMIT}


@pytest.mark.redis
def test_the_count_is_shared_by_instances_and_ends_with_its_window(
    start_gunicorn: Callable[..., Gunicorn], config_data: dict[str, Any], redis_url: str
) -> None:
    config_data["ratelimit"]["storage_uri"] = redis_url
    first = start_gunicorn(env=ADMIN_ENV, wait=False)
    second = start_gunicorn(env=ADMIN_ENV)
    first.ready()
    one, two = Client(first.url, "127.0.0.2"), Client(second.url, "127.0.0.2")
    answers = []
    for n in range(2):
        answers += [
            one.admin(f"a{n}"),
            two.metrics(f"b{n}"),
            one.metrics(f"c{n}"),
            two.admin(f"d{n}"),
        ]
    answers += [one.sign_in("e"), two.sign_in("f")]
    assert statuses(answers) == [401] * LIMIT
    assert_blocked(one.admin(ADMIN_TOKEN))
    assert_blocked(two.sign_in(ADMIN_TOKEN))
    assert Client(second.url, "127.0.0.3").admin(ADMIN_TOKEN).status_code == 200

    # The block is one Redis counter per address that expires with its one-minute window
    # (fixed from the first wrong token); removing it stands in for the wait.
    store = redis_client(redis_url)
    (counter,) = store.keys("*admin-token-guesses*")
    assert b"127.0.0.2" in counter and int(store.get(counter) or 0) == LIMIT
    assert 0 < store.pttl(counter) <= 60_000
    store.delete(counter)
    assert statuses([one.admin(ADMIN_TOKEN), two.metrics(ADMIN_TOKEN)]) == [200, 200]
    assert statuses(two.all_doors("again")) == [401, 401, 401]  # a fresh window


def test_an_unreachable_storage_follows_on_storage_error(
    start_gateway: Callable[..., Gateway], config_data: dict[str, Any]
) -> None:
    """ "deny": 503 (the limiter is down, so is the door); "allow": counted in memory."""
    dead = f"redis://127.0.0.1:{free_port()}"
    config_data["ratelimit"] = {"storage_uri": dead, "on_storage_error": "deny"}
    closed = Client(admin_gateway(start_gateway, config_data)[0].url, "127.0.0.2")
    for response in (closed.admin(ADMIN_TOKEN), closed.metrics("wrong")):
        assert response.status_code == 503
        assert assert_openai_error(response)["code"] == "ratelimit_unavailable"
    assert closed.sign_in(ADMIN_TOKEN).status_code == 503

    config_data["ratelimit"] = {"storage_uri": dead, "on_storage_error": "allow"}
    opened = Client(admin_gateway(start_gateway, config_data)[0].url, "127.0.0.2")
    assert opened.admin(ADMIN_TOKEN).status_code == 200
    assert statuses([opened.metrics("wrong") for _ in range(LIMIT)]) == [401] * LIMIT
    assert_blocked(opened.admin(ADMIN_TOKEN))
