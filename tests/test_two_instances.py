"""Two gateway instances (two gunicorns, two workers each) sharing PostgreSQL and Redis.

What a Procfile host with two web dynos, or two VMs behind a load balancer, relies on:
one exact rate limit across both, one complete ledger, and a revocation that every
instance honours within 5 seconds.
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from keymeai.ledger import keys
from keymeai.ledger.db import connection
from keymeai.ledger.models import ApiKey
from tests.helpers.cli import cli_env, flask_cli
from tests.helpers.ledger import record_sums, rollup_sums, usage_records, wait_for_records
from tests.helpers.servers import Gunicorn

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.redis,
    pytest.mark.parametrize("database_backend", ["postgres"], indirect=True),
]

REVOCATION_DEADLINE = 5.0


@pytest.fixture
def instances(
    start_gunicorn: Callable[..., Gunicorn],
    config_data: dict[str, Any],
    redis_url: str,
    ledger: None,
) -> tuple[Gunicorn, Gunicorn]:
    config_data["ratelimit"]["storage_uri"] = redis_url
    config_data["gateway"]["key_cache_seconds"] = 2  # as in the shipped config.toml
    config_data["tiers"]["tiny"] = {"requests": ["10 per hour"]}
    env = {"WEB_CONCURRENCY": "2"}
    first, second = start_gunicorn(env=env, wait=False), start_gunicorn(env=env, wait=False)
    return first.ready(), second.ready()


def post_chat(url: str, key: str, request_id: str, stream: bool = False) -> int:
    """One chat completion on a new connection (so any worker may take it)."""
    response = requests.post(
        f"{url}/v1/chat/completions",
        json={
            "model": "deepseek-chat",
            "messages": [{"role": "user", "content": "hello"}],
            "stream": stream,
        },
        headers={"Authorization": f"Bearer {key}", "X-Request-Id": request_id},
        timeout=30,
    )
    if stream and response.ok:
        assert response.text.endswith("data: [DONE]\n\n")
    return response.status_code


def test_one_rate_limit_across_both_instances(instances: tuple[Gunicorn, Gunicorn]) -> None:
    urls = itertools.cycle([s.url for s in instances])
    key = keys.create_key("tiny", "tiny")[1]
    with ThreadPoolExecutor(10) as pool:
        statuses = list(
            pool.map(lambda i: post_chat(next(urls), key, f"lim-{i}"), range(30)),
        )
    assert Counter(statuses) == {200: 10, 429: 20}
    assert len(wait_for_records(10)) == 10
    time.sleep(0.2)
    assert len(usage_records()) == 10  # refused requests never reached an upstream


def test_one_complete_ledger_across_both_instances(instances: tuple[Gunicorn, Gunicorn]) -> None:
    key_list = [keys.create_key(f"k{i}", "standard")[1] for i in range(2)]
    jobs = [
        (instances[i % 2].url, key_list[i % 3 % 2], f"both-{i:03d}", i % 4 == 0) for i in range(80)
    ]
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda job: post_chat(*job), jobs))
    assert statuses == [200] * len(jobs)
    records = wait_for_records(len(jobs))
    assert Counter(r.request_id for r in records) == Counter(job[2] for job in jobs)
    assert rollup_sums() == record_sums()


def test_revocation_on_one_instance_is_honoured_by_the_other_within_5_seconds(
    instances: tuple[Gunicorn, Gunicorn], config_data: dict[str, Any], tmp_path: Path
) -> None:
    row, key = keys.create_key("revoked-soon", "standard")
    # Keep every worker's key cache fresh until the revocation is committed, so that the
    # lag measured is the worst case (a cache entry made just before the revocation).
    revoking = threading.Event()

    def keep_warm() -> None:
        for server in itertools.cycle(instances):
            if revoking.is_set():
                return
            requests.get(
                f"{server.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5
            )

    warmers = [threading.Thread(target=keep_warm) for _ in range(4)]
    for warmer in warmers:
        warmer.start()
    time.sleep(0.5)
    revoked = flask_cli(cli_env(config_data, tmp_path), "keys", "revoke", str(row.id))
    revoking.set()
    for warmer in warmers:
        warmer.join()
    assert revoked.returncode == 0, revoked.stderr
    with connection():
        revoked_at = ApiKey.get_by_id(row.id).revoked_at  # naive UTC, set by the CLI
    committed = revoked_at.replace(tzinfo=dt.UTC).timestamp()

    # Poll both instances until each refuses the key on 8 new connections in a row
    # (whichever worker answers); its lag is the time of the first of those refusals.
    streak_start: dict[str, float | None] = {s.url: None for s in instances}
    streak = Counter[str]()
    lags: dict[str, float] = {}
    while len(lags) < 2 and time.time() - committed < REVOCATION_DEADLINE + 5:
        for url in streak_start.keys() - lags.keys():
            status = requests.get(
                f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5
            ).status_code
            assert status in (200, 401)
            if status == 200:
                streak_start[url], streak[url] = None, 0
                continue
            streak_start[url] = streak_start[url] or time.time()
            streak[url] += 1
            if streak[url] == 8:
                lags[url] = streak_start[url] - committed  # type: ignore[operator]
        time.sleep(0.05)
    print(f"revocation honoured by the instances after {sorted(lags.values())} s")
    assert len(lags) == 2, "an instance still accepts the revoked key"
    assert max(lags.values()) < REVOCATION_DEADLINE
    for server in instances:  # and the chat endpoint agrees
        assert post_chat(server.url, key, "after-revoke") == 401
