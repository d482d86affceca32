"""Claude Code itself, headless and offline, through the gateway under gunicorn.

Claude Code is an npm package with a native binary (~235 MB), kept out of the repository
and the venv: install it once into a cache directory (.ci/run does; 4-8 s),

    npm install --prefix ~/.cache/keymeai/claude @anthropic-ai/claude-code@2.1.197

or point CLAUDE_CODE_BIN at a `claude` binary. Without one the test is skipped, except in
CI (KEYMEAI_REQUIRE_SERVICES=1), where it fails. It runs against loopback only: HOME is a
fresh temp dir and the only server it can reach is the gateway; it takes ~3 s.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from keymeai.ledger import keys
from tests.helpers.cli import agent_cli
from tests.helpers.ledger import wait_for_records
from tests.helpers.servers import Gunicorn

# Every request Claude Code makes elsewhere (telemetry, updates, error reports) is off.
QUIET = {
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
}


def test_claude_code_answers_through_the_gateway(
    start_gunicorn: Callable[..., Gunicorn], ledger: None, tmp_path: Path
) -> None:
    binary = agent_cli("claude", "CLAUDE_CODE_BIN")
    server = start_gunicorn()
    key = keys.create_key("claude-code", "standard")[1]
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": server.url,
        "ANTHROPIC_AUTH_TOKEN": key,
        **QUIET,
    }
    done = subprocess.run(
        [binary, "-p", "hello from claude code", "--model", "deepseek-chat"],
        env=env,
        cwd=home,
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert "Echo:" in done.stdout  # the fake provider's answer, as Claude Code printed it
    records = wait_for_records(1)
    answered = [r for r in records if r.model == "deepseek-chat" and r.outcome == "ok"]
    assert answered, [(r.model, r.status, r.outcome) for r in records]
    assert all(r.prompt_tokens > 0 and r.completion_tokens > 0 for r in answered)
