"""Soak: slow request bodies and streams nobody reads against one gevent worker.

Issue 11's soak, bounded and on loopback only: one gunicorn gevent worker (as the
Procfile runs it) in front of bench/fastfake.py; 500 connections that trickle a request
body one byte every half second, and 200 streams of 5,000 chunks whose clients (4 KiB receive
buffers) read nothing, while probes ask for /healthz and an ordinary chat completion
twice a second each. It reports the probes' latency, the worker's RSS before, at its
peak and after, what the slow bodies got, and the ledger's record of every stream.
Stops by itself once every stream has its record (at most --limit seconds).

    .venv/bin/python bench/soak.py                      # about a minute
    .venv/bin/python bench/soak.py --bodies 50 --streams 20 --body-timeout 3 --write-timeout 4
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import socket
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import tomllib
from pathlib import Path

import tomli_w
from loadgen import children
from servers import MODEL, create_key, gateway_env, start_fake, start_gunicorn, write_config

ROUTES = ("/v1/chat/completions", "/account", "/dashboard/signin")
CHAT = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode()


def vm_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: soak", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Probes(threading.Thread):
    """/healthz and a chat completion, each on a fresh connection, every `every` s."""

    def __init__(self, port: int, key: str, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.port, self.key, self.every = port, key, every
        self.latencies: dict[str, list[float]] = {"healthz": [], "chat": []}
        self.timeline: dict[str, list[tuple[float, float]]] = {"healthz": [], "chat": []}
        self.failures: dict[str, int] = {"healthz": 0, "chat": 0}
        self.stopping = threading.Event()

    def one(self, name: str, method: str, path: str, body: bytes | None) -> None:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self.key}"}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        started = time.monotonic()
        try:
            conn.request(method, path, body, headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(response.status)
            took = time.monotonic() - started
            self.latencies[name].append(took)
            self.timeline[name].append((took, started))
        except (OSError, RuntimeError, http.client.HTTPException):
            self.failures[name] += 1
        finally:
            conn.close()

    def run(self) -> None:
        while not self.stopping.wait(self.every):
            self.one("healthz", "GET", "/healthz", None)
            self.one("chat", "POST", "/v1/chat/completions", CHAT)


def open_slow_bodies(port: int, key: str, count: int) -> list[socket.socket]:
    socks = []
    for i in range(count):
        sock = connect(port)
        headers = {"Authorization": f"Bearer {key}", "Content-Length": "100000"}
        sock.sendall(head("POST", ROUTES[i % len(ROUTES)], headers) + b"{")
        sock.setblocking(False)
        socks.append(sock)
    return socks


def trickle(socks: list[socket.socket], answers: dict[int, float], started: float) -> None:
    """One byte to each slow body still open; note when each got its answer."""
    for i, sock in enumerate(socks):
        if i in answers:
            continue
        try:
            data = sock.recv(4096)
            answers[i] = time.monotonic() - started if data.startswith(b"HTTP/1.1 408") else -1
            continue
        except BlockingIOError:
            pass
        except OSError:
            answers[i] = -1
            continue
        with contextlib.suppress(OSError):
            sock.send(b" ")


def open_streams(port: int, key: str, count: int, chunks: int) -> list[socket.socket]:
    socks = []
    for i in range(count):
        body = json.dumps(
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "a long one"}],
                "stream": True,
                "bench_chunks": chunks,
            }
        ).encode()
        headers = {
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
            "X-Request-Id": f"soak-{i}",
        }
        sock = connect(port, rcvbuf=4096)
        sock.sendall(head("POST", "/v1/chat/completions", headers) + body)
        socks.append(sock)
    return socks


def stream_records(ledger: Path) -> list[tuple[str, str, int]]:
    with sqlite3.connect(ledger, timeout=5) as db:
        rows = db.execute(
            "SELECT request_id, outcome, estimated FROM usage_record WHERE request_id LIKE 'soak-%'"
        ).fetchall()
    return [(r[0], r[1], int(r[2])) for r in rows]


def summary(values: list[float], unit: str = "ms") -> str:
    """Count, median, 95th percentile and maximum of durations in seconds."""
    if not values:
        return "none"
    scaled = sorted(v * 1000 if unit == "ms" else v for v in values)
    p95 = scaled[min(len(scaled) - 1, int(len(scaled) * 0.95))]
    median = statistics.median(scaled)
    return f"n={len(scaled)} p50={median:.1f} p95={p95:.1f} max={scaled[-1]:.1f} {unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bodies", type=int, default=500)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--chunks", type=int, default=5_000)
    parser.add_argument("--body-timeout", type=float, default=10.0)
    parser.add_argument("--write-timeout", type=float, default=15.0)
    parser.add_argument("--limit", type=float, default=120.0, help="give up after this")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="keymeai-soak-") as directory:
        tmp = Path(directory)
        fake = start_fake(tmp)
        config = write_config(tmp, fake.port, "memory://")
        data = tomllib.loads(config.read_text())
        data["gateway"] = {
            "body_timeout_seconds": args.body_timeout,
            "stream_write_timeout_seconds": args.write_timeout,
        }
        config.write_text(tomli_w.dumps(data))
        env = {**gateway_env(config, fake.port), "KEYMEAI_WORKER_CLASS": "gevent"}
        env["WEB_CONCURRENCY"] = "1"
        key = create_key(env)
        gateway = start_gunicorn("gateway", "app:app", env, [], tmp / "gateway.log")
        try:
            gateway.wait_ready(CHAT, key)
            [worker] = children(gateway.pid)
            report = soak(args, gateway.port, key, worker, tmp / "ledger.db")
        finally:
            gateway.stop()
            fake.stop()
        log = (tmp / "gateway.log").read_text(errors="replace")
        report["gateway log tracebacks"] = log.count("Traceback")
    for name, value in report.items():
        print(f"{name}: {value}")


def soak(args: argparse.Namespace, port: int, key: str, worker: int, ledger: Path) -> dict:
    probes = Probes(port, key)
    probes.start()
    time.sleep(2)
    before = vm_rss_kb(worker)
    started = time.monotonic()
    bodies = open_slow_bodies(port, key, args.bodies)
    streams = open_streams(port, key, args.streams, args.chunks)
    opened = time.monotonic() - started
    answers: dict[int, float] = {}
    peak, records = before, []
    while time.monotonic() - started < args.limit:
        trickle(bodies, answers, started)
        peak = max(peak, vm_rss_kb(worker))
        records = stream_records(ledger)
        if len(records) == args.streams and len(answers) == args.bodies:
            break
        time.sleep(0.5)
    finished = time.monotonic() - started
    time.sleep(2)
    after = vm_rss_kb(worker)
    probes.stopping.set()
    probes.join()
    for sock in bodies + streams:
        sock.close()
    timed_out = [t for t in answers.values() if t >= 0]
    outcomes: dict[str, int] = {}
    for _, outcome, _ in records:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return {
        "connections opened (s)": f"{opened:.1f}",
        "all settled after (s)": f"{finished:.1f}",
        "slow bodies answered 408": f"{len(timed_out)}/{args.bodies}",
        "  time to 408 from opening": summary(timed_out, "s"),
        "slow bodies closed otherwise": sum(1 for t in answers.values() if t < 0),
        "streams with a record": f"{len({r[0] for r in records})}/{args.streams}",
        "  outcomes": outcomes,
        "  estimated": sum(r[2] for r in records),
        "healthz latency": summary(probes.latencies["healthz"]),
        "healthz failures": probes.failures["healthz"],
        "chat latency": summary(probes.latencies["chat"]),
        "chat failures": probes.failures["chat"],
        "slowest probes (took s, at s)": {
            name: [(round(took, 2), round(at - started, 1)) for took, at in sorted(times)[-3:]]
            for name, times in probes.timeline.items()
        },
        "worker RSS before/peak/after (MB)": f"{before / 1024:.0f} / {peak / 1024:.0f} / "
        f"{after / 1024:.0f}",
    }


if __name__ == "__main__":
    sys.exit(main())
