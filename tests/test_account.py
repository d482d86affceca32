"""The customer page in a real browser (headless Chromium): a key pasted into the form
shows what `GET /v1/usage` says of it, and nothing else."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from keymeai.ledger import keys
from keymeai.ledger.billing import parse_usd
from tests.helpers.browser import Pages, field, number, screenshot, use
from tests.helpers.ledger import usage_records
from tests.helpers.servers import Gateway

if TYPE_CHECKING:
    from playwright.sync_api import Page, Response


def look_up(page: Page, url: str, key: str) -> Response:
    """Paste `key` into the form and send it; the response to that POST."""
    page.goto(f"{url}/account")
    page.fill("#key", key)
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        page.click("button[type=submit]")
    return posted.value


def shown_standing(page: Page) -> dict[str, Any]:
    """The page's figures, in the shape of the `GET /v1/usage` fields they show."""
    window = page.locator('tr[data-limit="requests"]')
    tokens = page.locator('tr[data-limit="tokens"]')
    spend = page.locator('tr[data-limit="spend"]')
    return {
        "key": {"name": field(page, "key.name"), "prefix": field(page, "key.prefix")},
        "tier": field(page, "tier"),
        "usage": {
            "requests": number(field(page, "usage.requests")),
            "prompt_tokens": number(field(page, "usage.prompt_tokens")),
            "completion_tokens": number(field(page, "usage.completion_tokens")),
            "total_tokens": number(field(page, "usage.total_tokens")),
            "cost": field(page, "usage.cost").removeprefix("$"),
        },
        "requests": {
            "limit": field(window, "limits.requests.limit"),
            "used": number(field(window, "limits.requests.used")),
            "remaining": number(field(window, "limits.requests.remaining")),
            "resets_at": window.locator("time").get_attribute("datetime"),
        },
        "tokens": {
            "used": number(field(tokens, "limits.tokens.used")),
            "remaining": number(field(tokens, "limits.tokens.remaining")),
            "resets_at": tokens.locator("time").get_attribute("datetime"),
        },
        "spend": {
            "used": field(spend, "limits.spend.used").removeprefix("$"),
            "remaining": field(spend, "limits.spend.remaining").removeprefix("$"),
        },
    }


def api_standing(gateway: Gateway, key: str) -> dict[str, Any]:
    """The same fields from `GET /v1/usage`, called with the openai SDK."""
    body: Any = gateway.client(key).get("/usage", cast_to=object)
    window = body["limits"]["requests"][0]
    tokens, spend = body["limits"]["tokens"], body["limits"]["spend"]
    return {
        "key": {"name": body["key"]["name"], "prefix": body["key"]["prefix"]},
        "tier": body["tier"],
        "usage": body["usage"],
        "requests": {name: window[name] for name in ("limit", "used", "remaining", "resets_at")},
        "tokens": {name: tokens[name] for name in ("used", "remaining", "resets_at")},
        "spend": {name: spend[name] for name in ("used", "remaining")},
    }


def test_the_page_shows_what_v1_usage_says(gateway: Gateway, pages: Pages) -> None:
    _, key = keys.create_key("Hobbyist & Sons", "hobby", spend_cap_units=parse_usd("5"))
    use(gateway, key, {"deepseek-chat": 2, "qwen-plus": 1, "qwen-max": 1})
    page = pages.open()
    response = look_up(page, gateway.url, key)
    assert response.status == 200
    assert response.headers["cache-control"] == "no-store"
    assert "script-src" not in response.headers["content-security-policy"]  # none at all
    assert response.headers["x-frame-options"] == "DENY"

    shown = shown_standing(page)
    assert shown == api_standing(gateway, key)  # reading either costs no request
    records = usage_records()
    assert shown["usage"]["requests"] == 4 == len(records)
    assert shown["usage"]["total_tokens"] == sum(r.total_tokens for r in records)
    assert shown["key"]["name"] == "Hobbyist & Sons"
    assert "Hobbyist &amp; Sons" in response.text()  # escaped by the server
    assert shown["tier"] == "hobby" and shown["requests"]["limit"] == "600 per 1 minute"
    assert shown["tokens"]["remaining"] == 5_000_000 - shown["usage"]["total_tokens"]
    bars = page.locator('figure[data-chart="requests"] rect.bar')
    assert sum(int(bars.nth(n).get_attribute("data-value") or 0) for n in range(bars.count())) == 4

    # The key is nowhere: not in the address, not in the page, not in the field.
    assert page.url == f"{gateway.url}/account"
    assert key not in page.content() and key[:20] not in page.content()
    assert page.input_value("#key") == ""
    assert (page.get_attribute("form", "method"), page.get_attribute("#key", "type")) == (
        "post",
        "password",
    )
    screenshot(page, "account")
    page.goto(f"{gateway.url}/account?key={key}")  # nor is a key in a URL ever read
    assert page.locator("section.account").count() == 0
    assert pages.dialogs == []


def test_bad_keys_get_an_error_and_the_form_is_rate_limited(gateway: Gateway, pages: Pages) -> None:
    revoked = gateway.create_key("standard")
    keys.revoke_key(keys.find_key(revoked))
    page = pages.open()
    cases = [
        ("km-" + "x" * 43, 401, "Incorrect API key provided: km-xxxx****."),
        ("sk-not-one-of-ours", 401, "Incorrect API key provided. Keys look like km-..."),
        (revoked, 401, f"This API key ({revoked[:11]}...) has been revoked."),
        (" ", 400, "Paste your API key (km-...)."),
    ]
    for pasted, status, message in cases:
        response = look_up(page, gateway.url, pasted)
        assert (response.status, field(page, "error")) == (status, message)
        assert page.locator("section.account").count() == 0
    screenshot(page, "account-refused")

    good = gateway.create_key("free")
    for _ in range(10 - len(cases)):  # from the same address, without drawing the page
        assert page.request.post(f"{gateway.url}/account", form={"key": good}).status == 200
    response = look_up(page, gateway.url, good)  # the 11th look-up in a minute
    assert response.status == 429 and int(response.headers["retry-after"]) >= 1
    assert "Too many attempts" in field(page, "error")
    # The API itself is not held back by the page's limit.
    gateway.client(good).chat.completions.create(
        model="deepseek-chat", messages=[{"role": "user", "content": "hi"}]
    )


def test_the_page_works_with_javascript_off(gateway: Gateway, pages: Pages) -> None:
    key = gateway.create_key("scale", name="no-js")
    use(gateway, key, {"doubao-pro-32k": 2})
    page = pages.open(javascript=False, width=390, height=844)
    assert look_up(page, gateway.url, key).status == 200
    assert number(field(page, "usage.requests")) == 2
    assert field(page, "tier") == "scale"
    assert page.locator('figure[data-chart="tokens"] rect.bar').count() == 1
    screenshot(page, "account-phone")
