"""wrk runs (POST bodies from a generated Lua script) and /proc readings of the servers.

wrk is the load generator: one thread per connection (`-t C -c C`), `--latency`, and a
Lua `done()` that prints the summary as one JSON line so nothing is scraped from its
human-readable output. Latencies are wrk's, in microseconds.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
LUA = """
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
wrk.headers["Content-Type"] = "application/json"
%(auth)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {\\"requests\\":%%d,\\"duration_us\\":%%d,\\"connect\\":%%d,\\"read\\":%%d," ..
    "\\"write\\":%%d,\\"status\\":%%d,\\"timeout\\":%%d,\\"p50\\":%%d,\\"p99\\":%%d," ..
    "\\"max\\":%%d}\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
"""


@dataclass
class WrkRun:
    """One wrk run: req/s, latency percentiles (µs), errors, server CPU per request."""

    rps: float
    p50_us: float
    p99_us: float
    errors: int
    cpu_us_per_req: float


@dataclass
class WrkResult:
    """The median of several runs, with their spread."""

    runs: list[WrkRun]

    def _median(self, name: str) -> float:
        return statistics.median(getattr(r, name) for r in self.runs)

    @property
    def rps(self) -> float:
        return self._median("rps")

    @property
    def p50_us(self) -> float:
        return self._median("p50_us")

    @property
    def p99_us(self) -> float:
        return self._median("p99_us")

    @property
    def cpu_us_per_req(self) -> float:
        return self._median("cpu_us_per_req")

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.runs)

    @property
    def rps_spread(self) -> float:
        """(max - min) / median of the runs' throughput, as a fraction."""
        values = [r.rps for r in self.runs]
        return (max(values) - min(values)) / self.rps if self.rps else 0.0


def lua_script(body: bytes, key: str | None, directory: Path) -> Path:
    auth = f'wrk.headers["Authorization"] = "Bearer {key}"' if key else ""
    handle, name = tempfile.mkstemp(suffix=".lua", dir=directory)
    with os.fdopen(handle, "w") as fh:
        fh.write(LUA % {"body": body.decode(), "auth": auth})
    return Path(name)


def run_wrk(url: str, script: Path, connections: int, seconds: float, pid: int) -> WrkRun:
    """One wrk run against `url`; `pid` is the server whose CPU (with workers) is counted."""
    command = [
        "wrk",
        f"-t{connections}",
        f"-c{connections}",
        f"-d{int(seconds)}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    cpu_before = cpu_ticks(pid)
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    cpu = cpu_ticks(pid) - cpu_before
    line = next(x for x in out.splitlines() if x.startswith("WRKJSON "))
    data = json.loads(line.removeprefix("WRKJSON "))
    errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
    requests = max(1, data["requests"])
    return WrkRun(
        rps=data["requests"] / (data["duration_us"] / 1e6),
        p50_us=data["p50"],
        p99_us=data["p99"],
        errors=errors,
        cpu_us_per_req=cpu / CLOCK_TICKS * 1e6 / requests,
    )


def children(pid: int) -> list[int]:
    """The direct children of `pid` (gunicorn's workers), from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry))
    return sorted(found)


def _stat(pid: int) -> list[str]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rfind(")") + 2 :].split()


def cpu_ticks(pid: int) -> int:
    """CPU ticks (user + system) used so far by a server: the process, its reaped
    children (a worker gunicorn restarted) and its live children (the workers)."""
    try:
        fields = _stat(pid)
    except OSError:
        return 0
    total = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    for child in children(pid):
        try:
            total += sum(int(f) for f in _stat(child)[11:13])
        except OSError:
            continue  # exited between the listing and the read
    return total


def peak_rss_kb(pid: int) -> int:
    """VmHWM: the process's peak resident set size so far, in kB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0
