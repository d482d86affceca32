"""Self-service sign-up at /signup: a person gets a key without the operator.

`[signup] mode` decides: "off" (404), "invite" (a name and an invite code, keymeai.operator.invites)
or "open" (a name; `per_address` keys per client address and `per_day` in all, counted
by the app's limiter, and a honeypot field people never see). With `email_domains` the
form asks for an address in those domains and the key goes there by e-mail
(keymeai.operator.mail) instead of onto the page.

Like the other pages: server-rendered, no script, `Cache-Control: no-store`, HTML errors.
The form's CSRF token is a double-submit cookie (HttpOnly, SameSite=Strict, path
/signup) compared in constant time. Every post counts against ATTEMPT_LIMIT per address,
and wrong codes against WRONG_CODES, which also blocks right codes while full; every
refused code gets the same words, so nobody learns whether a code exists, ran out,
expired or was revoked.
"""

from __future__ import annotations

import hmac
import logging
import re
import secrets
import time

from flask import Blueprint, Flask, Response, abort, render_template, request, url_for
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from limits import RateLimitItem, parse

from .. import gateway
from ..config import SignupSettings
from ..errors import retry_after
from ..ledger import keys
from ..ledger.models import ApiKey
from . import invites, mail, pages

log = logging.getLogger(__name__)

bp = Blueprint("signup", __name__, url_prefix="/signup")
pages.init_blueprint(bp)

ATTEMPT_LIMIT = "5 per minute"  # per client address, every post
WRONG_CODES: RateLimitItem = parse("10 per hour")  # per client address
COOKIE = "keymeai_signup"
REFUSED_CODE = "That invite code is not valid."
# An address fit for a header: the usual characters of a local part, a plain domain.
EMAIL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@([A-Za-z0-9.-]{1,189})")
MAX_ADDRESS = 64  # the ledger's origin_address column


class Refusal(Exception):
    """A sign-up refused: the status and the words the page shows."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


def init_app(app: Flask, limiter: Limiter) -> None:
    app.register_blueprint(bp)
    pages.limit_form(app, limiter, "signup.page", ATTEMPT_LIMIT)


def _settings() -> SignupSettings:
    return gateway.current().config.signup


@bp.before_request
def guard() -> None:
    if _settings().mode == "off":
        abort(404, "Sign-up is off on this server; ask its operator for a key.")


@bp.route("", methods=["GET", "POST"])
def page() -> Response:
    token = request.cookies.get(COOKIE, "")
    if request.method == "GET" or not token:
        return _form(token or secrets.token_urlsafe(32))
    if not hmac.compare_digest(request.form.get("csrf", "").encode(), token.encode()):
        abort(403, "This form's security token is missing or out of date. Reload the page.")
    try:
        return _sign_up(token)
    except Refusal as exc:
        response = _form(token, exc.message, exc.status)
        if exc.retry_after is not None:
            response.headers["Retry-After"] = str(exc.retry_after)
        return response


def _form(token: str, error: str | None = None, status: int = 200, **shown: object) -> Response:
    """The form (or the result), with the CSRF cookie set."""
    if request.method == "POST" and not request.cookies.get(COOKIE):
        error, status = "Your browser did not send the form's cookie. Please try again.", 403
    body = render_template(
        "signup.html",
        settings=_settings(),
        csrf=token,
        error=error,
        form=request.form if error else {},
        **shown,
    )
    response = Response(body, status, mimetype="text/html")
    response.set_cookie(
        COOKIE, token, path="/signup", httponly=True, samesite="Strict", secure=request.is_secure
    )
    return response


def _sign_up(token: str) -> Response:
    settings = _settings()
    form = request.form
    client = get_remote_address()[:MAX_ADDRESS]  # a forwarded "address" can be any text
    if form.get("website", ""):  # the honeypot: hidden from people, filled in by bots
        log.warning("signup: honeypot filled", extra={"client": client})
        raise Refusal(400, "We could not process this sign-up.")
    try:
        name = keys.check_name(form.get("name", ""), "Your name")
    except ValueError as exc:
        raise Refusal(400, str(exc) + ".") from None
    email = _email(form.get("email", "").strip(), settings) if settings.email_domains else None
    if settings.mode == "invite":
        made = _redeem(form.get("code", "").strip(), name, client, email)
    else:
        _count_open(settings, client)
        made = keys.create_key(
            name, settings.tier, origin="open", origin_address=client, origin_email=email
        )
    row, plain = made
    log.info(
        "signup: key created",
        extra={"key_id": row.id, "prefix": row.prefix, "origin": row.origin, "client": client},
    )
    if email is None:
        return _form(token, key=plain, row=row)
    account = url_for("account.page", _external=True)
    try:
        mail.send_key(settings.smtp_url, email, name, plain, account)
    except mail.MailError as exc:
        log.error("signup: mail not sent: %s", exc, extra={"key_id": row.id})
        invites.give_back(row)
        gateway.current().keys.clear()
        raise Refusal(
            503, "We could not send the e-mail, so no key was made. Please retry later."
        ) from None
    return _form(token, sent_to=email, row=row)


def _email(text: str, settings: SignupSettings) -> str:
    match = EMAIL.fullmatch(text)
    if not match or match.group(1).lower() not in settings.email_domains:
        domains = ", ".join(settings.email_domains)
        raise Refusal(400, f"Enter an e-mail address at {domains}.")
    return text


def _redeem(code: str, name: str, client: str, email: str | None) -> tuple[ApiKey, str]:
    """A key from the invite code; wrong codes counted per address."""
    if not code:
        raise Refusal(400, "Enter your invite code.")
    strategy = gateway.current().limiter.limiter
    # Every attempt is counted before its code is looked at, so that guesses sent in
    # parallel cannot all pass a check made before any of them was counted; a right code
    # gives its count back.
    if not strategy.hit(WRONG_CODES, "signup-codes", client):
        wait = _wait(WRONG_CODES, "signup-codes", client)
        raise Refusal(429, f"Too many wrong codes from your address ({WRONG_CODES}).", wait)
    made = invites.redeem(code, name, client, email)
    if made is None:
        log.warning("signup: invite code refused", extra={"client": client})
        raise Refusal(400, REFUSED_CODE)
    strategy.hit(WRONG_CODES, "signup-codes", client, cost=-1)
    return made


def _count_open(settings: SignupSettings, client: str) -> None:
    """Count an open sign-up against the address's and the day's limits."""
    strategy = gateway.current().limiter.limiter
    per_address = parse(settings.per_address)
    per_day = parse(f"{settings.per_day} per day")
    if not strategy.hit(per_address, "signup-open", client):
        raise Refusal(
            429,
            f"Keys from your address are limited to {per_address}. Please try again later.",
            _wait(per_address, "signup-open", client),
        )
    if not strategy.hit(per_day, "signup-open-day"):
        raise Refusal(
            429,
            "Sign-up has reached its limit for today. Try again tomorrow.",
            _wait(per_day, "signup-open-day"),
        )


def _wait(item: RateLimitItem, *identifiers: str) -> int:
    """Seconds until a full window ends, for Retry-After."""
    stats = gateway.current().limiter.limiter.get_window_stats(item, *identifiers)
    return retry_after(stats.reset_time, time.time())
