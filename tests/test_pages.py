"""The pages over plain HTTP: the dashboard's guard, session cookie and sign-in limit per
address, HTML errors beside the API's JSON ones, security headers, the CSV download and
the last-use query."""

from __future__ import annotations

import http.client
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode, urlsplit

import pytest
import requests

from keymeai.ledger import db, keys, reports
from keymeai.ledger.models import utcnow
from tests.helpers.admin import ADMIN_TOKEN, Admin, admin_gateway, csrf, signed_in
from tests.helpers.browser import use
from tests.helpers.clients import HI
from tests.helpers.ledger import usage_records
from tests.helpers.servers import Gateway, free_port

PAGES = ["/dashboard/", "/dashboard/signin", "/dashboard/keys/1", "/dashboard/usage.csv"]


def assert_html_error(response: requests.Response, status: int, text: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    assert text in response.text, response.text
    assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]


def test_the_dashboard_is_off_without_the_admin_token(gateway: Gateway) -> None:
    for path in PAGES:
        assert_html_error(requests.get(f"{gateway.url}{path}", timeout=10), 404, "is off")
    response = requests.post(f"{gateway.url}/dashboard/signin", data={"token": ""}, timeout=10)
    assert_html_error(response, 404, "KEYMEAI_ADMIN_TOKEN is not set")
    assert requests.get(f"{gateway.url}/account", timeout=10).status_code == 200


def test_signed_out_visitors_only_get_the_sign_in_form(operator: Gateway) -> None:
    key = operator.create_key("standard", name="secret-customer")
    use(operator, key, {"deepseek-chat": 1})
    for path in PAGES[:1] + PAGES[2:]:
        response = requests.get(f"{operator.url}{path}", timeout=10, allow_redirects=False)
        assert (response.status_code, response.headers["Location"]) == (303, "/dashboard/signin")
        assert "secret-customer" not in response.text
    form = requests.get(f"{operator.url}/dashboard/signin", timeout=10)
    assert form.status_code == 200 and 'type="password"' in form.text
    assert "Set-Cookie" not in form.headers


def test_pages_answer_errors_in_html_and_the_api_in_json(operator: Gateway) -> None:
    session = signed_in(operator)
    url = operator.url
    assert_html_error(session.get(f"{url}/dashboard/nothing-here", timeout=10), 404, "Not Found")
    assert_html_error(session.get(f"{url}/account/nothing-here", timeout=10), 404, "Not Found")
    assert_html_error(
        session.get(f"{url}/dashboard/keys/999", timeout=10), 404, "no key with id 999"
    )
    assert_html_error(
        session.get(f"{url}/dashboard/?month=2026-13", timeout=10), 400, "month must be YYYY-MM"
    )
    assert_html_error(
        session.get(f"{url}/dashboard/?models=price", timeout=10), 400, "models must be one of"
    )
    assert_html_error(
        session.get(f"{url}/dashboard/usage.csv?key=x", timeout=10), 400, "key must be a key id"
    )
    assert_html_error(
        session.get(f"{url}/dashboard/usage.csv?by=week", timeout=10), 400, "by must be one of"
    )
    wrong_method = session.get(f"{url}/dashboard/keys/1/revoke", timeout=10)
    assert_html_error(wrong_method, 405, "not allowed")
    assert "POST" in wrong_method.headers["Allow"]
    key_id = keys.find_key(operator.create_key("standard")).id
    token = csrf(session, f"{url}/dashboard/keys/{key_id}")
    bad_tier = session.post(
        f"{url}/dashboard/keys/{key_id}/tier", data={"csrf": token, "tier": "gold"}, timeout=10
    )
    assert_html_error(bad_tier, 400, "unknown tier &#39;gold&#39;; configured tiers: free, hobby")
    for path in ("/account", "/dashboard/signin"):
        huge = requests.post(f"{url}{path}", data={"key": "x" * 20_000}, timeout=10)
        assert_html_error(huge, 413, "Request Entity Too Large")

    api = requests.get(f"{url}/v1/nothing-here", timeout=10)
    assert api.status_code == 404 and api.json()["error"]["code"] == "unknown_url"
    assert "Content-Security-Policy" not in api.headers
    admin = Admin(url).get("/keys/999")
    assert admin.status_code == 404 and admin.json()["error"]["code"] == "key_not_found"


def test_every_page_carries_the_security_headers(operator: Gateway) -> None:
    session = signed_in(operator)
    key_id = keys.find_key(operator.create_key("standard")).id
    for path in ["/dashboard/", f"/dashboard/keys/{key_id}", "/dashboard/usage.csv", "/account"]:
        headers = session.get(f"{operator.url}{path}", timeout=10).headers
        policy = headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "unsafe-inline" not in policy
        assert "script-src" not in policy  # default-src 'none': no script at all
        assert headers["X-Frame-Options"] == "DENY"
        assert headers["Referrer-Policy"] == "no-referrer"
        assert headers["Cache-Control"] == "no-store"
    css = requests.get(f"{operator.url}/static/keymeai.css", timeout=10)
    assert css.status_code == 200 and css.headers["Content-Type"].startswith("text/css")


def test_session_cookie_flags(operator: Gateway) -> None:
    """HttpOnly, SameSite=Strict and /dashboard only; Secure exactly over HTTPS."""
    client = operator.app.test_client()
    for scheme, secure in (("http", False), ("https", True)):
        response = client.post(
            "/dashboard/signin", data={"token": ADMIN_TOKEN}, base_url=f"{scheme}://localhost"
        )
        assert response.status_code == 303
        cookie = response.headers["Set-Cookie"]
        assert cookie.startswith("keymeai_dashboard=")
        assert "; HttpOnly" in cookie and "; SameSite=Strict" in cookie
        assert "; Path=/dashboard" in cookie
        assert ("; Secure" in cookie) is secure


def test_a_new_admin_token_signs_everyone_out(
    operator: Gateway, start_gateway: Callable[..., Gateway]
) -> None:
    session = signed_in(operator)
    rotated = start_gateway(env={"KEYMEAI_ADMIN_TOKEN": "a-brand-new-admin-token"})
    for gateway, expected in ((operator, 200), (rotated, 303)):
        cookies = {"keymeai_dashboard": session.cookies["keymeai_dashboard"]}
        response = requests.get(
            f"{gateway.url}/dashboard/", cookies=cookies, allow_redirects=False, timeout=10
        )
        assert response.status_code == expected


def _sign_in_from(url: str, address: str, token: str) -> int:
    """POST the sign-in form from a given loopback address (all of 127/8 is local)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(
        parts.hostname or "", parts.port, timeout=10, source_address=(address, 0)
    )
    try:
        connection.request(
            "POST",
            "/dashboard/signin",
            urlencode({"token": token}),
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
        return connection.getresponse().status
    finally:
        connection.close()


def test_sign_in_attempts_are_limited_per_address(operator: Gateway) -> None:
    statuses = [_sign_in_from(operator.url, "127.0.0.2", "guess") for _ in range(6)]
    assert statuses == [401] * 5 + [429]
    assert _sign_in_from(operator.url, "127.0.0.2", ADMIN_TOKEN) == 429
    assert _sign_in_from(operator.url, "127.0.0.3", ADMIN_TOKEN) == 303
    # Showing the form is not an attempt.
    for _ in range(10):
        assert requests.get(f"{operator.url}/dashboard/signin", timeout=10).status_code == 200


def test_behind_a_trusted_proxy_the_forwarded_client_and_scheme_count(
    start_gateway: Callable[..., Gateway], config_data: dict[str, Any]
) -> None:
    """gateway.trusted_proxies = 1 (Heroku's router): X-Forwarded-For names the client
    whose sign-ins are counted, X-Forwarded-Proto: https makes the cookie Secure."""
    config_data["gateway"]["trusted_proxies"] = 1
    proxied = admin_gateway(start_gateway)[0]

    def sign_in(client: str, token: str = "guess") -> requests.Response:
        return requests.post(
            f"{proxied.url}/dashboard/signin",
            data={"token": token},
            headers={"X-Forwarded-For": client, "X-Forwarded-Proto": "https"},
            allow_redirects=False,
            timeout=10,
        )

    assert [sign_in("203.0.113.7").status_code for _ in range(6)] == [401] * 5 + [429]
    admitted = sign_in("198.51.100.9", ADMIN_TOKEN)  # another client behind the same proxy
    assert admitted.status_code == 303 and "; Secure" in admitted.headers["Set-Cookie"]


def test_names_in_csv_cannot_become_spreadsheet_formulas(operator: Gateway) -> None:
    key = operator.create_key("standard", name='=HYPERLINK("http://x","pay")')
    use(operator, key, {"deepseek-chat": 1})
    csv_text = Admin(operator.url).get("/usage?format=csv").text
    assert "'=HYPERLINK(" in csv_text
    assert ",=HYPERLINK(" not in csv_text and '",""=HYPERLINK' not in csv_text


def test_csv_download_is_the_usage_report(operator: Gateway) -> None:
    first, second = operator.create_key("standard", "a"), operator.create_key("hobby", 'b,"c"')
    use(operator, first, {"deepseek-chat": 2, "qwen-max": 1})
    use(operator, second, {"doubao-pro-32k": 1})
    session = signed_in(operator)
    admin = Admin(operator.url)
    month = f"{utcnow():%Y-%m}"
    second_id = keys.find_key(second).id
    for query in ("", "&by=day", f"&key={second_id}", f"&key={second_id}&by=day"):
        page = session.get(f"{operator.url}/dashboard/usage.csv?month={month}{query}", timeout=10)
        api = admin.get(f"/usage?format=csv&month={month}{query}")
        assert page.status_code == api.status_code == 200
        assert page.text == api.text and page.text.count("\n") >= 3
        assert page.headers["Content-Disposition"] == api.headers["Content-Disposition"]
    whole = session.get(f"{operator.url}/dashboard/usage.csv", timeout=10).text
    assert whole == reports.to_csv(reports.monthly_usage(utcnow().date().replace(day=1)))


@pytest.mark.both_databases
def test_last_use_is_each_keys_newest_record(
    start_gateway: Callable[..., Gateway], database_backend: str
) -> None:
    gateway = start_gateway()
    used, unused = gateway.create_key(), gateway.create_key()
    other = gateway.create_key()
    for key in (used, other, used):
        gateway.client(key).chat.completions.create(model="deepseek-chat", messages=HI)
    newest: dict[int, object] = {}
    for record in usage_records():
        newest[record.key_id] = max(record.created_at, newest.get(record.key_id, record.created_at))
    assert reports.last_used() == newest
    assert keys.find_key(unused).id not in newest
    used_id = keys.find_key(used).id
    assert reports.last_used(used_id) == {used_id: newest[used_id]}
    if database_backend == "sqlite":
        sql, params = reports.last_used_query().sql()
        with db.connection():
            plan = db.db.execute_sql(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()
        steps = " | ".join(str(row[-1]) for row in plan)
        # One index seek per key, never a scan of the records.
        assert "SEARCH t2 USING COVERING INDEX usage_record_key_id_created_at" in steps, steps
        assert "SCAN t2" not in steps, steps


@pytest.mark.redis
def test_sign_in_attempts_are_counted_across_instances_in_redis(
    start_gateway: Callable[..., Gateway], config_data: dict[str, Any], redis_url: str
) -> None:
    config_data["ratelimit"]["storage_uri"] = redis_url
    first, second = (admin_gateway(start_gateway, config_data)[0] for _ in range(2))
    for gateway in (first, second, first, second, first):
        assert _sign_in_from(gateway.url, "127.0.0.4", "guess") == 401
    assert _sign_in_from(second.url, "127.0.0.4", ADMIN_TOKEN) == 429
    assert _sign_in_from(second.url, "127.0.0.5", ADMIN_TOKEN) == 303


def test_limiter_storage_down_is_a_page_too(
    start_gateway: Callable[..., Gateway], config_data: dict[str, Any]
) -> None:
    """Fail-closed limits with Redis unreachable: the forms answer an HTML 503."""
    dead = f"redis://127.0.0.1:{free_port()}"
    config_data["ratelimit"] = {"storage_uri": dead, "on_storage_error": "deny"}
    gateway = admin_gateway(start_gateway, config_data)[0]
    for path, form in (("/account", {"key": "km-x"}), ("/dashboard/signin", {"token": "x"})):
        response = requests.post(f"{gateway.url}{path}", data=form, timeout=10)
        assert_html_error(response, 503, "unavailable for a moment")
        assert response.headers["Retry-After"] == "5"
