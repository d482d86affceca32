"""Mailing a new key for sign-up with `email_domains`: one message through SMTP_URL.

`SMTP_URL` is `smtp://user:pass@host:port` (user and password percent-encoded, both
optional; port 587 by default). The connection upgrades to TLS with STARTTLS whenever the
server offers it, and logs in only over TLS, so a password never crosses in clear.
"""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from urllib.parse import unquote, urlsplit

TIMEOUT_SECONDS = 15
DEFAULT_PORT = 587


class MailError(RuntimeError):
    """The message could not be handed to the SMTP server."""


def send_key(smtp_url: str, to: str, name: str, key: str, account_url: str) -> None:
    """Mail `key` to `to`; MailError if the server does not take the message."""
    url = urlsplit(smtp_url)
    sender = f"keymeai@{url.hostname or 'localhost'}"
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = "Your KeyMeAI API key"
    message.set_content(
        f"Hello {name},\n\n"
        f"here is your API key. Keep it secret; it is not stored anywhere you can see it "
        f"again.\n\n{key}\n\nYour usage: {account_url}\n"
    )
    try:
        with smtplib.SMTP(
            url.hostname or "localhost", url.port or DEFAULT_PORT, timeout=TIMEOUT_SECONDS
        ) as smtp:
            smtp.ehlo()
            secure = smtp.has_extn("starttls")
            if secure:
                smtp.starttls(context=ssl.create_default_context())
                smtp.ehlo()
            if url.username and secure:
                smtp.login(unquote(url.username), unquote(url.password or ""))
            elif url.username:
                raise MailError("the SMTP server offers no STARTTLS; not sending the password")
            smtp.send_message(message, from_addr=sender, to_addrs=[to])
    except (OSError, smtplib.SMTPException) as exc:
        raise MailError(type(exc).__name__) from None
