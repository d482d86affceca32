"""The operator's commands, `flask --app app ...`, run the two ways the tests need.

`invoke` runs a command inside the test's own app (Flask's CliRunner), beside the gateway
that app serves: fast, and the command's effect shows at once on live requests.
`flask_cli` (one command) and `run_together` (several at once) run
`python -m flask --app app ...` in a subprocess from the repository root, as an operator
types it, on the environment `cli_env` writes for the test's config: for what only a real
process shows (its stdout, stderr and exit status, commands racing on one ledger, the app
as `app.py` loads it). Every wait is bounded: a command still running is killed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from click.testing import Result
from flask import Flask

from tests.helpers.config import PROVIDER_ENV, ROOT, write_toml
from tests.helpers.services import unavailable

# Variables of the test runner's own environment that must not leak into a command.
OVERRIDES = {
    "DATABASE_URL",
    "REDIS_URL",
    "RATELIMIT_STORAGE_URI",
    "PROMETHEUS_MULTIPROC_DIR",
    "KEYMEAI_ADMIN_TOKEN",
}
TIMEOUT = 60  # seconds a command may take before it is killed and the test fails


def invoke(app: Flask, *args: str) -> Result:
    """Run `flask ARGS` inside `app`, then drop its key cache (as the cache's few seconds
    would on a real instance)."""
    result = app.test_cli_runner().invoke(args=list(args))
    app.extensions["keymeai"].keys.clear()
    return result


def cli_env(config: dict[str, Any], directory: Path, **extra: str) -> dict[str, str]:
    """The environment of a command run on `config` (written to `directory` now)."""
    path = write_toml(config, directory / "cli-config.toml")
    inherited = {k: v for k, v in os.environ.items() if k not in OVERRIDES}
    return {**inherited, **PROVIDER_ENV, "KEYMEAI_CONFIG": str(path), **extra}


def flask_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "flask", "--app", "app", *args]


def flask_cli(
    env: dict[str, str], *args: str, timeout: float = TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run `flask --app app ARGS` from the repository root; output captured as text."""
    return subprocess.run(
        flask_command(*args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _start(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        flask_command(*args),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_together(
    env: dict[str, str], commands: list[list[str]], timeout: float = TIMEOUT
) -> list[subprocess.CompletedProcess[str]]:
    """Start the commands at once; wait for them all (one still running after `timeout`
    seconds fails the test, and none is left running); their results in order."""
    processes = [_start(env, *command) for command in commands]
    results = []
    try:
        for command, process in zip(commands, processes, strict=True):
            stdout, stderr = process.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
    finally:
        for process in processes:
            if process.poll() is None:  # one timed out
                process.kill()
                process.communicate(timeout=TIMEOUT)
    return results


def agent_cli(name: str, variable: str) -> str:
    """The path of a coding agent's CLI (Claude Code, Codex CLI) for its end-to-end test:
    `variable` from the environment, `name` on PATH, or the npm install that .ci/run keeps
    in ~/.cache/keymeai/<name>. Without one the test is skipped, except in CI
    (KEYMEAI_REQUIRE_SERVICES=1), where it fails."""
    cached = Path.home() / ".cache/keymeai" / name / "node_modules/.bin" / name
    found = (
        os.environ.get(variable) or shutil.which(name) or (str(cached) if cached.exists() else None)
    )
    if found:
        return found
    unavailable(
        f"{name} is not installed (npm install --prefix {cached.parents[2]} ..., or set {variable})"
    )
