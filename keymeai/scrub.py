"""Taking the providers' secrets out of text: their API keys and their addresses.

Providers echo things back: a 401 may quote the key it was sent, an error may name the
host and port it runs on, a proxy in front of it may print the URL. Such text reaches
clients (an upstream's 400 is relayed) and the logs (faults are logged), so it goes
through one scrubber, built once from every provider's secrets in every form they are
likely to come back in: the key in any letter case and URL-encoded (`quote`,
`quote_plus`, upper or lower hex), the base URL (plain or URL-encoded), the host alone,
and the host with its port, however the port is written next to it ("h:443",
"host='h', port=443", "('h', 443)").
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus, urlsplit

from .config import Provider

REDACTED = "[redacted]"
# What may stand between a host and its port: "h:8000", "h', port=8000", "h port 8000",
# "h%3A8000" (lower case: the scan is of the text in lower case).
_SEPARATOR = r"(?:\W|%[0-9a-f]{2})"
_PORT_GAP = rf"{_SEPARATOR}{{0,8}}?(?:port{_SEPARATOR}{{0,4}}?)?"


def _encoded(text: str) -> set[str]:
    """Patterns for `text` as it is and URL-encoded the ways clients and servers do it."""
    forms = {text, quote(text), quote(text, safe=""), quote_plus(text), quote_plus(text, safe="")}
    return {re.escape(form.lower()) for form in forms}


def provider_patterns(provider: Provider) -> set[str]:
    """Regular expressions for one provider's secrets, in lower case (case is ignored)."""
    patterns = _encoded(provider.api_key) if provider.api_key else set()
    base_url = provider.base_url.rstrip("/")
    patterns |= _encoded(base_url)
    address = urlsplit(base_url)
    if address.hostname:
        host = re.escape(address.hostname.lower())
        if address.port is not None:
            patterns.add(f"{host}(?:{_PORT_GAP}{address.port}(?!\\d))?")
        else:
            patterns.add(host)
    return patterns


class Scrubber:
    """Replaces every secret it knows of with `[redacted]`.

    One regular expression, longest alternatives first (a base URL is taken out whole,
    not just the host inside it). Text without any secret, nearly all text, is returned
    as it is after one scan of its lower-case copy: `re.IGNORECASE` makes that scan
    about ten times slower, so it is used only to replace what the scan found.
    """

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self.patterns = frozenset(patterns)
        ordered = "|".join(sorted(self.patterns, key=lambda p: (-len(p), p)))
        self._find = re.compile(ordered) if ordered else None
        self._replace = re.compile(ordered, re.IGNORECASE)

    @classmethod
    def for_providers(cls, providers: Iterable[Provider]) -> Scrubber:
        return cls(p for provider in providers for p in provider_patterns(provider))

    def __or__(self, other: Scrubber) -> Scrubber:
        return Scrubber(self.patterns | other.patterns)

    def __call__(self, text: str) -> str:
        return self._replace.sub(REDACTED, text) if self.finds(text) else text

    def finds(self, text: str) -> bool:
        """Whether `text` holds a secret."""
        return self._find is not None and self._find.search(text.lower()) is not None
