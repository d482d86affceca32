"""Errors in the client's API's shape, for every status the gateway answers with.

Clients (the openai SDK first of all) read `error.message`, `error.type`, `error.param`
and `error.code`; they get that body whatever went wrong, never an HTML page or a
traceback. The Anthropic Messages routes (/v1/messages...) answer the same errors in
Anthropic's shape and statuses instead, chosen here by the request's path, so that
every raiser (auth, limits, quota, concurrency, Werkzeug) stays shape-blind. Only the
pages people open in a browser (/dashboard, /account) get their errors as HTML.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

from flask import Flask, Response, g, has_request_context, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed

log = logging.getLogger(__name__)

# How the HTML pages answer an error: (status, message, headers) -> a page.
ErrorPage = Callable[[int, str, Mapping[str, str]], Response]

# Werkzeug's own errors (routing, body size, methods) and what the client reads.
_HTTP_MESSAGES = {
    404: ("Unknown request URL. Please check the URL and method.", "unknown_url"),
    405: ("Method not allowed for this URL.", "method_not_allowed"),
    413: ("Request body too large.", "request_too_large"),
}

# Anthropic's error type per status; any other 4xx is an invalid request, 5xx an
# api_error. Where chat completions say 503 (overloaded, unavailable) Anthropic says 529.
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
}
ANTHROPIC_STATUS = {503: 529}
ANTHROPIC_PREFIX = "/v1/messages"


def anthropic_route() -> bool:
    """Whether the current request is one of the Anthropic Messages API's."""
    if not has_request_context():
        return False
    path = request.path
    return path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/")


def anthropic_error(status: int, message: str) -> tuple[int, dict[str, Any]]:
    """Anthropic's status and body for an error the gateway answers with `status`."""
    default = "api_error" if status >= 500 else "invalid_request_error"
    kind = ANTHROPIC_TYPES.get(status, default)
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return ANTHROPIC_STATUS.get(status, status), body


class ApiError(Exception):
    """An error answered to the client as `{"error": {...}}` with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> Response:
        # ASCII-escaped JSON: a message that echoes client text (even a lone surrogate)
        # always encodes.
        status, body = self.status, self.body()
        if anthropic_route():
            status, body = anthropic_error(status, self.message)
        resp = Response(json.dumps(body), status, mimetype="application/json")
        resp.headers.update(self.headers)
        return resp


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def invalid_api_key(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key")


def model_not_found(model_id: str) -> ApiError:
    return ApiError(
        404,
        f"The model `{model_id[:200]}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def server_error(message: str = "The server had an error processing your request.") -> ApiError:
    return ApiError(500, message, type="server_error")


def format_duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1s", "6m0s", "1h2m3s"."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    total = math.ceil(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def retry_after(reset_at: float, now: float) -> int:
    """Whole seconds until `reset_at` (epoch), rounded up, at least 1."""
    return max(1, math.ceil(reset_at - now))


def register_error_handlers(app: Flask, is_page: Callable[[], bool], error_page: ErrorPage) -> None:
    """Answer every error, expected or not, in OpenAI's shape; on the HTML pages
    (`is_page`: /dashboard, /account, /signup) as `error_page` renders it, with the same
    status and message."""

    def answer(error: ApiError) -> Response:
        if is_page():
            return error_page(error.status, error.message, error.headers)
        return error.response()

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError) -> Response:
        return answer(exc)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        message, code = _HTTP_MESSAGES.get(status, (exc.description or exc.name, None))
        if status >= 500:
            return answer(server_error())
        if is_page():
            message = exc.description or exc.name
        error = ApiError(status, message, code=code)
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            error.headers["Allow"] = ", ".join(exc.valid_methods)
        return answer(error)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        log.exception("unhandled error", extra={"request_id": g.get("request_id")})
        return answer(server_error())
