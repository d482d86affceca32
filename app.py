"""Entry point for `gunicorn app:app` and `flask --app app ...`."""

from keymeai import create_app
from keymeai.config import ConfigError

try:
    app = create_app()
except ConfigError as exc:
    raise SystemExit(f"keymeai: {exc}") from None
