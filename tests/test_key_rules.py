"""A key's name and expiry follow one rule, whether set by the admin API or the CLI.

Each value is sent both ways: `flask --app app keys create` run for real in a subprocess
(tests/helpers/cli.py) and POST /admin/keys on a live gateway over the same ledger. The
CLI refuses exactly what the API refuses, as a click usage error (exit code 2, no
traceback) with the API's own message, and stores exactly what the API stores.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from keymeai.ledger import keys
from keymeai.ledger.models import utcnow
from tests.helpers.admin import Admin, admin_gateway
from tests.helpers.cli import cli_env, run_together
from tests.helpers.servers import Gateway

# Run one at a time, these commands take seconds each: they are started together.
Run = Callable[[list[list[str | bytes]]], list[subprocess.CompletedProcess[str]]]

YESTERDAY = (utcnow() - dt.timedelta(days=1)).replace(microsecond=0).isoformat()
# (name, expiry) pairs the admin API refuses; the field the refusal names.
REFUSED: dict[str, tuple[str, str | None, str]] = {
    "newline": ("a\nb", None, "name"),
    "tab": ("tab\there", None, "name"),
    "escape sequence": ("\x1b[31mred", None, "name"),
    "DEL": ("del\x7f", None, "name"),
    "C1 control": ("next\x85line", None, "name"),
    "5,000 characters": ("x" * 5000, None, "name"),
    "201 characters": ("x" * 201, None, "name"),
    "blank": ("   ", None, "name"),
    "expiry in the past": ("ok", "2001-01-01", "expires_at"),
    "expiry a moment ago": ("ok", YESTERDAY + "+00:00", "expires_at"),
    "expiry not a date": ("ok", "soon", "expires_at"),
    "expiry month 13": ("ok", "2099-13-01", "expires_at"),
    "expiry past 9999 in UTC": ("ok", "9999-12-31T23:59:59-23:59", "expires_at"),
}
# (name, expiry) pairs the admin API accepts, and what it stores.
ACCEPTED: list[tuple[str, str | None]] = [
    ("  padded  ", "2099-01-01T00:00:00+08:00"),
    ("名前" + "x" * 198, "2099-06-01 12:30"),
    ("Acme Corp", "2099-06-01T12:30:00Z"),
]


@pytest.fixture
def run(config_data: dict[str, Any], tmp_path: Path) -> Run:
    """Start the commands at once on the test's ledger; wait (bounded) for them all."""

    def run_all(commands: list[list[str | bytes]]) -> list[subprocess.CompletedProcess[str]]:
        return run_together(cli_env(config_data, tmp_path), commands)  # type: ignore[arg-type]

    return run_all


@pytest.fixture
def admin(start_gateway: Callable[..., Gateway]) -> Admin:
    return admin_gateway(start_gateway)[1]


def create_command(name: str | bytes, expires: str | None) -> list[str | bytes]:
    command: list[str | bytes] = ["keys", "create", "--name", name, "--tier", "free"]
    return command + (["--expires", expires] if expires is not None else [])


def admin_body(name: str, expires: str | None) -> bytes:
    return json.dumps({"name": name, "tier": "free", "expires_at": expires}).encode()


def test_the_cli_refuses_what_the_admin_api_refuses(run: Run, admin: Admin) -> None:
    results = run([create_command(name, expires) for name, expires, _ in REFUSED.values()])
    for case, result in zip(REFUSED, results, strict=True):
        name, expires, field = REFUSED[case]
        response = admin.post(
            "/keys", data=admin_body(name, expires), headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400, (case, response.text)
        error = response.json()["error"]
        assert error["param"] == field, (case, error)
        option, label = ("--name", "the name") if field == "name" else ("--expires", "the expiry")
        assert result.returncode == 2, (case, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr and "km-" not in result.stdout
        assert "Usage: " in result.stderr, (case, result.stderr)
        # The API's message, with the CLI's name for the field.
        message = error["message"].replace(field, label, 1)
        assert f"Invalid value for '{option}': {message}" in result.stderr, (case, result.stderr)
    assert keys.list_keys() == []


def test_a_name_that_is_not_unicode_is_refused_both_ways(run: Run, admin: Admin) -> None:
    """Bytes that are not UTF-8 reach the CLI as lone surrogates (Python's argv decoding);
    the API gets the same as JSON escapes, and refuses the body before reading its name."""
    [result] = run([create_command(b"caf\xe9", None)])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "Invalid value for '--name': the name must be valid Unicode text" in result.stderr
    raw = b'{"name": "caf\\udce9", "tier": "free"}'
    response = admin.post("/keys", data=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "Unicode" in response.json()["error"]["message"]
    assert keys.list_keys() == []


def test_the_cli_stores_what_the_admin_api_stores(run: Run, admin: Admin) -> None:
    results = run([create_command(name, expires) for name, expires in ACCEPTED])
    for result in results:
        assert result.returncode == 0, result.stderr[-2000:]
    for name, expires in ACCEPTED:
        response = admin.post(
            "/keys", data=admin_body(name, expires), headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 201, response.text
    rows = keys.list_keys()
    by_cli, by_api = rows[: len(ACCEPTED)], rows[len(ACCEPTED) :]  # the API's came after
    stored = sorted((r.name, r.expires_at) for r in by_api)
    assert sorted((r.name, r.expires_at) for r in by_cli) == stored
    assert ("padded", dt.datetime(2098, 12, 31, 16, 0)) in stored
    assert "for 'padded' on tier free" in results[0].stdout
