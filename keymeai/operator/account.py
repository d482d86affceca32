"""The customer's page at /account: what `GET /v1/usage` says of a key, for a person.

The customer pastes the key into a form. It travels in a POST body, never in a URL (URLs
end up in logs and browser history), is checked exactly as the API checks a key, and is
never written back into the page; the page is `Cache-Control: no-store`. The figures
come from the very function behind `GET /v1/usage`, so the page and the API cannot
disagree. Look-ups are limited per client address, so the form is no cheaper a way to
guess keys than the API.
"""

from __future__ import annotations

from flask import Blueprint, Flask, g, render_template, request
from flask_limiter import Limiter

from .. import gateway
from ..api import serve as api
from ..api import standing
from ..api.auth import check_key
from ..errors import ApiError
from ..ledger import reports
from ..ledger.models import utcnow
from . import pages

bp = Blueprint("account", __name__, url_prefix="/account")
pages.init_blueprint(bp)

LOOKUP_LIMIT = "10 per minute"  # per client address


def init_app(app: Flask, limiter: Limiter) -> None:
    app.register_blueprint(bp)
    pages.limit_form(app, limiter, "account.page", LOOKUP_LIMIT)


@bp.route("", methods=["GET", "POST"])
def page() -> tuple[str, int]:
    if request.method == "GET":
        return render_template("account.html"), 200
    pasted = request.form.get("key", "").strip()
    if not pasted:
        return render_template("account.html", error="Paste your API key (km-...)."), 400
    try:
        api.use_key(check_key(pasted, gateway.current().keys))
    except ApiError as exc:
        return render_template("account.html", error=exc.message), exc.status
    month = utcnow().date().replace(day=1)
    days = reports.daily_totals(month, g.api_key.id)
    return render_template(
        "account.html",
        standing=standing.standing(g.api_key, g.tier),
        charts=pages.daily_charts(month, days),
        month=f"{month:%Y-%m}",
    ), 200
