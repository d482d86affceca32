"""What operators and load balancers talk to: request ids, health, readiness, metrics."""

from __future__ import annotations

import logging
import os
import re

from flask import Blueprint, Flask, Response, g, jsonify, request

from .. import gateway
from ..api.auth import require_admin_token
from ..ledger.db import connection, db
from . import metrics

log = logging.getLogger(__name__)

bp = Blueprint("ops", __name__)

# A client's own request id is echoed back if it is a sane token; anything else (too
# long, control characters, header tricks) is replaced by one of ours.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def new_request_id() -> str:
    """`req_` and 32 random hex digits (a uuid4's hex, at a third of its cost)."""
    return "req_" + os.urandom(16).hex()


def init_app(app: Flask) -> None:
    @app.before_request
    def assign_request_id() -> None:
        client_id = request.headers.get("X-Request-Id", "")
        if client_id and _CLIENT_REQUEST_ID.fullmatch(client_id):
            g.request_id = client_id
        else:
            g.request_id = new_request_id()

    @app.after_request
    def echo_request_id(response: Response) -> Response:
        response.headers["x-request-id"] = g.get("request_id") or new_request_id()
        return response

    app.register_blueprint(bp)


@bp.get("/healthz")
def healthz() -> Response:
    return Response('{"status":"ok"}', mimetype="application/json")


@bp.get("/readyz")
def readyz() -> Response:
    """200 when the ledger and the limiter storage answer, 503 otherwise."""
    checks = {"ledger": _ledger_ok(), "ratelimit_storage": _limiter_ok()}
    ok = all(checks.values())
    body = {"status": "ok" if ok else "unavailable", "checks": checks}
    response = jsonify(body)
    response.status_code = 200 if ok else 503
    return response


def _ledger_ok() -> bool:
    try:
        with connection():
            db.execute_sql("SELECT 1")
        return True
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
        log.warning("readiness: ledger unreachable: %s", type(exc).__name__)
        return False


def _limiter_ok() -> bool:
    try:
        ok = bool(gateway.current().limiter.storage.check())  # False when Redis is down
        problem = "no answer"
    except Exception as exc:  # noqa: BLE001
        ok, problem = False, type(exc).__name__
    if not ok:
        log.warning("readiness: limiter storage unreachable: %s", problem)
    return ok


@bp.get("/metrics")
def metrics_page() -> Response:
    token = gateway.current().config.admin_token
    if token is not None:
        require_admin_token(token)
    body, content_type = metrics.exposition()
    return Response(body, mimetype=None, content_type=content_type)
