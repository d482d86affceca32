"""Invite codes from the operator's side: `flask --app app invites ...` in a subprocess and
`/admin/invites` over HTTP; codes stored hashed, keys they make listed with their origin."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from keymeai.config import parse_config
from keymeai.ledger import keys
from keymeai.ledger.db import connection
from keymeai.ledger.models import InviteCode, utcnow
from keymeai.operator import invites
from keymeai.tables import ConfigError
from tests.helpers.admin import Admin, admin_gateway
from tests.helpers.cli import cli_env, flask_cli, run_together
from tests.helpers.config import PROVIDER_ENV
from tests.helpers.errors import assert_openai_error
from tests.helpers.servers import Gateway


def test_cli_create_list_revoke_and_keys_list_shows_the_origin(
    config_data: dict[str, Any], tmp_path: Path, ledger: None
) -> None:
    env = cli_env(config_data, tmp_path)
    made = flask_cli(
        env, "invites", "create", "--tier", "hobby", "--uses", "2", "--note", "team",
        "--expires", "2099-01-31",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    code = made.stdout.splitlines()[-1]
    assert code.startswith("inv-") and len(code) == 28
    row = invites.find(code)
    assert (row.tier, row.max_uses, row.note) == ("hobby", 2, "team")
    with connection():
        assert code not in str(list(InviteCode.select().dicts()))  # only its hash is kept
    key, _ = invites.redeem(code, "Ada", "192.0.2.1", None) or (None, None)
    assert key is not None
    listed = flask_cli(env, "invites", "list")
    assert listed.returncode == 0, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if row.prefix in line)
    assert "1/2" in line and "active" in line and "team" in line and code not in listed.stdout
    keys_listed = flask_cli(env, "keys", "list").stdout
    assert f"invite:{row.id} from 192.0.2.1" in keys_listed and "operator" not in keys_listed

    revoked = flask_cli(env, "invites", "revoke", row.prefix)
    assert revoked.returncode == 0 and "Revoked invite" in revoked.stdout
    assert invites.status(invites.find(code), utcnow()) == "revoked"
    assert invites.redeem(code, "Eve", "192.0.2.1", None) is None

    mistakes = {
        "unknown tier": ["create", "--tier", "gold"],
        "--uses": ["create", "--tier", "free", "--uses", "0"],
        "no invite code": ["revoke", "inv-nothing"],
    }
    commands = [["invites", *args] for args in mistakes.values()]
    done = run_together(env, commands)  # together: each command takes a second
    for words, result in zip(mistakes, done, strict=True):
        assert result.returncode != 0 and words in result.stderr, result.stderr


def test_admin_api_creates_lists_and_revokes_codes(start_gateway: Callable[..., Gateway]) -> None:
    gateway, api = admin_gateway(start_gateway)
    response = api.post("/invites", json={"tier": "scale", "max_uses": 3, "note": "Acme"})
    assert response.status_code == 201, response.text
    assert response.headers["Cache-Control"] == "no-store"
    created = response.json()
    code = created.pop("code")
    assert invites.find(code).id == created["id"]
    assert created["status"] == "active" and created["uses"] == 0
    assert created["max_uses"] == 3 and created["tier"] == "scale"
    assert api.get("/invites").json()["data"] == [created]
    assert code not in api.get("/invites").text

    revoked = api.post(f"/invites/{created['prefix']}/revoke").json()
    assert revoked["status"] == "revoked" and revoked["revoked_at"]
    assert api.delete(f"/invites/{created['id']}").json()["status"] == "revoked"

    for body, param in [
        ({"tier": "gold"}, "tier"),
        ({}, "tier"),
        ({"tier": "free", "max_uses": 0}, "max_uses"),
        ({"tier": "free", "max_uses": True}, "max_uses"),
        ({"tier": "free", "expires_at": "yesterday"}, "expires_at"),
        ({"tier": "free", "note": "a\nb"}, "note"),
        ({"tier": "free", "note": "\ud800"}, None),  # refused by the JSON parser
        ({"tier": "free", "note": 5}, "note"),
        ({"tier": "free", "code": "mine"}, None),
    ]:
        bad = api.post("/invites", json=body)
        assert bad.status_code == 400, body
        assert assert_openai_error(bad)["param"] == param, bad.text
    assert api.post("/invites/999/revoke").status_code == 404
    assert api.post(f"/invites/{code}/revoke").status_code == 400  # never in a URL
    assert Admin(gateway.url, token=None).get("/invites").status_code == 401
    assert len(invites.list_all()) == 1


@pytest.mark.parametrize(
    ("signup", "env", "words"),
    [
        ({"mode": "closed"}, {}, "signup.mode"),
        ({"mode": "open", "tier": "gold"}, {}, "signup.tier"),
        ({"mode": "open", "per_address": "lots"}, {}, "signup.per_address"),
        ({"mode": "open", "per_day": 0}, {}, "signup.per_day"),
        ({"mode": "open", "email_domains": ["@x.com"]}, {}, "signup.email_domains"),
        ({"mode": "invite", "email_domains": ["x.com"]}, {}, "SMTP_URL"),
        ({"mode": "open", "captcha": True}, {}, "signup.captcha"),
    ],
)
def test_bad_signup_settings_stop_start_up(
    config_data: dict[str, Any], signup: dict[str, Any], env: dict[str, str], words: str
) -> None:
    config_data["signup"] = signup
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        parse_config(config_data, {**PROVIDER_ENV, **env})


@pytest.mark.both_databases
def test_concurrent_sign_ups_cannot_pass_the_bound(ledger: None) -> None:
    row, code = invites.create("free", max_uses=3)
    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(lambda n: invites.redeem(code, f"n{n}", "192.0.2.1", None), range(8)))
    assert sum(result is not None for result in made) == 3
    assert invites.find(str(row.id)).uses == 3 and len(keys.list_keys()) == 3
    assert {key.origin for key in keys.list_keys()} == {f"invite:{row.id}"}
