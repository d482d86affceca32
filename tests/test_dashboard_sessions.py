"""Dashboard sessions live in the ledger: signing out ends a session for every copy of its
cookie, an idle session ends, and a new admin token ends them all."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable

import requests

from keymeai.ledger import keys
from keymeai.ledger.db import connection
from keymeai.ledger.models import DashboardSession, utcnow
from keymeai.operator.sessions import IDLE, TOUCH_EVERY
from tests.helpers.admin import ADMIN_TOKEN, csrf, signed_in
from tests.helpers.servers import Gateway

COOKIE = "keymeai_dashboard"


def rows() -> list[DashboardSession]:
    with connection():
        return list(DashboardSession.select().order_by(DashboardSession.id))


def set_last_seen(moment: dt.datetime) -> None:
    with connection():
        DashboardSession.update(last_seen_at=moment).execute()


def cookie_of(session: requests.Session) -> str:
    cookie = session.cookies.get(COOKIE)
    assert cookie, "not signed in"
    return cookie


def with_cookie(cookie: str) -> requests.Session:
    """A new client holding a copy of a session cookie."""
    session = requests.Session()
    session.cookies.set(COOKIE, cookie)
    return session


def overview(session: requests.Session, gateway: Gateway) -> requests.Response:
    return session.get(f"{gateway.url}/dashboard/", allow_redirects=False, timeout=10)


def cookie_payload(gateway: Gateway, cookie: str) -> dict[str, str]:
    """What the signed cookie carries (signed, not encrypted: it is readable)."""
    app = gateway.app
    payload: dict[str, str] = app.session_interface.get_signing_serializer(app).loads(cookie)
    return payload


def test_a_cookie_copied_before_sign_out_opens_nothing(operator: Gateway) -> None:
    key = operator.create_key("standard", name="target")
    key_id = keys.find_key(key).id
    browser = signed_in(operator)
    form = f"{operator.url}/dashboard/keys/{key_id}"
    token = csrf(browser, form)
    copied = cookie_of(browser)
    other = signed_in(operator)  # another operator's session, untouched by this sign-out
    assert len(rows()) == 2

    signed_out = browser.post(
        f"{operator.url}/dashboard/signout", data={"csrf": token}, allow_redirects=False
    )
    assert (signed_out.status_code, signed_out.headers["Location"]) == (303, "/dashboard/signin")
    assert len(rows()) == 1

    thief = with_cookie(copied)
    response = overview(thief, operator)
    assert (response.status_code, response.headers["Location"]) == (303, "/dashboard/signin")
    assert f"{COOKIE}=;" in response.headers["Set-Cookie"]  # the stale cookie is dropped
    page = with_cookie(copied).get(form, timeout=10)
    assert page.url == f"{operator.url}/dashboard/signin" and 'type="password"' in page.text
    assert "target" not in page.text
    for path, data in ((f"{form}/tier", {"tier": "free"}), (f"{form}/revoke", {})):
        refused = with_cookie(copied).post(
            path, data={"csrf": token, **data}, allow_redirects=False, timeout=10
        )
        assert (refused.status_code, refused.headers["Location"]) == (303, "/dashboard/signin")
    row = keys.find_key(key)
    assert (row.tier, row.revoked_at) == ("standard", None)

    assert overview(other, operator).status_code == 200
    assert overview(browser, operator).status_code == 303  # the browser's own cookie too


def test_the_ledger_keeps_no_session_token(operator: Gateway) -> None:
    browser = signed_in(operator)
    cookie = cookie_of(browser)
    sid = cookie_payload(operator, cookie)["sid"]
    (row,) = rows()
    assert len(sid) >= 40 and sid not in row.token_hash
    assert row.token_hash != hashlib.sha256(sid.encode()).hexdigest()
    assert ADMIN_TOKEN not in cookie and ADMIN_TOKEN not in row.token_hash

    # Signing in again (the same browser) replaces its session rather than adding one.
    again = browser.post(f"{operator.url}/dashboard/signin", data={"token": ADMIN_TOKEN})
    assert again.url == f"{operator.url}/dashboard/"
    (renewed,) = rows()
    assert renewed.token_hash != row.token_hash
    assert overview(with_cookie(cookie), operator).status_code == 303


def test_an_idle_session_ends_and_visits_are_noted_once_a_minute(operator: Gateway) -> None:
    browser = signed_in(operator)
    (row,) = rows()
    assert overview(browser, operator).status_code == 200
    assert rows()[0].last_seen_at == row.last_seen_at  # seen within the minute: no write

    earlier = utcnow() - TOUCH_EVERY - dt.timedelta(seconds=5)
    set_last_seen(earlier)
    assert overview(browser, operator).status_code == 200
    assert rows()[0].last_seen_at > earlier + TOUCH_EVERY

    set_last_seen(utcnow() - IDLE - dt.timedelta(minutes=1))
    assert overview(browser, operator).status_code == 303

    # An idle row is swept out when someone signs in.
    assert len(rows()) == 1
    signed_in(operator)
    (fresh,) = rows()
    assert fresh.token_hash != row.token_hash


def test_a_new_admin_token_ends_every_session(
    operator: Gateway, start_gateway: Callable[..., Gateway]
) -> None:
    browser = signed_in(operator)
    cookie = cookie_of(browser)
    rotated = start_gateway(env={"KEYMEAI_ADMIN_TOKEN": "a-brand-new-admin-token"})
    assert overview(with_cookie(cookie), rotated).status_code == 303  # the signature fails

    # Even a cookie signed for the new token cannot bring an old session back: its row
    # was made under the old token. The same payload signed for the old one still works.
    payload = cookie_payload(operator, cookie)
    for gateway, expected in ((rotated, 303), (operator, 200)):
        app = gateway.app
        forged = app.session_interface.get_signing_serializer(app).dumps(payload)
        assert overview(with_cookie(forged), gateway).status_code == expected
