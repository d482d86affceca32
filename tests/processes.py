"""Operator commands as subprocesses: `flask --app app ...` as an operator types it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support import PROVIDER_ENV, ROOT, write_toml

# Variables of the test runner's own environment that must not leak into a command.
OVERRIDES = {"DATABASE_URL", "REDIS_URL", "RATELIMIT_STORAGE_URI", "PROMETHEUS_MULTIPROC_DIR"}


def cli_env(config: dict[str, Any], directory: Path, **extra: str) -> dict[str, str]:
    """The environment of a command run on `config` (written to `directory`)."""
    path = write_toml(config, directory / "cli-config.toml")
    inherited = {k: v for k, v in os.environ.items() if k not in OVERRIDES}
    return {**inherited, **PROVIDER_ENV, "KEYMEAI_CONFIG": str(path), **extra}


def flask_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "flask", "--app", "app", *args]


def flask_cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run `flask --app app ARGS` from the repository root; output captured as text."""
    return subprocess.run(
        flask_command(*args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def start_flask(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        flask_command(*args),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_together(
    env: dict[str, str], commands: list[list[str]], timeout: float = 120
) -> list[subprocess.CompletedProcess[str]]:
    """Start the commands at once; wait (bounded) for them all; their results in order."""
    processes = [start_flask(env, *command) for command in commands]
    results = []
    for command, process in zip(commands, processes, strict=True):
        stdout, stderr = process.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(command, process.returncode, stdout, stderr))
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
    missing = (
        f"{name} is not installed (npm install --prefix {cached.parents[2]} ..., or set {variable})"
    )
    if os.environ.get("KEYMEAI_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{missing}; CI requires it (KEYMEAI_REQUIRE_SERVICES=1)")
    pytest.skip(missing)
