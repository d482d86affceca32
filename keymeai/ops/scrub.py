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

from ..catalogue import Provider

REDACTED = "[redacted]"
# What may stand between a host and its port: "h:8000", "h', port=8000", "h port 8000",
# "h%3A8000" (lower case: the scan is of the text in lower case).
_SEPARATOR = r"(?:\W|%[0-9a-f]{2})"
_PORT_GAP = rf"{_SEPARATOR}{{0,8}}?(?:port{_SEPARATOR}{{0,4}}?)?"


# Characters URL-encoding leaves as they are: a run of them is in every spelling of a key.
_UNRESERVED = re.compile(r"[a-z0-9_.~-]+")


def _encoded(text: str) -> set[str]:
    """Patterns for `text` as it is and URL-encoded the ways clients and servers do it."""
    forms = {text, quote(text), quote(text, safe=""), quote_plus(text), quote_plus(text, safe="")}
    return {re.escape(form.lower()) for form in forms}


def _anchor(key: str) -> str:
    """A piece of text in every spelling of `key`: its longest run that encoding keeps."""
    runs = _UNRESERVED.findall(key.lower())
    return max(runs, key=len) if runs else key.lower()


def provider_secrets(provider: Provider) -> tuple[set[str], set[str]]:
    """Regular expressions for one provider's secrets, in lower case (case is ignored),
    and anchors: lower-case text of which every match contains one."""
    patterns, anchors = _encoded(provider.base_url.rstrip("/")), set()
    if provider.api_key:
        patterns |= _encoded(provider.api_key)
        anchors.add(_anchor(provider.api_key))
    address = urlsplit(provider.base_url)
    if address.hostname:  # in every spelling of the base URL too
        host = address.hostname.lower()
        anchors.add(host)
        if address.port is not None:
            patterns.add(f"{re.escape(host)}(?:{_PORT_GAP}{address.port}(?!\\d))?")
        else:
            patterns.add(re.escape(host))
    return patterns, anchors


class Scrubber:
    """Replaces every secret it knows of with `[redacted]`.

    One case-insensitive regular expression, longest alternatives first (a URL-encoded
    key is taken out whole, not just its first characters). Text without any secret,
    nearly all text, is returned as it is once its lower-case copy is found to contain
    none of the anchors (a few substring searches: the regular expression would cost
    ten times as much).
    """

    def __init__(self, patterns: Iterable[str] = (), anchors: Iterable[str] = ()) -> None:
        self.patterns = frozenset(patterns)
        self.anchors = frozenset(anchors)
        ordered = "|".join(sorted(self.patterns, key=lambda p: (-len(p), p)))
        self._replace = re.compile(ordered, re.IGNORECASE)
        self._anchors = tuple(sorted(self.anchors))

    @classmethod
    def for_providers(cls, providers: Iterable[Provider]) -> Scrubber:
        patterns: set[str] = set()
        anchors: set[str] = set()
        for provider in providers:
            more_patterns, more_anchors = provider_secrets(provider)
            patterns |= more_patterns
            anchors |= more_anchors
        return cls(patterns, anchors)

    def __or__(self, other: Scrubber) -> Scrubber:
        return Scrubber(self.patterns | other.patterns, self.anchors | other.anchors)

    def __call__(self, text: str) -> str:
        return self._replace.sub(REDACTED, text) if self.finds(text) else text

    def finds(self, text: str) -> bool:
        """Whether `text` may hold a secret (True for text that merely has an anchor)."""
        lowered = text.lower()
        return any(anchor in lowered for anchor in self._anchors)
