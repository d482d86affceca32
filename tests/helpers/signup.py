"""Helpers for the sign-up tests: a gateway with `[signup]` set, the form over plain
HTTP (as a bot would post it), and a local SMTP sink (aiosmtpd) that keeps what arrives."""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable, Iterator
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import requests
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.helpers.admin import ADMIN_TOKEN
from tests.helpers.servers import Gateway, free_port


def signup_gateway(
    start_gateway: Callable[..., Gateway],
    config_data: dict[str, Any],
    env: dict[str, str] | None = None,
    **signup: Any,
) -> Gateway:
    config_data["signup"] = signup
    return start_gateway(config_data, env={"KEYMEAI_ADMIN_TOKEN": ADMIN_TOKEN, **(env or {})})


def post_form(
    gateway: Gateway, fields: dict[str, str], headers: dict[str, str] | None = None
) -> requests.Response:
    """Fetch the form (its CSRF cookie and token), then post `fields` with them."""
    session = requests.Session()
    form = session.get(f"{gateway.url}/signup", headers=headers, timeout=10)
    assert form.status_code == 200, form.text
    match = re.search(r'name="csrf" value="([^"]+)"', form.text)
    assert match, form.text
    return session.post(
        f"{gateway.url}/signup",
        data={"csrf": match.group(1), **fields},
        headers=headers,
        timeout=10,
    )


def shown_key(page_html: str) -> str | None:
    match = re.search(r'value="(km-[A-Za-z0-9_-]+)"', page_html)
    return match.group(1) if match else None


class Sink:
    """An SMTP server on loopback that keeps every message it is given, with the login
    and whether the session was under TLS. Given a certificate it offers STARTTLS and
    takes a login only over TLS (`logins` keeps what it was given)."""

    def __init__(self, cert: tuple[Path, Path] | None = None) -> None:
        self.messages: list[tuple[Envelope, Message]] = []
        self.logins: list[tuple[bytes, bytes]] = []
        self.tls_sessions: list[bool] = []
        self.port = free_port()
        options: dict[str, Any] = {}
        if cert is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(*cert)
            options = {"tls_context": context, "require_starttls": True}
            options |= {"auth_require_tls": True, "authenticator": self.authenticate}
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port, **options)

    def authenticate(self, server: SMTP, session: Session, envelope: Envelope,
                     mechanism: str, data: Any) -> AuthResult:  # fmt: skip
        assert isinstance(data, LoginPassword)
        self.logins.append((data.login, data.password))
        return AuthResult(success=True)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        self.tls_sessions.append(session.ssl is not None)
        self.messages.append((envelope, message_from_bytes(envelope.content)))
        return "250 OK"

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"


def smtp_sink(cert: tuple[Path, Path] | None = None) -> Iterator[Sink]:
    """A running `Sink` (for a fixture), stopped afterwards."""
    sink = Sink(cert)
    sink.controller.start()
    try:
        yield sink
    finally:
        sink.controller.stop()
