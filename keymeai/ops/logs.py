"""Logging as one JSON object per line, with the request's context fields.

Log lines carry the request id, the key id (never the key), model, upstream, status,
latency and tokens, passed as `extra=`; a log shipper can index them as they are. Any
line logged while a request is served gets that request's id, so a warning deep in
the code can be matched with the `x-request-id` a customer reports. No line carries a
provider's key or address, whatever a provider sent and whoever logs it: the handler
scrubs every line (`RedactSecrets`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
from typing import Any

import orjson
from flask import g, has_app_context

from .scrub import Scrubber

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}
_ENCODE = json.JSONEncoder(default=str).encode  # json.dumps(..., default=str) builds one a call
# orjson writes a line several times faster; datetimes and dataclasses still go to `str`,
# as they did with the standard library.
_FAST = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
_SCALARS = (int, float, type(None))  # bool is an int


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update((k, v) for k, v in vars(record).items() if k not in _STANDARD)
        if record.exc_info:
            entry["exception"] = record.exc_text or self.formatException(record.exc_info)
        return _encode(entry)


def _encode(entry: dict[str, Any]) -> str:
    try:
        return orjson.dumps(entry, default=str, option=_FAST).decode()
    except orjson.JSONEncodeError:  # a lone surrogate in provider text, a key not a string
        return _ENCODE(entry)


class RequestId(logging.Filter):
    """Stamp a line logged while a request is served with that request's id."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id") and has_app_context():
            request_id = g.get("request_id")
            if request_id:
                record.request_id = request_id
        return True


class RedactSecrets(logging.Filter):
    """Take the providers' secrets out of a line: its message, its extra fields and its
    traceback (requests' exceptions name the provider's URL).

    The backstop for every line, whatever code logs it: provider text (error codes,
    stream error events) is logged as it came. A line without secrets, nearly every
    line, costs one look for the secrets' anchors in its text joined together.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scrub = Scrubber()

    def add(self, scrubber: Scrubber) -> None:
        """Scrub `scrubber`'s secrets too (one app per process, but tests make many)."""
        self.scrub = self.scrub | scrubber

    def filter(self, record: logging.LogRecord) -> bool:
        scrub = self.scrub
        fields = vars(record)
        texts = {}  # the extra fields, as text
        for name in fields.keys() - _STANDARD:
            value = fields[name]
            if not isinstance(value, _SCALARS):
                texts[name] = value if isinstance(value, str) else str(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a bad format: scrubbed as is, reported by emit()
            message = str(record.msg)
        traces = (record.exc_text or "", record.stack_info or "")
        if not scrub.finds("\n".join([message, *traces, *texts.values()])):
            return True
        record.msg, record.args = scrub(message), None
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        for name, text in texts.items():
            if scrub.finds(text):
                setattr(record, name, scrub(text))
        return True


_TRACEBACKS = logging.Formatter()
REDACT = RedactSecrets()  # on the gateway's handler; create_app adds its providers' secrets


def configure() -> None:
    """Send the gateway's logs to stderr as JSON (LOG_LEVEL sets the level)."""
    # No line carries its caller's file and line or thread: looking them up is a stack
    # walk and more on every line (logging's own documented optimisation; the request id
    # says more). The process id stays: gunicorn's own lines show it.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    logger = logging.getLogger("keymeai")
    if any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestId())
    handler.addFilter(REDACT)
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("LOG_LEVEL", "INFO").upper())
    logger.propagate = False
