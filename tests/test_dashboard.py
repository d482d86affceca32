"""The operator dashboard in a real browser (headless Chromium): signed in with the admin
token, filled from real ledger rows written by requests through the gateway, sorted,
paged by month, and used to revoke a key and change its tier."""

from __future__ import annotations

import collections
import datetime as dt
import time
from typing import TYPE_CHECKING

from keymeai.ledger import keys
from keymeai.ledger.models import utcnow
from keymeai.ledger.quota import format_usd
from keymeai.operator.pages import when
from tests.helpers.admin import ADMIN_TOKEN
from tests.helpers.browser import (
    Pages,
    field,
    number,
    refused,
    screenshot,
    sign_in,
    table_column,
    use,
)
from tests.helpers.clients import HI
from tests.helpers.ledger import usage_records
from tests.helpers.servers import Gateway

if TYPE_CHECKING:
    pass


def _previous_month() -> str:
    return f"{(utcnow().date().replace(day=1) - dt.timedelta(days=1)):%Y-%m}"


def test_overview_is_filled_from_the_ledger(operator: Gateway, pages: Pages) -> None:
    acme = keys.create_key("Acme Corp", "standard")[1]
    globex = keys.create_key("Globex", "hobby")[1]
    keys.create_key("Initech (unused)", "free")
    use(operator, acme, {"deepseek-chat": 3, "qwen-max": 1})
    use(operator, globex, {"doubao-pro-32k": 2, "deepseek-chat": 1})
    records = usage_records()
    assert len(records) == 7

    page = pages.open()
    sign_in(page, operator)
    assert page.url == f"{operator.url}/dashboard/"
    totals = page.locator("dl.figures")
    assert number(field(totals, "requests")) == 7
    assert number(field(totals, "total_tokens")) == sum(r.total_tokens for r in records)
    assert field(totals, "cost") == "$" + format_usd(sum(r.cost_units for r in records))

    # One bar per day with usage, carrying that day's figure from the records.
    per_day: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0, 0])
    for r in records:
        sums = per_day[r.created_at.date().isoformat()]
        sums[0], sums[1], sums[2] = sums[0] + 1, sums[1] + r.total_tokens, sums[2] + r.cost_units
    for index, chart in enumerate(("requests", "tokens", "cost")):
        bars = page.locator(f'figure[data-chart="{chart}"] svg rect.bar')
        shown = {
            bars.nth(n).get_attribute("data-day"): int(bars.nth(n).get_attribute("data-value") or 0)
            for n in range(bars.count())
        }
        assert shown == {day: sums[index] for day, sums in per_day.items()}
        assert page.locator(f'figure[data-chart="{chart}"] svg text.tick').count() >= 6

    # By model, most expensive first (the default order).
    by_model = collections.Counter(r.model for r in records)
    models = table_column(page, "models", "model")
    requests = map(number, table_column(page, "models", "requests"))
    assert dict(zip(models, requests, strict=True)) == by_model
    cost = {m: sum(r.cost_units for r in records if r.model == m) for m in by_model}
    assert models == sorted(by_model, key=lambda m: cost[m], reverse=True)

    # Keys: every key, with its tier, status, last use and the month's figures.
    names = table_column(page, "keys", "name")
    assert set(names) == {"Acme Corp", "Globex", "Initech (unused)"}
    rows = {name: page.locator("table.keys tbody tr", has_text=name) for name in names}
    assert field(rows["Globex"], "tier") == "hobby"
    assert field(rows["Acme Corp"], "status") == "active"
    assert number(field(rows["Acme Corp"], "requests")) == 4
    assert field(rows["Initech (unused)"], "last_used") == "never"
    acme_id = keys.find_key(acme).id
    last = max(r.created_at for r in records if r.key_id == acme_id)
    assert field(rows["Acme Corp"], "last_used") == when(last)
    assert pages.dialogs == []
    screenshot(page, "dashboard-overview")

    # A phone's width: everything fits, wide tables scroll inside their own box.
    phone = pages.open(width=390, height=844)
    sign_in(phone, operator)
    # Once laid out (the charts are drawn after load): a deadline, not one instant's look.
    # Polled from here: wait_for_function polls with eval(), which the page's CSP forbids.
    deadline = time.monotonic() + 5
    while not phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth"):
        assert time.monotonic() < deadline, "the page is wider than a phone's screen"
        time.sleep(0.05)
    screenshot(phone, "dashboard-overview-phone")


def test_tables_sort_and_the_month_picker_pages(operator: Gateway, pages: Pages) -> None:
    busy, quiet = keys.create_key("busy", "standard")[1], keys.create_key("quiet", "standard")[1]
    use(operator, busy, {"deepseek-chat": 3, "qwen-plus": 1})
    use(operator, quiet, {"qwen-plus": 1, "qwen-max": 2})
    page = pages.open()
    sign_in(page, operator)

    page.click('table.models th a[data-sort="requests"]')
    assert page.url.endswith("models=requests")
    assert table_column(page, "models", "requests") == ["2", "2", "3"]
    page.click('table.models th a[data-sort="requests"]')
    assert "models=-requests" in page.url
    assert table_column(page, "models", "requests") == ["3", "2", "2"]
    assert page.get_attribute('table.models th[aria-sort="descending"] a', "data-sort") == (
        "requests"
    )
    page.click('table.keys th a[data-sort="name"]')
    assert "models=-requests" in page.url and "keys=name" in page.url  # both orders kept
    assert table_column(page, "keys", "name") == ["busy", "quiet"]
    page.click('table.keys th a[data-sort="name"]')
    assert table_column(page, "keys", "name") == ["quiet", "busy"]

    # Last month: nothing was used then.
    previous = _previous_month()
    page.fill("input[name=month]", previous)
    page.click("form.months button")
    assert f"month={previous}" in page.url and "keys=-name" in page.url
    assert page.inner_text("h1") == f"Usage in {previous}"
    assert number(field(page.locator("dl.figures"), "requests")) == 0
    assert page.locator("table.models td.empty").inner_text() == "No usage in this month."
    assert page.locator("svg rect.bar").count() == 0
    assert table_column(page, "keys", "requests") == ["0", "0"]  # keys are listed all the same
    page.click("form.months a[rel=next]")
    assert number(field(page.locator("dl.figures"), "requests")) == 7
    assert page.locator("form.months a[rel=next]").count() == 0  # no future months


def test_change_tier_and_revoke_from_the_key_page(operator: Gateway, pages: Pages) -> None:
    key = operator.create_key("standard", name="Umbrella")
    client = operator.client(key)
    first = client.chat.completions.with_raw_response.create(model="deepseek-chat", messages=HI)
    assert first.headers["x-ratelimit-limit-requests"] == "3000"
    page = pages.open()
    sign_in(page, operator)
    page.click("table.keys a:text-is('Umbrella')")
    row = keys.find_key(key)
    assert page.url.startswith(f"{operator.url}/dashboard/keys/{row.id}")
    assert field(page, "tier") == "standard"
    assert field(page, "limits.requests.limit") == "3000 per 1 minute"
    assert number(field(page, "limits.requests.remaining")) == 2999
    assert number(field(page, "usage.requests")) == 1
    assert page.locator('figure[data-chart="requests"] rect.bar').count() == 1

    page.select_option("select[name=tier]", "free")
    page.click("text=Change tier")
    assert "now on the free tier" in page.inner_text("p.notice")
    assert field(page, "tier") == "free"
    assert field(page, "limits.requests.limit") == "100 per 1 day"
    after = client.chat.completions.with_raw_response.create(model="deepseek-chat", messages=HI)
    assert after.headers["x-ratelimit-limit-requests"] == "100"
    assert keys.find_key(key).tier == "free"
    screenshot(page, "dashboard-key")

    page.click("text=Revoke this key")
    assert "revoked" in page.inner_text("p.notice")
    assert field(page, "status") == "revoked"
    assert page.locator("text=Revoke this key").count() == 0
    assert refused(lambda: client.chat.completions.create(model="deepseek-chat", messages=HI))
    page.click("text=Overview")
    assert table_column(page, "keys", "status") == ["revoked"]
    screenshot(page, "dashboard-revoked")


def test_wrong_token_refused_and_sign_in_rate_limited(operator: Gateway, pages: Pages) -> None:
    page = pages.open()
    page.goto(f"{operator.url}/dashboard/keys/1")
    assert page.url == f"{operator.url}/dashboard/signin"  # signed out: the form
    for wrong in ("wrong", ADMIN_TOKEN[:-1], ADMIN_TOKEN + "x", " ", "ünïcode"):
        page.fill("#token", wrong)
        with page.expect_response(lambda r: r.request.method == "POST") as posted:
            page.click("button[type=submit]")
        assert posted.value.status == 401
        assert field(page, "error") == "That is not the admin token."
        assert page.context.cookies() == []
    screenshot(page, "dashboard-signin-refused")

    page.fill("#token", ADMIN_TOKEN)  # the right token, one attempt too many
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        page.click("button[type=submit]")
    assert posted.value.status == 429
    assert int(posted.value.headers["retry-after"]) >= 1
    assert "Too many attempts" in field(page, "error")
    screenshot(page, "dashboard-signin-limited")
    page.goto(f"{operator.url}/dashboard/")
    assert page.url == f"{operator.url}/dashboard/signin"


def test_forms_without_the_csrf_token_are_refused(operator: Gateway, pages: Pages) -> None:
    key = operator.create_key("standard", name="target")
    row = keys.find_key(key)
    page = pages.open()
    sign_in(page, operator)
    (cookie,) = page.context.cookies()
    assert cookie["name"] == "keymeai_dashboard" and cookie["path"] == "/dashboard"
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and not cookie["secure"]

    forms = [
        (f"/dashboard/keys/{row.id}/revoke", {}),
        (f"/dashboard/keys/{row.id}/revoke", {"csrf": "forged"}),
        (f"/dashboard/keys/{row.id}/tier", {"tier": "free"}),
        (f"/dashboard/keys/{row.id}/tier", {"tier": "free", "csrf": ""}),
    ]
    for path, form in forms:
        response = page.request.post(f"{operator.url}{path}", form=form, max_redirects=0)
        assert response.status == 403, (path, form)
        assert "security token" in response.text()
    assert (keys.find_key(key).tier, keys.find_key(key).revoked_at) == ("standard", None)
    operator.client(key).chat.completions.create(model="deepseek-chat", messages=HI)

    # Without the session cookie, a forged form only gets the sign-in page.
    stranger = pages.open()
    response = stranger.request.post(
        f"{operator.url}/dashboard/keys/{row.id}/revoke", form={"csrf": "x"}, max_redirects=0
    )
    assert response.status == 303 and response.headers["location"] == "/dashboard/signin"
    assert keys.find_key(key).revoked_at is None


def test_key_names_are_rendered_inert(operator: Gateway, pages: Pages) -> None:
    names = ["<script>alert(1)</script>", '"><img src=x onerror=alert(2)>']
    ids = []
    for name in names:
        key = operator.create_key("standard", name=name)
        use(operator, key, {"deepseek-chat": 1})
        ids.append(keys.find_key(key).id)
    page = pages.open()
    sign_in(page, operator)
    assert sorted(table_column(page, "keys", "name")) == sorted(names)
    raw = page.request.get(f"{operator.url}/dashboard/").text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in raw and "<script>alert" not in raw
    assert "&#34;&gt;&lt;img src=x onerror=alert(2)&gt;" in raw and "<img" not in raw
    for key_id, name in zip(ids, names, strict=True):
        page.goto(f"{operator.url}/dashboard/keys/{key_id}")
        assert field(page, "name") == name
        assert page.title() == f"Key {name} · KeyMeAI"
    assert page.locator("script, img").count() == 0
    assert pages.dialogs == []
    screenshot(page, "dashboard-xss")


def test_the_dashboard_works_with_javascript_off(operator: Gateway, pages: Pages) -> None:
    key = operator.create_key("standard", name="no-js")
    use(operator, key, {"qwen-max": 1, "deepseek-chat": 2})
    page = pages.open(javascript=False)
    sign_in(page, operator)
    assert number(field(page.locator("dl.figures"), "requests")) == 3
    assert page.locator('figure[data-chart="tokens"] rect.bar').count() == 1
    page.click('table.models th a[data-sort="model"]')
    assert table_column(page, "models", "model") == ["deepseek-chat", "qwen-max"]
    page.fill("input[name=month]", _previous_month())
    page.click("form.months button")
    assert number(field(page.locator("dl.figures"), "requests")) == 0
    page.click("form.months a[rel=next]")
    page.click("table.keys a:text-is('no-js')")
    page.select_option("select[name=tier]", "scale")
    page.click("text=Change tier")
    assert field(page, "tier") == "scale" and keys.find_key(key).tier == "scale"
    with page.expect_download() as download:
        page.click("text=by day")
    assert download.value.suggested_filename.endswith("-daily.csv")
    page.click("text=Sign out")
    assert page.url == f"{operator.url}/dashboard/signin"
    page.goto(f"{operator.url}/dashboard/")
    assert page.url == f"{operator.url}/dashboard/signin"
