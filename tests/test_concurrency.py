"""Several gunicorn workers writing one ledger at once, on SQLite and on PostgreSQL."""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx2
import pytest

from keymeai.ledger import keys
from tests.helpers.clients import sdk
from tests.helpers.ledger import record_sums, rollup_sums, wait_for_records
from tests.helpers.servers import Gunicorn

pytestmark = [pytest.mark.both_databases, pytest.mark.redis]

MODELS = ["deepseek-chat", "deepseek-reasoner", "doubao-pro-32k", "qwen-max", "qwen-plus"]
REQUESTS = 200


def test_two_workers_record_200_concurrent_requests_exactly_once(
    start_gunicorn: Callable[..., Gunicorn],
    config_data: dict[str, Any],
    redis_url: str,
    ledger: None,
) -> None:
    config_data["ratelimit"]["storage_uri"] = redis_url
    server = start_gunicorn(
        env={"WEB_CONCURRENCY": "2"},
        args=["--access-logfile", "-", "--access-logformat", "served-by %(p)s %({x-request-id}o)s"],
    )
    plain = [keys.create_key(f"k{i}", "standard")[1] for i in range(3)]
    clients = [
        sdk(
            server.url,
            key,
            http_client=httpx2.Client(limits=httpx2.Limits(max_keepalive_connections=0)),
        )
        for key in plain
    ]

    def call(i: int) -> str:
        request_id = f"conc-{i:04d}"
        options: dict[str, Any] = {
            "model": MODELS[i % len(MODELS)],
            "messages": [{"role": "user", "content": f"request number {i}"}],
            "extra_headers": {"X-Request-Id": request_id},
            "extra_body": {"fake": {"cached": i % 3}},
        }
        client = clients[i % len(clients)]
        if i % 2:
            chunks = list(client.chat.completions.create(stream=True, **options))
            assert chunks and chunks[-1].choices[0].finish_reason == "stop"
        else:
            assert client.chat.completions.create(**options).choices[0].message.content
        return request_id

    with ThreadPoolExecutor(50) as pool:
        sent = list(pool.map(call, range(REQUESTS)))

    records = wait_for_records(REQUESTS)
    assert Counter(r.request_id for r in records) == Counter(sent)  # each exactly once
    assert all(r.status == 200 and r.outcome == "ok" and not r.estimated for r in records)
    assert rollup_sums() == record_sums()
    assert sum(v[0] for v in rollup_sums().values()) == REQUESTS
    deadline = time.monotonic() + 5  # the access log line follows the response
    while True:
        log = server.log()
        served = {rid: pid for pid, rid in re.findall(r"served-by <(\d+)> (conc-\d+)", log)}
        if set(served) == set(sent) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert "database is locked" not in log and "not written" not in log
    assert set(served) == set(sent)
    assert len(set(served.values())) == 2  # both workers answered (and wrote records)
