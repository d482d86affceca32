"""The operator's dashboard at /dashboard: a month's usage, cost and keys, and a key's
revocation or change of tier, over the queries of the usage report and the admin API.

Signed in through a form with the admin token (KEYMEAI_ADMIN_TOKEN, compared in
constant time; without it the dashboard answers 404). Sign-in attempts are limited per
client address by the app's limiter, and wrong tokens count with those sent to /admin and
/metrics (keymeai.api.guesses). The session is Flask's signed cookie: HttpOnly,
SameSite=Strict, Secure when the request came over HTTPS, sent only to /dashboard. It
carries a session token whose row in the ledger (keymeai.operator.sessions) must still exist:
signing out deletes it, and a session idle for sessions.IDLE ends. The cookie's signing
key is derived from the admin token, so changing the token signs everyone out. Every
form that changes something carries the session's CSRF token, compared in constant time.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import secrets
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    flash,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.sessions import SecureCookieSessionInterface
from flask_limiter import Limiter
from werkzeug.wrappers import Response as BaseResponse

from .. import gateway
from ..api import guesses, standing
from ..config import Config
from ..ledger import keys, reports
from ..ledger.keys import KeyInfo
from ..ledger.models import ApiKey, utcnow
from ..ledger.reports import ReportRow, Totals
from . import admin, pages, sessions

log = logging.getLogger(__name__)

bp = Blueprint("dashboard", __name__, url_prefix="/dashboard")
pages.init_blueprint(bp)

SIGNIN_LIMIT = "5 per minute"  # per client address, wrong or right
SESSION_SALT = b"keymeai dashboard session"


@dataclass(frozen=True)
class ModelLine:
    model: str
    totals: Totals


@dataclass(frozen=True)
class KeyLine:
    id: int
    name: str
    prefix: str
    tier: str
    status: str
    last_used: dt.datetime | None
    totals: Totals


MODEL_COLUMNS: dict[str, Callable[[ModelLine], Any]] = dict(
    model=lambda line: line.model,
    requests=lambda line: line.totals.requests,
    prompt_tokens=lambda line: line.totals.prompt_tokens,
    completion_tokens=lambda line: line.totals.completion_tokens,
    cached_tokens=lambda line: line.totals.cached_tokens,
    total_tokens=lambda line: line.totals.total_tokens,
    cost=lambda line: line.totals.cost_units,
)
KEY_COLUMNS: dict[str, Callable[[KeyLine], Any]] = dict(
    id=lambda line: line.id,
    name=lambda line: line.name.casefold(),
    tier=lambda line: line.tier,
    status=lambda line: line.status,
    last_used=lambda line: line.last_used or dt.datetime.min,
    requests=lambda line: line.totals.requests,
    total_tokens=lambda line: line.totals.total_tokens,
    cost=lambda line: line.totals.cost_units,
)


class CookieSession(SecureCookieSessionInterface):
    """Flask's signed-cookie session, marked Secure exactly when served over HTTPS."""

    def get_cookie_secure(self, app: Flask) -> bool:
        return request.is_secure


def init_app(app: Flask, config: Config, limiter: Limiter) -> None:
    """Register the dashboard, its session cookie and the sign-in form's rate limit."""
    if config.admin_token is not None:
        app.secret_key = hmac.new(
            config.admin_token.encode(), SESSION_SALT, hashlib.sha256
        ).hexdigest()
    app.session_interface = CookieSession()
    app.config.update(
        SESSION_COOKIE_NAME="keymeai_dashboard",
        SESSION_COOKIE_PATH="/dashboard",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        PERMANENT_SESSION_LIFETIME=sessions.IDLE,
    )
    app.register_blueprint(bp)
    pages.limit_form(app, limiter, "dashboard.signin", SIGNIN_LIMIT)


@bp.before_request
def guard() -> BaseResponse | None:
    """404 while the admin token is unset; the sign-in form for anyone not signed in;
    a CSRF check on every form sent by someone signed in."""
    if gateway.current().config.admin_token is None:
        abort(404, "The dashboard is off on this server (KEYMEAI_ADMIN_TOKEN is not set).")
    if request.endpoint == "dashboard.signin":
        return None
    if not _signed_in():
        if session:
            session.clear()  # a signed-out or stale cookie: have the browser drop it
        return redirect(url_for(".signin"), 303)
    if request.method == "POST":
        expected = str(session.get("csrf", ""))
        supplied = request.form.get("csrf", "")
        if not expected or not hmac.compare_digest(supplied.encode(), expected.encode()):
            abort(403, "This form's security token is missing or out of date. Reload the page.")
    return None


def _cookie_session() -> tuple[str, str] | None:
    """The cookie's session token and the admin token its row is bound to."""
    token = session.get("sid")
    admin_token = gateway.current().config.admin_token
    if isinstance(token, str) and admin_token is not None:
        return token, admin_token
    return None


def _signed_in() -> bool:
    """Whether the cookie names a session the ledger still holds (not signed out)."""
    held = _cookie_session()
    return held is not None and sessions.is_live(*held)


@bp.app_template_global()
def csrf_token() -> str:
    return str(session.get("csrf", ""))


@bp.route("/signin", methods=["GET", "POST"])
def signin() -> BaseResponse | tuple[str, int]:
    if request.method == "GET":
        if _signed_in():
            return redirect(url_for(".overview"), 303)
        return render_template("dashboard/signin.html"), 200
    token = gateway.current().config.admin_token or ""
    supplied = request.form.get("token", "")
    if not guesses.is_admin_token(supplied, token):
        log.warning("dashboard: sign-in refused", extra={"client": request.remote_addr})
        return render_template("dashboard/signin.html", error="That is not the admin token."), 401
    _end_session()
    session.permanent = True
    session["sid"] = sessions.start(token)
    session["csrf"] = secrets.token_urlsafe(32)
    log.info("dashboard: signed in", extra={"client": request.remote_addr})
    return redirect(url_for(".overview"), 303)


@bp.post("/signout")
def signout() -> BaseResponse:
    _end_session()
    return redirect(url_for(".signin"), 303)


def _end_session() -> None:
    """Delete the cookie's session row, if any, and empty the cookie."""
    held = _cookie_session()
    if held is not None:
        sessions.end(*held)
    session.clear()


def _month() -> dt.date:
    """The month the page shows: `?month=YYYY-MM`, this month (UTC) by default."""
    text = request.args.get("month")
    if not text:
        return utcnow().date().replace(day=1)
    try:
        return reports.parse_month(text)
    except ValueError:
        abort(400, "month must be YYYY-MM, e.g. 2026-01")


def _months(month: dt.date) -> dict[str, str | None]:
    """The month picker's values: this one, the one before, the one after (if not future)."""
    current = utcnow().date().replace(day=1)
    first = month.year == 1 and month.month == 1
    before = None if first else (month - dt.timedelta(days=1)).replace(day=1)
    after = reports.month_range(month)[1]
    return {
        "month": f"{month:%Y-%m}",
        "previous": f"{before:%Y-%m}" if before else None,
        "next": f"{after:%Y-%m}" if after <= current else None,
        "current": f"{current:%Y-%m}",
    }


def _group(rows: Iterable[ReportRow], by: Callable[[ReportRow], Any]) -> dict[Any, Totals]:
    groups: dict[Any, list[ReportRow]] = defaultdict(list)
    for row in rows:
        groups[by(row)].append(row)
    return {name: Totals.of(members) for name, members in groups.items()}


def _models(rows: list[ReportRow], sort: pages.Sort) -> list[ModelLine]:
    lines = [ModelLine(model, totals) for model, totals in _group(rows, lambda r: r.model).items()]
    return pages.sort_rows(lines, sort, MODEL_COLUMNS)


# The month's figures


@bp.get("/")
def overview() -> str:
    month = _month()
    rows = reports.monthly_usage(month)
    per_key = _group(rows, lambda r: r.key_id)
    last_used = reports.last_used()
    now = utcnow()
    lines = [
        KeyLine(
            row.id,
            row.name,
            row.prefix,
            row.tier,
            keys.key_status(row, now),
            last_used.get(row.id),
            per_key.get(row.id, Totals()),
        )
        for row in keys.list_keys()
    ]
    key_sort = pages.parse_sort("keys", KEY_COLUMNS, "-cost")
    model_sort = pages.parse_sort("models", MODEL_COLUMNS, "-cost")
    return render_template(
        "dashboard/overview.html",
        months=_months(month),
        totals=Totals.of(rows),
        charts=pages.daily_charts(month, reports.daily_totals(month)),
        models=_models(rows, model_sort),
        model_sort=model_sort,
        keys=pages.sort_rows(lines, key_sort, KEY_COLUMNS),
        key_sort=key_sort,
    )


# One key


def _key(key_id: int) -> ApiKey:
    try:
        return keys.find_key(str(key_id))
    except keys.UnknownKey:
        abort(404, f"There is no key with id {key_id}.")


def _standing(row: ApiKey) -> dict[str, Any] | None:
    """The key's limits and quota now, as its holder reads them from `GET /v1/usage`;
    None when its tier is no longer configured."""
    tier = gateway.current().config.tiers.get(row.tier)
    return None if tier is None else standing.standing(KeyInfo.from_row(row), tier)


def _tier_concurrency(row: ApiKey) -> str:
    """What the key's tier allows in flight, in words."""
    tier = gateway.current().config.tiers.get(row.tier)
    if tier is None:
        return "no tier"
    return f"{tier.max_concurrent} at once" if tier.max_concurrent else "unbounded"


@bp.get("/keys/<int:key_id>")
def key_page(key_id: int) -> str:
    row = _key(key_id)
    month = _month()
    rows = reports.monthly_usage(month, row.id)
    model_sort = pages.parse_sort("models", MODEL_COLUMNS, "-cost")
    return render_template(
        "dashboard/key.html",
        key=row,
        status=keys.key_status(row, utcnow()),
        last_used=reports.last_used(row.id).get(row.id),
        allowed_models=keys.split_models(row.allowed_models),
        standing=_standing(row),
        tiers=list(gateway.current().config.tiers),
        tier_concurrency=_tier_concurrency(row),
        months=_months(month),
        totals=Totals.of(rows),
        charts=pages.daily_charts(month, reports.daily_totals(month, row.id)),
        models=_models(rows, model_sort),
        model_sort=model_sort,
    )


@bp.post("/keys/<int:key_id>/revoke")
def revoke(key_id: int) -> BaseResponse:
    row = keys.revoke_key(_key(key_id))
    admin.note_change(row, "revoked", [])
    flash(f"Key {row.prefix}… is revoked: the API refuses it from now on.")
    return redirect(url_for(".key_page", key_id=row.id), 303)


@bp.post("/keys/<int:key_id>/tier")
def change_tier(key_id: int) -> BaseResponse:
    row = _key(key_id)
    changes = admin.parse_settings({"tier": request.form.get("tier", "")})
    row = keys.update_key(row, **changes)
    admin.note_change(row, "updated", sorted(changes))
    flash(f"Key {row.prefix}… is now on the {row.tier} tier.")
    return redirect(url_for(".key_page", key_id=row.id), 303)


@bp.post("/keys/<int:key_id>/concurrency")
def change_concurrency(key_id: int) -> BaseResponse:
    """The key's own bound on requests in flight; empty: back to the tier's."""
    row = _key(key_id)
    text = request.form.get("max_concurrent", "").strip()
    value: object = int(text) if text.isascii() and text.isdigit() and len(text) < 12 else text
    changes = admin.parse_settings({"max_concurrent": value if text else None})
    row = keys.update_key(row, **changes)
    admin.note_change(row, "updated", sorted(changes))
    bound = f"at most {row.max_concurrent} at once" if row.max_concurrent else "the tier's bound"
    flash(f"Requests in flight for key {row.prefix}…: {bound}.")
    return redirect(url_for(".key_page", key_id=row.id), 303)


@bp.get("/usage.csv")
def usage_csv() -> Response:
    """The month's report as the CLI and the admin API write it, for all keys or one."""
    month = _month()
    by = request.args.get("by", "model")
    if by not in reports.GROUPINGS:
        abort(400, f"by must be one of {', '.join(reports.GROUPINGS)}")
    key_id = None
    if "key" in request.args:
        ref = request.args["key"]
        if not (ref.isascii() and ref.isdigit()):
            abort(400, "key must be a key id")
        key_id = _key(int(ref)).id
    rows = reports.monthly_usage(month, key_id, by)
    filename = reports.csv_filename(month, key_id, by)
    return Response(
        reports.to_csv(rows, by),
        mimetype="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )
