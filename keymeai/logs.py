"""Logging as one JSON object per line, with the request's context fields.

Log lines carry the request id, the key id (never the key), model, upstream, status,
latency and tokens, passed as `extra=`; a log shipper can index them as they are. Any
line logged while a request is served gets that request's id, so a warning deep in
the code can be matched with the `x-request-id` a customer reports.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys

from flask import g, has_app_context

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


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
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class RequestId(logging.Filter):
    """Stamp a line logged while a request is served with that request's id."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id") and has_app_context():
            request_id = g.get("request_id")
            if request_id:
                record.request_id = request_id
        return True


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
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("LOG_LEVEL", "INFO").upper())
    logger.propagate = False
