"""Models the gateway cannot serve because of its own setup: no provider has a key.

A model none of whose providers has an API key (its `api_key_env` is not set) fails
every request whatever the client does, so it is the operator's fault: the client gets
503 `model_not_configured`, without `Retry-After` (retrying changes nothing until the
operator acts), and the request costs the key nothing. It is refused in the API's
authentication hook, before Flask-Limiter counts the request limit, the quota reserves
tokens or the view reads the body for itself.

Why there and not with Flask-Limiter's `exempt_when`: an exempt request would still run
the view (validation, quota reservation, routing) only to fail at the end, and the
decision needs the body's `model` either way. The hook reads the body only in a
deployment that has such a model, and parses it only when it names one; the view then
reads the body Werkzeug cached. A correctly set-up gateway pays one set test.
"""

from __future__ import annotations

import json

from flask import g, request

from ..errors import ApiError
from .limits import MODEL_ENDPOINTS


def not_configured(model_id: str) -> ApiError:
    return ApiError(
        503,
        f"The gateway is not configured to serve the model `{model_id}`: none of its "
        "providers has credentials. Please contact the gateway's operator.",
        type="server_error",
        param="model",
        code="model_not_configured",
    )


def refuse_unconfigured_model(unconfigured: frozenset[str]) -> None:
    """Raise `not_configured` if the chat request asks for a model in `unconfigured`
    that its key may use (a model it may not use gets the view's 403)."""
    if not unconfigured or request.endpoint not in MODEL_ENDPOINTS:
        return
    raw = request.get_data()  # cached for the view
    if not any(model_id.encode() in raw for model_id in unconfigured):
        return
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return  # the view explains what is wrong with it
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, str) or model not in unconfigured:
        return
    allowed = g.api_key.allowed_models
    if allowed is None or model in allowed:
        raise not_configured(model)
