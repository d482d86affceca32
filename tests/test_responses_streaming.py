"""The Responses API's streams where the HTTP layer matters: a client that hangs up, an
upstream that dies mid-stream, an idle upstream kept alive, under real gunicorn or
Werkzeug; and Codex CLI end to end (tests.helpers.cli.agent_cli finds it)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from keymeai.ledger import keys
from tests.helpers.cli import agent_cli
from tests.helpers.fake_upstream import FakeUpstream
from tests.helpers.ledger import usage_records, wait_for_records
from tests.helpers.routing import ROUTED_MODEL, Routed
from tests.helpers.servers import Gunicorn

Start = Callable[..., Gunicorn]


def post_stream(url: str, key: str, body: dict[str, Any]) -> requests.Response:
    response = requests.post(
        f"{url}/v1/responses",
        json={"stream": True, **body},
        headers={"Authorization": f"Bearer {key}"},
        stream=True,
        timeout=20,
    )
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return response


def test_client_that_hangs_up_is_metered(
    start_gunicorn: Start, ledger: None, upstream: FakeUpstream
) -> None:
    server = start_gunicorn()
    key = keys.create_key("responder", "standard")[1]
    body = {"model": "qwen-max", "input": "story", "fake": {"words": 30, "interval": 0.2}}
    response = post_stream(server.url, key, body)
    deltas = 0
    for line in response.iter_lines():
        deltas += line.startswith(b"event: response.output_text.delta")
        if deltas == 2:
            break
    response.close()
    [record] = wait_for_records(1, timeout=5.0)
    assert (record.outcome, record.status, record.stream) == ("client_closed", 200, True)
    assert record.prompt_tokens > 0 and record.completion_tokens > 0
    assert len(usage_records()) == 1


def test_upstream_dying_mid_stream_ends_with_response_failed(
    route: Callable[..., Routed], upstream: FakeUpstream
) -> None:
    routed = route("ark/die")
    events = list(
        routed.client.responses.create(
            model=ROUTED_MODEL, input="x", stream=True, extra_body={"fake": {"words": 8}}
        )
    )
    assert events[0].type == "response.created"
    failed = events[-1]
    assert failed.type == "response.failed"
    assert failed.response.status == "failed"
    assert failed.response.error is not None
    assert failed.response.error.code == "upstream_stream_failed"
    [record] = wait_for_records(1)
    assert (record.outcome, record.stream) == ("upstream_failed", True)
    assert record.completion_tokens > 0


def test_idle_stream_is_kept_alive(
    start_gunicorn: Start, config_data: dict[str, Any], ledger: None, upstream: FakeUpstream
) -> None:
    config_data["gateway"]["stream_keepalive_seconds"] = 1
    server = start_gunicorn()
    key = keys.create_key("responder", "standard")[1]
    body = {"model": "qwen-max", "input": "x", "fake": {"words": 2, "interval": 2.5}}
    lines = list(post_stream(server.url, key, body).iter_lines())
    assert b": ping" in lines
    assert lines[-2].startswith(b"data: {") and b'"response.completed"' in lines[-2]
    assert wait_for_records(1)[0].outcome == "ok"


def test_codex_cli_end_to_end(
    start_gunicorn: Start, ledger: None, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """`codex exec` as a user runs it, its provider pointed at the gateway: it prints the
    fake provider's answer (an echo of the prompt) and the request is metered."""
    codex = agent_cli("codex", "CODEX_BIN")
    server = start_gunicorn()
    key = keys.create_key("codex", "standard")[1]
    home = tmp_path / "home"
    (home / ".codex").mkdir(parents=True)
    (home / ".codex" / "config.toml").write_text(
        'model = "deepseek-chat"\n'
        'model_provider = "keymeai"\n\n'
        "[model_providers.keymeai]\n"
        'name = "KeyMeAI"\n'
        f'base_url = "{server.url}/v1"\n'
        'env_key = "KEYMEAI_KEY"\n'
        'wire_api = "responses"\n'
    )
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "KEYMEAI_KEY": key}
    started = time.monotonic()
    done = subprocess.run(
        [codex, "exec", "--skip-git-repo-check", "hello gateway"],
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    print(done.stdout, done.stderr[-2000:], sep="\n")  # shown when the test fails (or with -s)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Echo:" in done.stdout, (done.stdout, done.stderr[-3000:])
    records = wait_for_records(1)
    assert records and all(r.outcome == "ok" for r in records)
    assert records[0].model == "deepseek-chat" and records[0].stream
    assert time.monotonic() - started < 120
