"""Where a gateway worker's time goes under load: py-spy samples, grouped by concern.

`py-spy record --gil` samples only the thread holding the GIL, which is what a
CPU-bound gthread worker spends its core on (a thread waiting for the GIL costs
nothing); C code that releases the GIL (SQLite's step, socket calls) is then missed,
so `--profile-mode active` samples every running thread instead. Each sample is
charged to the deepest frame that matches a concern below (the SQLite write inside
metering counts as "metering: ledger write", a log call inside it as "logging").
"""

from __future__ import annotations

import subprocess
import time
from collections import Counter
from pathlib import Path

import loadgen
import servers

# (substring of a py-spy frame "function (path:line)", concern), checked on every frame;
# the deepest match wins, so requests' frames under the router count as "requests".
CONCERNS = [
    ("gunicorn/", "server: gunicorn HTTP parse, socket I/O"),
    ("werkzeug/", "Flask/Werkzeug: routing, request, response"),
    ("flask/", "Flask/Werkzeug: routing, request, response"),
    ("keymeai/ops/health.py", "other: request id, body deadline"),
    ("keymeai/api/bodies.py", "other: request id, body deadline"),
    ("keymeai/gateway.py", "other: request id, body deadline"),
    ("keymeai/api/auth.py", "auth"),
    ("keymeai/ledger/keys.py", "auth"),
    ("keymeai/api/unconfigured.py", "auth"),
    ("flask_limiter/", "limits (request limit, concurrency)"),
    ("limits/", "limits (request limit, concurrency)"),
    ("keymeai/api/limits.py", "limits (request limit, concurrency)"),
    ("keymeai/api/concurrency.py", "limits (request limit, concurrency)"),
    ("keymeai/api/validation.py", "validation (JSON parse, checks, estimate)"),
    ("keymeai/tokens.py", "validation (JSON parse, checks, estimate)"),
    ("keymeai/ledger/quota.py", "quota"),
    ("keymeai/api/upstream.py", "routing/transport (requests, urllib3)"),
    ("keymeai/api/transport.py", "routing/transport (requests, urllib3)"),
    ("requests/", "routing/transport (requests, urllib3)"),
    ("urllib3/", "routing/transport (requests, urllib3)"),
    ("keymeai/api/relay.py", "relay"),
    ("keymeai/api/sse.py", "relay"),
    ("keymeai/api/stalls.py", "relay"),
    ("write_usage", "metering: ledger write"),
    ("_roll_up", "metering: ledger write"),
    ("write_batch", "metering: ledger write"),
    ("keymeai/ledger/journal.py", "metering: journal lines and writer"),
    ("keymeai/ledger/replay.py", "metering: journal lines and writer"),
    ("keymeai/ledger/metering.py", "metering: record fields"),
    ("keymeai/ledger/billing.py", "metering: record fields"),
    ("keymeai/ops/logs.py", "logging"),
    ("keymeai/ops/scrub.py", "logging"),
    ("logging/", "logging"),
    ("prometheus_client/", "metrics"),
    ("keymeai/ops/metrics.py", "metrics"),
]
# Helpers that count for whoever called them (json in validation is validation).
INHERITED = [
    ("json/", "other: JSON outside the gateway's concerns"),
    ("orjson", "other: JSON outside the gateway's concerns"),
    ("peewee.py", "metering: ledger write"),
    ("playhouse/", "metering: ledger write"),
    ("http/client.py", "routing/transport (requests, urllib3)"),
    ("socket.py", "server: gunicorn HTTP parse, socket I/O"),
    ("gevent/", "server: gunicorn HTTP parse, socket I/O"),
]
# The chat view: what wraps it (Flask's dispatch, a decorator such as Flask-Limiter's or
# the concurrency slot) does not claim the view's own work.
VIEW = "chat_completions (keymeai/api/chat.py"
IN_VIEW = "other: the view itself"
DEFAULT = "other (interpreter, threads)"


def concern(frames: list[str]) -> str:
    found = DEFAULT
    for frame in frames:
        if VIEW in frame:
            found = IN_VIEW
            continue
        name = next((n for needle, n in CONCERNS if needle in frame), None)
        if name is None and found in (DEFAULT, IN_VIEW):
            name = next((n for needle, n in INHERITED if needle in frame), None)
        if name is not None:
            found = name
    return found


def summarize(folded: Path) -> list[tuple[str, float]]:
    """Share of samples per concern, largest first, from py-spy's raw (folded) output."""
    counts: Counter[str] = Counter()
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        counts[concern(stack.split(";"))] += int(count)
    total = sum(counts.values()) or 1
    return [(name, n / total) for name, n in counts.most_common()]


def top_functions(folded: Path, limit: int = 25) -> list[tuple[str, float]]:
    """Share of samples by leaf frame (self time)."""
    counts: Counter[str] = Counter()
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack:
            counts[stack.split(";")[-1]] += int(count)
    total = sum(counts.values()) or 1
    return [(name, n / total) for name, n in counts.most_common(limit)]


def profile_gateway(
    gateway: servers.Server, body: bytes, key: str | None, seconds: float, tmp: Path, gil: bool
) -> list[tuple[str, float, float]]:
    """py-spy the first gateway worker while wrk drives it with 8 clients: each concern's
    share of the samples, and that share of the server's CPU time per request (µs)."""
    worker = gateway.workers()[0]
    folded = tmp / "profile.folded"
    command = [str(servers.VENV_BIN / "py-spy"), "record", "--pid", str(worker)]
    command += ["--duration", str(int(seconds) + 1), "--rate", "200", "--format", "raw"]
    command += ["--output", str(folded)] + (["--gil"] if gil else [])
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    url = f"http://127.0.0.1:{gateway.port}/v1/chat/completions"
    script = loadgen.lua_script(body, key, tmp)
    run = loadgen.run_wrk(url, script, 8, seconds, gateway.pid)
    _, err = spy.communicate(timeout=seconds + 30)
    if not folded.exists():
        raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')[-2000:]}")
    print(f"  profile: folded stacks in {folded}")
    for name, share in top_functions(folded):
        print(f"    {share:6.1%}  {name}")
    print(f"  profile: {run.rps:.0f} req/s, {run.cpu_us_per_req:.0f} CPU us/req under py-spy")
    return [(name, share, share * run.cpu_us_per_req) for name, share in summarize(folded)]
