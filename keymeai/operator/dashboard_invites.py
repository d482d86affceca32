"""The dashboard's invite codes at /dashboard/invites: list, make and revoke the codes of
self-service sign-up (keymeai.operator.invites), behind the dashboard's sign-in and CSRF guard.

A new code is shown once, on the page the form's post answers (no redirect: a code must
not sit in the session cookie), never again.
"""

from __future__ import annotations

from flask import flash, redirect, render_template, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from .. import gateway
from ..ledger import keys
from ..ledger.models import utcnow
from . import invites
from .dashboard import bp


@bp.route("/invites", endpoint="invites", methods=["GET", "POST"])
def page() -> tuple[str, int]:
    created = None
    error = None
    if request.method == "POST":
        try:
            created = _create()
        except ValueError as exc:
            error = str(exc)
    now = utcnow()
    return render_template(
        "dashboard/invites.html",
        rows=[(row, invites.status(row, now)) for row in invites.list_all()],
        tiers=list(gateway.current().config.tiers),
        signup_mode=gateway.current().config.signup.mode,
        created=created,
        error=error,
    ), (400 if error else 201 if created else 200)


def _create() -> tuple[str, str]:
    """A new code from the form: (its prefix, the code); ValueError saying what is wrong."""
    form = request.form
    tier = form.get("tier", "")
    if tier not in gateway.current().config.tiers:
        raise ValueError(f"Unknown tier {tier[:64]!r}.")
    uses_text = form.get("uses", "").strip()
    if uses_text and not (uses_text.isascii() and uses_text.isdigit() and len(uses_text) < 11):
        raise ValueError("Uses must be a whole number.")
    uses = int(uses_text) if uses_text else None
    if uses is not None and not 1 <= uses <= invites.MAX_USES:
        raise ValueError(f"Uses must be from 1 to {invites.MAX_USES}.")
    expires_text = form.get("expires", "").strip()
    expires = keys.parse_expiry(expires_text, "The expiry") if expires_text else None
    note = invites.check_note(form.get("note", ""))
    row, plain = invites.create(tier, uses, expires, note)
    return row.prefix, plain


@bp.post("/invites/<int:invite_id>/revoke", endpoint="revoke_invite")
def revoke(invite_id: int) -> BaseResponse:
    try:
        row = invites.revoke(invites.find(str(invite_id)))
    except invites.UnknownInvite:
        flash(f"There is no invite with id {invite_id}.")
    else:
        flash(f"Invite {row.prefix}… is revoked: it makes no more keys.")
    return redirect(url_for(".invites"), 303)
