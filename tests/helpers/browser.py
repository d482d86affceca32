"""Headless Chromium (Debian's package) driven by Playwright, for the page tests.

No browser is ever downloaded: Playwright launches /usr/bin/chromium. Where it or
Playwright is missing the browser tests skip, unless KEYMEAI_REQUIRE_SERVICES=1 (CI),
which makes that a failure. One browser serves a whole test module; each test opens
pages in fresh contexts (their own cookies), and keeps screenshots in
artifacts/screenshots/.
"""

from __future__ import annotations

import gc
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import openai

from tests.helpers.admin import ADMIN_TOKEN
from tests.helpers.clients import HI
from tests.helpers.config import ROOT
from tests.helpers.servers import Gateway
from tests.helpers.services import unavailable

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Dialog, Page

CHROMIUM = os.environ.get("KEYMEAI_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
TIMEOUT_MS = 10_000


def browser_problem() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright for Python is not installed (pip install -r requirements-dev.txt)"
    return None


def launch_browser() -> Iterator[Browser]:
    """Headless Chromium, for the `browser` fixture. Playwright's launch() gives it a
    fresh temporary profile (user data dir), removed when it closes."""
    problem = browser_problem()
    if problem:
        unavailable(problem)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
    # Playwright's sync API runs on greenlets: collect what it left here, right after it
    # stopped, rather than whenever a later test's allocation starts a collection (a
    # pytest process once crashed inside the collector soon after the page tests).
    gc.collect()


class Pages:
    """Opens pages for one test, each in a browser context of its own (own cookies),
    and notes every dialog (alert, confirm, prompt) any of them opened."""

    def __init__(self, browser: Browser) -> None:
        self.browser = browser
        self.contexts: list[BrowserContext] = []
        self.dialogs: list[str] = []

    def open(self, javascript: bool = True, width: int = 1280, height: int = 900) -> Page:
        context = self.browser.new_context(
            java_script_enabled=javascript, viewport={"width": width, "height": height}
        )
        context.set_default_timeout(TIMEOUT_MS)
        self.contexts.append(context)
        page = context.new_page()
        page.on("dialog", self._dialog)
        return page

    def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def close(self) -> None:
        for context in self.contexts:
            context.close()


def screenshot(page: Page, name: str) -> Path:
    """Keep the whole page as artifacts/screenshots/<name>.png."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def sign_in(page: Page, gateway: Gateway, token: str = ADMIN_TOKEN) -> None:
    page.goto(f"{gateway.url}/dashboard/")
    page.fill("#token", token)
    page.click("button[type=submit]")


def use(gateway: Gateway, key: str, models: dict[str, int]) -> None:
    """Real chat completions through the gateway: `count` requests per model."""
    client = gateway.client(key)
    for model, count in models.items():
        for _ in range(count):
            client.chat.completions.create(model=model, messages=HI)


def number(text: str) -> int:
    """A figure as a page prints it ("1,234") as an int."""
    return int(text.replace(",", "").strip())


def field(scope: Any, name: str) -> str:
    return str(scope.locator(f'[data-field="{name}"]').first.inner_text()).strip()


def refused(call: Callable[[], Any]) -> bool:
    """Whether the API refused the call with 401 (openai.AuthenticationError)."""
    try:
        call()
    except openai.AuthenticationError:
        return True
    return False


def table_column(page: Page, table: str, name: str) -> list[str]:
    """The texts of a column (`data-field`) of a table, top to bottom."""
    cells = page.locator(f'table.{table} tbody td[data-field="{name}"]')
    return [re.sub(r"\s+", " ", text).strip() for text in cells.all_inner_texts()]
