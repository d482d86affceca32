"""Self-service sign-up at /signup in a real browser (headless Chromium, JavaScript on
and off) and over plain HTTP: invite codes make keys of their tier that work at once,
refused codes all read alike, open sign-up is limited per address and per day, bots
fill the honeypot, and with `email_domains` the key arrives at a local SMTP sink."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from keymeai.ledger import keys
from keymeai.ledger.db import connection
from keymeai.ledger.models import InviteCode, utcnow
from keymeai.operator import invites
from keymeai.operator.signup import REFUSED_CODE
from tests.helpers.browser import Pages, field, screenshot, sign_in
from tests.helpers.clients import HI
from tests.helpers.servers import Gateway, free_port
from tests.helpers.services import self_signed
from tests.helpers.signup import Sink, post_form, shown_key, signup_gateway, smtp_sink

Start = Callable[..., Gateway]


@pytest.fixture
def sink() -> Iterator[Sink]:
    yield from smtp_sink()


def sign_up(pages: Pages, gateway: Gateway, javascript: bool, **fields: str) -> Any:
    page = pages.open(javascript=javascript)
    page.goto(f"{gateway.url}/signup")
    for name, value in fields.items():
        page.fill(f"#{name}", value)
    page.click("button[type=submit]")
    return page


@pytest.mark.parametrize("javascript", [True, False])
def test_an_invite_code_makes_a_working_key_of_its_tier_until_its_uses_run_out(
    start_gateway: Start, config_data: dict[str, Any], pages: Pages, javascript: bool
) -> None:
    gateway = signup_gateway(start_gateway, config_data, mode="invite")
    row, code = invites.create("hobby", max_uses=1, note="new teammate")
    page = sign_up(pages, gateway, javascript, name="Ada", code=code)
    assert field(page, "tier") == "hobby"
    key = page.input_value("#key")
    assert keys.is_well_formed(key) and page.get_attribute("#key", "readonly") is not None
    assert page.locator("a[href='/account']").count() == 1
    if not javascript:
        screenshot(page, "signup-key")
    response = gateway.client(key).chat.completions.with_raw_response.create(
        model="deepseek-chat", messages=HI
    )
    assert response.headers["x-ratelimit-limit-requests"] == "600"  # the hobby tier's
    made = keys.find_key(key)
    assert (made.name, made.tier, made.origin) == ("Ada", "hobby", f"invite:{row.id}")
    assert made.origin_address == "127.0.0.1"
    assert invites.find(str(row.id)).uses == 1

    again = sign_up(pages, gateway, javascript, name="Eve", code=code)
    assert field(again, "error") == REFUSED_CODE
    assert again.locator("#key").count() == 0
    assert [k.name for k in keys.list_keys()] == ["Ada"]


def test_unknown_revoked_and_expired_codes_are_refused_alike(
    start_gateway: Start, config_data: dict[str, Any], pages: Pages
) -> None:
    gateway = signup_gateway(start_gateway, config_data, mode="invite")
    revoked, revoked_code = invites.create("standard")
    invites.revoke(revoked)
    expired, expired_code = invites.create("standard", expires_at=utcnow() + dt.timedelta(days=1))
    with connection():
        InviteCode.update(expires_at=utcnow() - dt.timedelta(seconds=1)).where(
            InviteCode.id == expired.id
        ).execute()
    for code in (revoked_code, expired_code, "inv-" + "x" * 24):
        page = sign_up(pages, gateway, False, name="Mallory", code=code)
        assert field(page, "error") == REFUSED_CODE
        assert page.input_value("#name") == "Mallory"  # kept for another try
    assert keys.list_keys() == []


def test_open_sign_up_is_limited_per_address_and_per_day(
    start_gateway: Start, config_data: dict[str, Any], pages: Pages
) -> None:
    config_data["gateway"]["trusted_proxies"] = 1  # so the test can speak from several
    gateway = signup_gateway(
        start_gateway, config_data, mode="open", per_address="2 per day", per_day=3
    )
    page = sign_up(pages, gateway, True, name="First")
    assert field(page, "tier") == "free"
    assert keys.find_key(page.input_value("#key")).origin == "open"

    def from_address(address: str) -> requests.Response:
        return post_form(gateway, {"name": "Bob"}, {"X-Forwarded-For": address})

    assert shown_key(from_address("127.0.0.1").text)  # the browser's address, second key
    third = from_address("127.0.0.1")
    assert third.status_code == 429 and "limited to 2 per 1 day" in third.text
    assert int(third.headers["Retry-After"]) > 0
    assert shown_key(from_address("192.0.2.7").text)  # the day's third key
    closed = from_address("192.0.2.8")
    assert closed.status_code == 429 and "limit for today" in closed.text
    assert [k.origin_address for k in keys.list_keys()] == ["127.0.0.1", "127.0.0.1", "192.0.2.7"]


def test_the_honeypot_and_the_csrf_token(start_gateway: Start, config_data: dict[str, Any]) -> None:
    gateway = signup_gateway(start_gateway, config_data, mode="open")
    bot = post_form(gateway, {"name": "Bot", "website": "http://spam.example"})
    assert bot.status_code == 400 and shown_key(bot.text) is None
    forged = requests.post(f"{gateway.url}/signup", data={"name": "X", "csrf": "t"}, timeout=10)
    assert forged.status_code == 403 and "cookie" in forged.text
    cookie = {"Cookie": "keymeai_signup=abc"}
    wrong = requests.post(
        f"{gateway.url}/signup", data={"name": "X", "csrf": "abd"}, headers=cookie, timeout=10
    )
    assert wrong.status_code == 403 and "security token" in wrong.text
    assert keys.list_keys() == []
    set_cookie = requests.get(f"{gateway.url}/signup", timeout=10).headers["Set-Cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
    assert "Path=/signup" in set_cookie


def test_attempts_are_limited_per_address(
    start_gateway: Start, config_data: dict[str, Any]
) -> None:
    gateway = signup_gateway(start_gateway, config_data, mode="invite")
    _, code = invites.create("standard")
    for n in range(5):
        wrong = post_form(gateway, {"name": "Guess", "code": f"inv-guess{n}"})
        assert wrong.status_code == 400 and REFUSED_CODE in wrong.text
    blocked = post_form(gateway, {"name": "Guess", "code": code})  # right, but too late
    assert blocked.status_code == 429 and "Too many attempts" in blocked.text
    assert blocked.headers["Content-Type"].startswith("text/html")
    assert keys.list_keys() == []


def test_sign_up_is_off_by_default(gateway: Gateway) -> None:
    for method in ("GET", "POST"):
        response = requests.request(method, f"{gateway.url}/signup", timeout=10)
        assert response.status_code == 404
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
        assert "Sign-up is off" in response.text
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]


def test_the_key_goes_by_e_mail_when_domains_are_set(
    start_gateway: Start, config_data: dict[str, Any], pages: Pages, sink: Sink
) -> None:
    gateway = signup_gateway(
        start_gateway,
        config_data,
        env={"SMTP_URL": sink.url},
        mode="open",
        tier="standard",
        email_domains=["example.com"],
    )
    page = sign_up(pages, gateway, False, name="Grace", email="someone@elsewhere.org")
    assert "example.com" in field(page, "error")
    page = sign_up(pages, gateway, False, name="Grace", email="grace@example.com")
    assert "grace@example.com" in field(page, "sent")
    assert page.locator("#key").count() == 0 and "km-" not in page.content().replace(
        keys.list_keys()[0].prefix, ""
    )
    screenshot(page, "signup-sent")
    [(envelope, message)] = sink.messages
    assert envelope.rcpt_tos == ["grace@example.com"] and message["To"] == "grace@example.com"
    body = message.get_payload(decode=True).decode()
    found = re.search(r"km-[A-Za-z0-9_-]{40,}", body)
    assert found and f"{gateway.url}/account" in body and message["Subject"]
    key = found.group(0)
    response = gateway.client(key).chat.completions.with_raw_response.create(
        model="deepseek-chat", messages=HI
    )
    assert response.headers["x-ratelimit-limit-requests"] == "3000"
    assert keys.find_key(key).origin_email == "grace@example.com"


def test_no_key_is_left_when_the_mail_cannot_be_sent(
    start_gateway: Start, config_data: dict[str, Any]
) -> None:
    gateway = signup_gateway(
        start_gateway,
        config_data,
        env={"SMTP_URL": f"smtp://127.0.0.1:{free_port()}"},  # nobody listens there
        mode="invite",
        email_domains=["example.com"],
    )
    row, code = invites.create("standard", max_uses=1)
    response = post_form(gateway, {"name": "Lin", "email": "lin@example.com", "code": code})
    assert response.status_code == 503 and "no key was made" in response.text
    [made] = keys.list_keys()
    assert made.revoked_at is not None
    assert invites.find(str(row.id)).uses == 0  # the code can be used again


def test_the_honeypot_is_off_screen_for_people(
    start_gateway: Start, config_data: dict[str, Any], pages: Pages
) -> None:
    gateway = signup_gateway(start_gateway, config_data, mode="invite")
    page = pages.open(javascript=False, width=900, height=600)
    page.goto(f"{gateway.url}/signup")
    assert page.locator("#code").count() == 1 and page.locator("#email").count() == 0
    box = page.locator("#website").bounding_box()
    assert box is not None and box["x"] + box["width"] < 0
    screenshot(page, "signup")  # docs/signup.png


def test_operators_make_and_revoke_codes_on_the_dashboard(
    start_gateway: Start, config_data: dict[str, Any], pages: Pages
) -> None:
    gateway = signup_gateway(start_gateway, config_data, mode="invite")
    admin = pages.open(javascript=False)
    sign_in(admin, gateway)
    admin.click("nav a:text-is('Invites')")
    admin.select_option("#tier", "hobby")
    admin.fill("#uses", "2")
    admin.fill("#note", "Team Blue")
    admin.click("text=Make a code")
    code = admin.input_value("#code")
    row = invites.find(code)
    assert (row.tier, row.max_uses, row.note) == ("hobby", 2, "Team Blue")
    line = admin.locator(f'tr[data-invite-id="{row.id}"]')
    assert field(line, "status") == "active" and field(line, "uses") == "0 / 2"
    screenshot(admin, "dashboard-invites")

    customer = sign_up(pages, gateway, False, name="Dev", code=code)
    made = keys.find_key(customer.input_value("#key"))
    admin.goto(f"{gateway.url}/dashboard/keys/{made.id}")
    assert field(admin, "origin") == f"sign-up (invite:{row.id}) from 127.0.0.1"
    admin.click("text=Revoke this key")  # revocable like any other key
    assert "revoked" in admin.inner_text("p.notice")
    assert keys.find_key(str(made.id)).revoked_at is not None

    admin.goto(f"{gateway.url}/dashboard/invites")
    admin.locator(f'tr[data-invite-id="{row.id}"] button:text-is("Revoke")').click()
    assert "is revoked" in admin.inner_text("p.notice")
    assert field(admin.locator(f'tr[data-invite-id="{row.id}"]'), "status") == "revoked"
    assert admin.locator("#code").count() == 0  # a code is shown once
    refused = sign_up(pages, gateway, False, name="Late", code=code)
    assert field(refused, "error") == REFUSED_CODE


def test_bad_fields_get_a_400_page_and_make_no_key(
    start_gateway: Start, config_data: dict[str, Any], sink: Sink
) -> None:
    config_data["gateway"]["trusted_proxies"] = 1
    gateway = signup_gateway(
        start_gateway, config_data, env={"SMTP_URL": sink.url}, mode="open",
        per_address="10 per day", email_domains=["example.com"],
    )  # fmt: skip
    for fields, words in [
        ({"name": "", "email": "a@example.com"}, "must be a non-empty string"),
        ({"name": "x" * 201, "email": "a@example.com"}, "at most 200"),
        ({"name": "a\x07b", "email": "a@example.com"}, "control characters"),
        ({"name": "Al", "email": "a\x00b@example.com"}, "example.com"),
        ({"name": "Al", "email": "a@example.com\r\nBcc: x@evil.test"}, "example.com"),
        ({"name": "Al", "email": "a@sub.example.com"}, "example.com"),
    ]:
        response = post_form(gateway, fields, {"X-Forwarded-For": f"192.0.2.{len(words)}"})
        assert response.status_code == 400 and words in response.text, fields
        assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert keys.list_keys() == [] and sink.messages == []
    long_address = "9" * 300  # whatever a trusted proxy forwards is stored within bounds
    made = post_form(
        gateway, {"name": "Al", "email": "al@EXAMPLE.com"}, {"X-Forwarded-For": long_address}
    )
    assert made.status_code == 200 and "al@EXAMPLE.com" in made.text
    [key] = keys.list_keys()
    assert key.origin_address == "9" * 64 and len(sink.messages) == 1


def test_the_mail_goes_over_starttls_with_the_login_and_never_logs_in_without_it(
    start_gateway: Start, config_data: dict[str, Any], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, sink: Sink,
) -> None:  # fmt: skip
    cert = self_signed(tmp_path, "smtp")
    monkeypatch.setenv("SSL_CERT_FILE", str(cert[0]))  # trust the sink's certificate
    for tls_sink in smtp_sink(cert):
        url = f"smtp://ada%40team:s%3Acret@127.0.0.1:{tls_sink.port}"
        gateway = signup_gateway(
            start_gateway, config_data, env={"SMTP_URL": url}, mode="open",
            email_domains=["example.com"],
        )  # fmt: skip
        sent = post_form(gateway, {"name": "Tess", "email": "tess@example.com"})
        assert sent.status_code == 200, sent.text
        assert tls_sink.logins == [(b"ada@team", b"s:cret")] and tls_sink.tls_sessions == [True]
        assert tls_sink.messages[0][1]["To"] == "tess@example.com"

    plain = signup_gateway(
        start_gateway, config_data, env={"SMTP_URL": f"smtp://ada:secret@127.0.0.1:{sink.port}"},
        mode="open", email_domains=["example.com"],
    )  # fmt: skip
    refused = post_form(plain, {"name": "Tess", "email": "tess@example.com"})
    assert refused.status_code == 503 and sink.messages == []  # no password in clear
    assert [k.revoked_at is not None for k in keys.list_keys()] == [False, True]
