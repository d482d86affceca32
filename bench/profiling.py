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
    ("gunicorn/", "gunicorn: HTTP parse, socket I/O, thread pool"),
    ("werkzeug/", "Flask/Werkzeug: routing, request, response"),
    ("flask/", "Flask/Werkzeug: routing, request, response"),
    ("keymeai/ops.py", "request id (ops)"),
    ("keymeai/auth.py", "auth (key cache, header)"),
    ("keymeai/keys.py", "auth (key cache, header)"),
    ("flask_limiter/", "rate limit (Flask-Limiter, limits)"),
    ("limits/", "rate limit (Flask-Limiter, limits)"),
    ("keymeai/limits.py", "rate limit (Flask-Limiter, limits)"),
    ("keymeai/validation.py", "validation and JSON parse of the request"),
    ("keymeai/tokens.py", "token estimates"),
    ("keymeai/quota.py", "quota reservation"),
    ("keymeai/upstream.py", "upstream: routing, body serialise, response parse"),
    ("requests/", "upstream: requests/urllib3"),
    ("urllib3/", "upstream: requests/urllib3"),
    ("keymeai/relay.py", "relay to the client"),
    ("keymeai/sse.py", "relay to the client"),
    ("write_usage", "metering: ledger write (peewee, SQLite)"),
    ("_roll_up", "metering: ledger write (peewee, SQLite)"),
    ("write_batch", "metering: ledger write (peewee, SQLite)"),
    ("keymeai/journal.py", "metering: journal lines and writer"),
    ("keymeai/metering.py", "metering: record fields"),
    ("keymeai/billing.py", "metering: record fields"),
    ("keymeai/logs.py", "logging"),
    ("logging/", "logging"),
    ("prometheus_client/", "metrics (prometheus-client)"),
    ("keymeai/metrics.py", "metrics (prometheus-client)"),
]
# Helpers that count for whoever called them (json in validation is validation).
INHERITED = [
    ("json/", "JSON (stdlib) outside the gateway"),
    ("peewee.py", "ledger (peewee) outside metering"),
    ("playhouse/", "ledger (peewee) outside metering"),
    ("http/client.py", "http.client outside requests"),
    ("socket.py", "sockets outside requests"),
]
DEFAULT = "other (interpreter, threads)"


def concern(frames: list[str]) -> str:
    found = DEFAULT
    for frame in frames:
        name = next((n for needle, n in CONCERNS if needle in frame), None)
        if name is None and found == DEFAULT:
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
) -> list[tuple[str, float]]:
    """py-spy the first gateway worker while wrk drives it with 8 clients."""
    worker = gateway.workers()[0]
    folded = tmp / "profile.folded"
    command = [str(servers.VENV_BIN / "py-spy"), "record", "--pid", str(worker)]
    command += ["--duration", str(int(seconds) + 1), "--rate", "200", "--format", "raw"]
    command += ["--output", str(folded)] + (["--gil"] if gil else [])
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    url = f"http://127.0.0.1:{gateway.port}/v1/chat/completions"
    script = loadgen.lua_script(body, key, tmp)
    loadgen.run_wrk(url, script, 8, seconds, gateway.pid)
    _, err = spy.communicate(timeout=seconds + 30)
    if not folded.exists():
        raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')[-2000:]}")
    print(f"  profile: folded stacks in {folded}")
    for name, share in top_functions(folded):
        print(f"    {share:6.1%}  {name}")
    return summarize(folded)
