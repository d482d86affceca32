"""What the operator is told about the setup: warnings when the server starts, and
URLs fit to print in messages and `flask --app app info`."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from ..config import Config


def setup_warnings(config: Config) -> list[str]:
    """What the server should warn about once at start: providers without an API key,
    and the models that leaves without any (they answer 503 model_not_configured)."""
    warnings = [
        f"provider {p.name} has no API key: {p.api_key_env} is not set"
        for p in config.providers.values()
        if not p.api_key
    ]
    warnings += [
        f"model {m.id} cannot be served: none of its providers has an API key"
        for m in config.models.values()
        if not any(config.providers[u.provider].api_key for u in m.upstreams)
    ]
    return warnings


def without_password(url: str) -> str:
    """A database or Redis URL fit to print: its password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname or ''}"
    return urlunsplit(parts._replace(netloc=netloc + (f":{parts.port}" if parts.port else "")))
