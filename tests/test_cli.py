"""The operator's CLI, run for real: `python -m flask --app app ...` in a subprocess.

Each command runs against the test's SQLite ledger (KEYMEAI_CONFIG points to a TOML
written from `config_data`), the same file the in-process gateway serves from, so the
effect of a command is checked where it matters: on live requests.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
import sqlite3
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from keymeai.ledger import keys, metering, reports
from keymeai.ledger.models import utcnow
from tests.helpers.cli import cli_env, run_together
from tests.helpers.config import add_model, add_provider
from tests.helpers.fake_upstream import FakeUpstream
from tests.helpers.ledger import usage_records
from tests.helpers.servers import Gateway

KEY_LINE = re.compile(r"km-[A-Za-z0-9_-]{32,}")
PLAIN_COST = re.compile(r"\d+\.\d{10}")
FIELDS = list(reports.FIELDS)
CHAT: dict[str, Any] = {"model": "deepseek-chat", "messages": [{"role": "user", "content": "hi"}]}
TOKEN_FIELDS = ["prompt_tokens", "completion_tokens", "cached_tokens", "total_tokens"]
CACHED = {"fake": {"cached": 2}}  # the fake upstream reports 2 cached prompt tokens
Cli = Callable[..., list[subprocess.CompletedProcess[str]]]


@pytest.fixture
def cli(config_data: dict[str, Any], tmp_path: Path) -> Cli:
    """Run CLI commands, each a list of arguments, at the same time; return their results.

    The config is written at call time, so that a test's edits to `config_data` apply.
    """

    config_data["gateway"]["key_cache_seconds"] = 0.2  # changes reach the gateway quickly

    def run(*commands: list[str], env: dict[str, str] | None = None):
        return run_together(cli_env(config_data, tmp_path, **(env or {})), list(commands))

    return run


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def create(cli: Cli, name: str, tier: str) -> str:
    """`keys create`; the key, read as the operator would: the last line of stdout."""
    stdout = ok(cli(["keys", "create", "--name", name, "--tier", tier])[0])
    last = stdout.splitlines()[-1]
    assert KEY_LINE.fullmatch(last), stdout
    assert stdout.endswith(last + "\n")
    return last


def ledger_bytes(config_data: dict[str, Any]) -> bytes:
    """The SQLite ledger as stored on disk, write-ahead log included."""
    path = Path(config_data["database"]["url"].removeprefix("sqlite:///"))
    return b"".join(p.read_bytes() for p in sorted(path.parent.glob(path.name + "*")))


def listed(cli: Cli) -> dict[str, dict[str, str]]:
    return parse_list(ok(cli(["keys", "list"])[0]))


def parse_list(stdout: str) -> dict[str, dict[str, str]]:
    """`keys list` as {prefix: row}, each row keyed by the header's column names."""
    lines = stdout.splitlines()
    header = lines[0].split()
    assert header[:5] == ["key_id", "prefix", "name", "tier", "status"]
    return {line.split()[1]: dict(zip(header, line.split(), strict=False)) for line in lines[1:]}


def limit_header(client: openai.OpenAI, name: str = "x-ratelimit-limit-requests") -> str | None:
    """The limit a request is answered under (a refused one too)."""
    try:
        return client.chat.completions.with_raw_response.create(**CHAT).headers.get(name)
    except openai.RateLimitError as exc:
        return exc.response.headers.get(name)


def wait_for(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    """Until `predicate()` holds: a key change reaches the gateway within its cache TTL."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "the change did not reach the gateway"
        time.sleep(0.05)


@pytest.mark.parametrize("database_backend", ["sqlite"], indirect=True)  # reads the file
def test_create_prints_the_key_once_and_stores_only_its_hash(
    cli: Cli, gateway: Gateway, config_data: dict[str, Any]
) -> None:
    key = create(cli, "Acme Corp", "hobby")
    stored = ledger_bytes(config_data)
    assert key.encode() not in stored
    assert key[keys.PREFIX_LENGTH :].encode() not in stored
    assert keys.hash_key(key).encode() in stored  # it is this ledger, and the hash is in it
    client = gateway.client(key)
    assert limit_header(client, "x-ratelimit-limit-tokens") == "5000000"  # the hobby tier


def new_key(name: str, tier: str) -> str:
    """A key made in this process, for tests of the other commands."""
    return keys.create_key(name, tier)[1]


def test_list_shows_keys_but_never_a_full_key(cli: Cli, gateway: Gateway) -> None:
    first, second = new_key("alpha", "free"), new_key("beta", "scale")
    stdout = ok(cli(["keys", "list"])[0])
    assert first[: keys.PREFIX_LENGTH] in stdout
    assert first[keys.PREFIX_LENGTH :] not in stdout and second[keys.PREFIX_LENGTH :] not in stdout
    columns = ["key_id", "prefix", "name", "tier", "status"]
    rows = [[row[c] for c in columns] for row in parse_list(stdout).values()]
    assert rows == [
        ["1", first[: keys.PREFIX_LENGTH], "alpha", "free", "active"],
        ["2", second[: keys.PREFIX_LENGTH], "beta", "scale", "active"],
    ]


def test_revoke_by_id_and_by_prefix(cli: Cli, gateway: Gateway) -> None:
    by_id, by_prefix = new_key("one", "standard"), new_key("two", "standard")
    clients = [gateway.client(by_id), gateway.client(by_prefix)]
    for client in clients:
        assert client.chat.completions.create(**CHAT).choices  # cached as active
    results = cli(["keys", "revoke", "1"], ["keys", "revoke", by_prefix[: keys.PREFIX_LENGTH]])
    assert "Revoked key 1" in ok(results[0]) and "Revoked key 2" in ok(results[1])
    for client in clients:
        wait_for(lambda c=client: status_of(c) == 401)
    assert {row["status"] for row in listed(cli).values()} == {"revoked"}


def status_of(client: openai.OpenAI) -> int:
    try:
        client.chat.completions.create(**CHAT)
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200


def test_set_tier_and_set_limits_apply_to_live_requests(cli: Cli, gateway: Gateway) -> None:
    key = new_key("mover", "free")
    client = gateway.client(key)
    assert limit_header(client) == "100"
    ok(cli(["keys", "set-tier", "1", "standard"])[0])
    wait_for(lambda: limit_header(client) == "3000")
    assert listed(cli)[key[: keys.PREFIX_LENGTH]]["tier"] == "standard"

    prefix = key[: keys.PREFIX_LENGTH]
    ok(cli(["keys", "set-limits", prefix, "--requests", "3 per hour"])[0])
    wait_for(lambda: limit_header(client) == "3")  # this request counts as the first
    client.chat.completions.create(**CHAT)
    client.chat.completions.create(**CHAT)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(**CHAT)

    ok(cli(["keys", "set-limits", "1", "--clear"])[0])
    wait_for(lambda: limit_header(client) == "3000")
    ok(cli(["keys", "set-limits", "1", "--tokens-per-month", "100000"])[0])
    wait_for(lambda: limit_header(client, "x-ratelimit-limit-tokens") == "100000")


def test_mistakes_exit_non_zero_with_a_clear_message(cli: Cli, gateway: Gateway) -> None:
    new_key("existing", "free")
    mistakes = {
        "unknown tier 'gold'": ["keys", "create", "--name", "x", "--tier", "gold"],
        "unknown tier 'platinum'": ["keys", "set-tier", "1", "platinum"],
        "no key with id 999": ["keys", "revoke", "999"],
        "no key with prefix km-nothere": ["keys", "revoke", "km-nothere"],
        "invalid limit 'lots per hour'": ["keys", "set-limits", "1", "--requests", "lots per hour"],
        "expected YYYY-MM": ["usage", "report", "--month", "2026-13"],
    }
    for message, result in zip(mistakes, cli(*mistakes.values()), strict=True):
        assert result.returncode != 0, result.args
        assert message in result.stderr, (result.args, result.stderr)
        assert "Traceback" not in result.stderr
    assert [(k.name, k.tier, k.revoked_at) for k in keys.list_keys()] == [
        ("existing", "free", None)
    ]


def test_usage_report_matches_the_records(
    cli: Cli,
    start_gateway: Callable[..., Gateway],
    config_data: dict[str, Any],
    upstream: FakeUpstream,
) -> None:
    # A model whose upstream refuses every request: metered, with nothing to pay.
    add_provider(config_data, "refuser", upstream.base_url("deepseek", "400"))
    add_model(config_data, "refused", [("refuser", "deepseek-chat")])
    gateway = start_gateway()
    alice = gateway.client(new_key("alice", "standard"))
    bob = gateway.client(new_key("bob", "standard"))
    alice.chat.completions.create(**CHAT)
    list(alice.chat.completions.create(**CHAT, stream=True))
    alice.chat.completions.create(**{**CHAT, "model": "qwen-max"})
    bob.chat.completions.create(**{**CHAT, "model": "doubao-pro-32k"}, extra_body=CACHED)
    with pytest.raises(openai.BadRequestError):
        bob.chat.completions.create(**{**CHAT, "model": "refused"})
    metering.write_usage(past_record(key_id=2), None)  # a request of March 2025

    this_month = utcnow().date().replace(day=1)
    expected: dict[tuple[int, str], dict[str, Any]] = defaultdict(lambda: defaultdict(int))
    for record in usage_records():
        if record.created_at.date() >= this_month:
            sums = expected[(record.key_id, record.model)]
            sums["requests"] += 1
            for name in TOKEN_FIELDS:
                sums[name] += getattr(record, name)
            sums["cost"] += Decimal(record.cost_units).scaleb(-10)
    assert len(expected) == 4 and expected[(2, "refused")]["cost"] == 0

    as_json, as_csv, table, only_bob, march = cli(
        ["usage", "report", "--format", "json"],
        ["usage", "report", "--format", "csv"],
        ["usage", "report"],
        ["usage", "report", "--format", "json", "--key", "2"],
        ["usage", "report", "--format", "json", "--month", "2025-03"],
    )
    rows = json.loads(ok(as_json), parse_float=Decimal)
    assert isinstance(rows, list)
    assert all(list(row) == list(reports.FIELDS) for row in rows)
    got = {
        (row["key_id"], row["model"]): {n: row[n] for n in ["requests", *TOKEN_FIELDS, "cost"]}
        for row in rows
    }
    assert got == expected
    assert {row["key_name"] for row in rows} == {"alice", "bob"}
    assert any(row["cached_tokens"] == 2 for row in rows)

    parsed = list(csv.reader(io.StringIO(ok(as_csv))))
    assert parsed[0] == list(reports.FIELDS)
    body, total = parsed[1:-1], parsed[-1]  # the rows, then the invoice's total line
    assert [line[:-1] for line in body] == [[str(r[f]) for f in FIELDS[:-1]] for r in rows]
    assert total[0] == "total" and Decimal(total[-1]) == sum(r["cost"] for r in rows)
    lines = ok(table).splitlines()
    assert lines[0].split() == list(reports.FIELDS) and len(lines) == 2 + len(rows)
    for cost, row in zip([p[-1] for p in body], rows, strict=True):
        assert PLAIN_COST.fullmatch(cost) and Decimal(cost) == row["cost"]  # never "0E-10"
    assert all(PLAIN_COST.fullmatch(line.split()[-1]) for line in lines[1:])
    assert json.loads(ok(only_bob)) == [r for r in json.loads(ok(as_json)) if r["key_id"] == 2]
    march_rows = json.loads(ok(march))
    assert [(r["key_name"], r["model"], r["requests"]) for r in march_rows] == [
        ("bob", "qwen-plus", 1)
    ]


def past_record(key_id: int) -> dict[str, Any]:
    """A usage record as the meter writes it, dated in March 2025."""
    return {
        "key": key_id,
        "created_at": dt.datetime(2025, 3, 15, 12, 0),
        "record_id": "0" * 32,
        "request_id": "req_march",
        "model": "qwen-plus",
        "provider": "dashscope",
        "upstream_model": "qwen-plus",
        "stream": False,
        "status": 200,
        "outcome": "ok",
        "attempts": 1,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
        "estimated": False,
        "latency_ms": 100,
        "cost_units": 10_000,
    }


def test_db_upgrade_is_idempotent_and_safe_concurrently(
    cli: Cli, config_data: dict[str, Any], tmp_path: Path
) -> None:
    fresh = tmp_path / "fresh.db"
    config_data["database"]["url"] = f"sqlite:///{fresh}"
    first = cli(["db", "upgrade"], ["db", "upgrade"], ["db", "upgrade"])
    assert all(r.returncode == 0 for r in first), [r.stderr[-1000:] for r in first]
    with sqlite3.connect(fresh) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        schema = sorted(row[0] for row in conn.execute("SELECT sql FROM sqlite_master") if row[0])
    assert {"api_key", "usage_record", "usage_daily", "quota_reservation"} <= tables
    assert "Schema is up to date." in ok(cli(["db", "upgrade"])[0])
    with sqlite3.connect(fresh) as conn:
        again = sorted(row[0] for row in conn.execute("SELECT sql FROM sqlite_master") if row[0])
    assert again == schema


def test_database_url_environment_wins(cli: Cli, tmp_path: Path) -> None:
    other = tmp_path / "from-env.db"
    command = ["keys", "create", "--name", "env", "--tier", "free"]
    ok(cli(command, env={"DATABASE_URL": f"sqlite:///{other}"})[0])
    with sqlite3.connect(other) as conn:
        assert conn.execute("SELECT name FROM api_key").fetchall() == [("env",)]
