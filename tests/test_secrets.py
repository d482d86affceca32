"""No provider key and no provider address reach a client or a log line, in any spelling.

The fake provider's `leak-*` modes echo the bearer key they were sent (as sent, in upper
case, URL-encoded with upper and lower hex, `quote_plus`-encoded) and their own host,
port and URL, in a 400 (relayed to the client), a 500 (failed over, logged) and an
error event in the middle of a stream (logged). The provider runs on 127.0.0.2 with a
key that URL-encoding changes, so every spelling is distinct and none of them can
appear by chance.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
import requests

from keymeai.catalogue import Provider
from keymeai.ledger import keys
from keymeai.ops.logs import REDACT, JsonFormatter
from keymeai.ops.scrub import Scrubber
from tests.helpers.errors import log_text
from tests.helpers.fake_upstream import FakeUpstream
from tests.helpers.ledger import wait_for_records
from tests.helpers.routing import add_route
from tests.helpers.servers import Gateway, Gunicorn

SECRET = "sk-Leak/Key+42=Ab"
LEAKS = ("leak-400", "leak-500", "leak-stream")
MESSAGES = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def leaky() -> Iterator[FakeUpstream]:
    """A fake provider on an address of its own, with a key that encoding changes."""
    with FakeUpstream("127.0.0.2", api_key=SECRET).start() as server:
        yield server


def forms(fake: FakeUpstream) -> list[str]:
    """Every spelling of the provider's secrets that must not come out."""
    encoded = quote(SECRET, safe="")
    keys = {SECRET, SECRET.upper(), SECRET.lower(), quote(SECRET), quote_plus(SECRET)}
    keys |= {encoded, encoded.lower(), quote_plus(SECRET).lower()}
    host, port = "127.0.0.2", fake.url.rsplit(":", 1)[1]
    return [*keys, fake.url, quote(fake.url, safe=""), f"{host}:{port}", host, port]


def assert_clean(text: str, fake: FakeUpstream) -> None:
    """`text` holds none of the forms; the port counts as a number on its own."""
    *literal, port = forms(fake)
    for secret in literal:
        assert secret.lower() not in text.lower(), f"{secret!r} leaked"
    assert not re.search(rf"(?<!\d){port}(?!\d)", text), "the provider's port leaked"


def leak_models(config_data: dict[str, Any], fake: FakeUpstream) -> None:
    """One model per leak mode, named after it, served by the leaky provider only."""
    for mode in LEAKS:
        add_route(config_data, fake.url, mode, [mode])


def ask(url: str, key: str, model: str, stream: bool = False) -> requests.Response:
    return requests.post(
        f"{url}/v1/chat/completions",
        json={"model": model, "messages": MESSAGES, "stream": stream},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )


def ask_every_leak(url: str, key: str, fake: FakeUpstream) -> str:
    """Each leak mode once, checked as the client sees it; their responses, joined."""
    rejected = ask(url, key, "leak-400")
    assert rejected.status_code == 400
    assert rejected.json()["error"]["message"].startswith(
        "Upstream rejected the request: Key [redacted] ([redacted], [redacted]"
    )
    unavailable = ask(url, key, "leak-500")
    assert unavailable.status_code == 503
    streamed = ask(url, key, "leak-stream", stream=True)
    assert streamed.status_code == 200
    assert b"event: error" in streamed.content and b"upstream_stream_failed" in streamed.content
    assert fake.count() == 3
    return "\n".join(r.text for r in (rejected, unavailable, streamed))


def test_the_fake_echoes_every_form(leaky: FakeUpstream) -> None:
    """The checks below can fail: without the gateway, every form is in the text."""
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    headers = {"Authorization": f"Bearer {SECRET}"}
    for mode in LEAKS:
        url = f"{leaky.base_url('deepseek', mode)}/chat/completions"
        text = requests.post(url, json=body, headers=headers, timeout=5).text
        with pytest.raises(AssertionError):
            assert_clean(text, leaky)
        for secret in forms(leaky):
            assert secret.lower() in text.lower(), (mode, secret)


def test_provider_secrets_reach_neither_the_client_nor_the_logs(
    start_gateway: Callable[..., Gateway],
    config_data: dict[str, Any],
    leaky: FakeUpstream,
    gateway_logs: pytest.LogCaptureFixture,
) -> None:
    leak_models(config_data, leaky)
    gateway = start_gateway(env={"DEEPSEEK_API_KEY": SECRET})
    leaky.reset()
    responses = ask_every_leak(gateway.url, gateway.create_key(), leaky)
    wait_for_records(3)
    logs = log_text(gateway_logs)
    assert "HTTP 500 [redacted]@[redacted]" in logs  # the 500's code, as logged
    assert "failed mid-stream: upstream error mid-stream: {'message'" in logs
    assert "Key [redacted] ([redacted], [redacted]" in logs  # the stream's error event
    assert_clean(responses, leaky)
    assert_clean(logs, leaky)


def test_gunicorn_log_lines_carry_no_provider_secret(
    start_gunicorn: Callable[..., Gunicorn],
    config_data: dict[str, Any],
    leaky: FakeUpstream,
    ledger: None,
) -> None:
    """The gateway's own stderr handler scrubs, whatever logged the line."""
    leak_models(config_data, leaky)
    server = start_gunicorn(env={"DEEPSEEK_API_KEY": SECRET})
    leaky.reset()
    responses = ask_every_leak(server.url, keys.create_key("leaks", "standard")[1], leaky)
    wait_for_records(3)
    server.stop()
    log = server.log()
    assert "upstream error mid-stream" in log and "HTTP 500" in log
    assert_clean(responses, leaky)
    assert_clean(log, leaky)


def scrubber_for(base_url: str, api_key: str = SECRET) -> Scrubber:
    provider = Provider(
        name="p",
        base_url=base_url,
        api_key_env="P_KEY",
        connect_timeout=1,
        read_timeout=1,
        max_connections=1,
        api_key=api_key,
    )
    return Scrubber.for_providers([provider])


@pytest.mark.parametrize(
    ("text", "scrubbed"),
    [
        (
            "HTTPConnectionPool(host='llm.example.com', port=8443): x",
            "HTTPConnectionPool(host='[redacted]): x",
        ),
        ("('LLM.EXAMPLE.COM', 8443)", "('[redacted])"),
        ("llm.example.com port 8443, then 84430", "[redacted], then 84430"),
        ("see https://llm.example.com:8443/v1/chat", "see [redacted]/chat"),
        ("https%3a%2f%2fllm.example.com%3a8443%2fv1", "[redacted]"),
        ("llm.example.com%3A8443", "[redacted]"),
        ("8443 alone is a number", "8443 alone is a number"),
        ("key=sk-leak%2fkey%2b42%3dab&k2=sk-Leak%2FKey%2B42%3DAb", "key=[redacted]&k2=[redacted]"),
        ("sk-leak/key+42=AB and sk-Leak/Key%2B42%3DAb", "[redacted] and [redacted]"),
    ],
)
def test_the_scrubber_knows_every_spelling(text: str, scrubbed: str) -> None:
    assert scrubber_for("https://llm.example.com:8443/v1")(text) == scrubbed


def test_a_default_port_is_no_secret_and_an_empty_key_is_skipped() -> None:
    scrub = scrubber_for("https://api.example.com/v1", api_key="")
    assert scrub("API.example.com:443 refused 443 tokens") == "[redacted]:443 refused 443 tokens"
    assert scrub("nothing here") == "nothing here"


def test_the_log_filter_scrubs_message_fields_and_traceback() -> None:
    """A line no code has scrubbed: arguments, extra fields (of any type), a traceback."""
    REDACT.add(scrubber_for("http://10.1.2.3:8080/v1"))
    try:
        raise ConnectionError(f"HTTPConnectionPool(host='10.1.2.3', port=8080) {SECRET}")
    except ConnectionError:
        record = logging.getLogger("keymeai.test").makeRecord(
            "keymeai.test",
            logging.ERROR,
            __file__,
            1,
            "failed: %s",
            (SECRET.upper(),),
            exc_info=sys.exc_info(),
            extra={"detail": {"url": "http://10.1.2.3:8080/v1"}, "count": 8080},
        )
    assert REDACT.filter(record)
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "failed: [redacted]"
    assert entry["detail"] == "{'url': '[redacted]'}" and entry["count"] == 8080
    assert "ConnectionError: HTTPConnectionPool(host='[redacted]) [redacted]" in entry["exception"]
    assert "10.1.2.3" not in json.dumps(entry) and SECRET not in json.dumps(entry)
