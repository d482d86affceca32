"""What the HTML pages (/dashboard, /account) share: security headers, HTML errors, daily
bar charts drawn as SVG on the server, sortable tables and number formats.

The pages are server-rendered Jinja without a line of script: they work with JavaScript
off, and their Content-Security-Policy forbids every script. Jinja escapes every value a
template prints (key names, model names), and nothing here marks user data as safe.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from flask import Blueprint, Flask, Response, abort, render_template, request, url_for
from flask_limiter import Limiter, RateLimitExceeded
from flask_limiter.util import get_remote_address
from limits.errors import StorageError
from werkzeug.http import HTTP_STATUS_CODES

from .. import gateway
from ..errors import retry_after
from ..ledger.quota import format_usd
from ..ledger.reports import Totals, month_range

PREFIXES = ("/dashboard", "/account", "/signup")
PAGE_ARGS = ("month", "models", "keys")  # the query parameters the pages read
MAX_FORM_BYTES = 16 * 1024  # a token, a key or a tier: no form needs more
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    # Usage, costs and the admin's view of keys: nothing for a shared cache or the
    # browser's history to keep.
    "Cache-Control": "no-store",
}
# The chart's geometry, in SVG user units (the SVG scales to the page's width).
BAR_STEP = 12
BAR_WIDTH = 9
PLOT_HEIGHT = 100
CHART_HEIGHT = PLOT_HEIGHT + 16
Row = TypeVar("Row")


def is_page() -> bool:
    """Whether the current request is for one of the HTML pages (or their errors)."""
    path = request.path
    return any(path == prefix or path.startswith(prefix + "/") for prefix in PREFIXES)


def init_app(app: Flask) -> None:
    """Security headers on every page response, and the templates' helpers."""

    @app.after_request
    def page_headers(response: Response) -> Response:
        if is_page():
            response.headers.update(SECURITY_HEADERS)
        return response

    app.add_template_global(sort_url)
    app.add_template_global(page_url)
    app.add_template_filter(count)
    app.add_template_filter(usd)
    app.add_template_filter(when)
    app.add_template_filter(duration)


def limit_form(app: Flask, limiter: Limiter, endpoint: str, limit: str) -> None:
    """Limit the form posts to a page per client address (showing the form is free),
    counted by the app's limiter in its storage (memory or Redis, as configured)."""
    limited = limiter.limit(limit, key_func=get_remote_address, methods=["POST"])
    app.view_functions[endpoint] = limited(app.view_functions[endpoint])  # type: ignore[assignment]


def error_page(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    """An error as an HTML page, for people in a browser rather than an SDK."""
    title = HTTP_STATUS_CODES.get(status, "Error")
    body = render_template("error.html", status=status, title=title, message=message)
    return Response(body, status, mimetype="text/html", headers=dict(headers or {}))


def init_blueprint(bp: Blueprint) -> None:
    """A small body limit for the pages' forms, and their own answer to the limiter's
    errors, which the app answers in JSON (and counts as customer rejections) for the API."""

    @bp.before_request
    def small_bodies() -> None:
        request.max_content_length = MAX_FORM_BYTES

    @bp.errorhandler(RateLimitExceeded)
    def too_many(exc: RateLimitExceeded) -> Response:
        current = gateway.current().limiter.current_limit
        wait = retry_after(current.window.reset_time, time.time()) if current else 60
        return error_page(
            429,
            f"Too many attempts from your address ({exc.description}). "
            f"Please try again in {wait} seconds.",
            {"Retry-After": str(wait)},
        )

    @bp.errorhandler(StorageError)
    def limiter_down(exc: StorageError) -> Response:
        return error_page(
            503,
            "This page is unavailable for a moment. Please retry shortly.",
            {"Retry-After": "5"},
        )


# Formats


def count(value: int) -> str:
    return f"{value:,}"


def usd(units: int) -> str:
    """Cost units as exact dollars, as `GET /v1/usage` writes them: "$0.00002634"."""
    return "$" + format_usd(units)


def when(moment: dt.datetime | None) -> str:
    return "never" if moment is None else f"{moment:%Y-%m-%d %H:%M} UTC"


def duration(seconds: int) -> str:
    """A wait read at a glance: "45 s", "6 min 5 s", "3 h 20 min", "12 d 4 h"."""
    steps = [("d", 86_400), ("h", 3600), ("min", 60), ("s", 1)]
    parts: list[str] = []
    rest = max(0, int(seconds))
    for unit, size in steps:
        amount, rest = divmod(rest, size)
        if amount or (parts and len(parts) < 2):
            parts.append(f"{amount} {unit}")
        if len(parts) == 2:
            break
    return " ".join(part for part in parts if not part.startswith("0 ")) or "0 s"


# Charts


@dataclass(frozen=True)
class Bar:
    day: dt.date
    value: int
    text: str
    x: int
    height: float

    @property
    def y(self) -> float:
        return PLOT_HEIGHT - self.height


@dataclass(frozen=True)
class Chart:
    """One bar per day of a month, scaled to the month's highest day."""

    name: str
    title: str
    bars: list[Bar]
    peak: str
    width: int
    height: int = CHART_HEIGHT
    base: int = PLOT_HEIGHT
    bar_width: int = BAR_WIDTH


METRICS: Mapping[str, tuple[str, Callable[[Totals], int], Callable[[int], str]]] = {
    "requests": ("Requests", lambda totals: totals.requests, count),
    "tokens": ("Tokens", lambda totals: totals.total_tokens, count),
    "cost": ("Cost", lambda totals: totals.cost_units, usd),
}


def daily_charts(month: dt.date, days: Mapping[dt.date, Totals]) -> list[Chart]:
    """The month's requests, tokens and cost per day (UTC)."""
    start, end = month_range(month)
    dates = [start + dt.timedelta(days=n) for n in range((end - start).days)]
    charts = []
    for name, (title, metric, fmt) in METRICS.items():
        values = [metric(days[day]) if day in days else 0 for day in dates]
        peak = max(values)
        bars = [
            Bar(day, value, fmt(value), n * BAR_STEP, _height(value, peak))
            for n, (day, value) in enumerate(zip(dates, values, strict=True))
        ]
        charts.append(Chart(name, title, bars, fmt(peak), len(dates) * BAR_STEP))
    return charts


def _height(value: int, peak: int) -> float:
    """A bar's height; a day with any usage gets at least a sliver, to be seen at all."""
    if not value:
        return 0
    return max(1.0, round(value / peak * PLOT_HEIGHT, 2))


# Sortable tables: the order is a query parameter ("cost", "-cost" for descending), so
# sorting is a plain link and works without JavaScript.


@dataclass(frozen=True)
class Sort:
    column: str
    descending: bool

    @property
    def spec(self) -> str:
        return f"-{self.column}" if self.descending else self.column


def parse_sort(param: str, columns: Collection[str], default: str) -> Sort:
    """The order a table's query parameter asks for; 400 for an unknown column."""
    spec = request.args.get(param, default)
    column = spec.removeprefix("-")
    if column not in columns:
        abort(400, f"{param} must be one of {', '.join(sorted(columns))} (a leading - sorts down)")
    return Sort(column, spec.startswith("-"))


def sort_rows(
    rows: Iterable[Row], sort: Sort, keys: Mapping[str, Callable[[Row], Any]]
) -> list[Row]:
    return sorted(rows, key=keys[sort.column], reverse=sort.descending)


def sort_url(param: str, column: str, current: Sort) -> str:
    """This page's URL with the table sorted by `column`: up first, down when clicked
    again."""
    toggled = current.column == column and not current.descending
    return page_url(**{param: f"-{column}" if toggled else column})


def page_url(**changes: str) -> str:
    """This page's URL with some of its query parameters changed; the others it knows
    (month, the tables' order) are kept, anything else is dropped."""
    args = {name: value for name, value in request.args.items() if name in PAGE_ARGS}
    args.update(changes)
    return url_for(str(request.endpoint), **{**args, **(request.view_args or {})})
