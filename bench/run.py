"""KeyMeAI's benchmark: the gateway's overhead against a bare passthrough, on loopback.

    .venv/bin/python bench/run.py                       # gevent, 1 worker (~4.5 min)
    .venv/bin/python bench/run.py --worker-class gthread
    .venv/bin/python bench/run.py --workers 2           # Redis limits (redis://.../15)
    .venv/bin/python bench/run.py --sections nonstream --runs 1 --seconds 2   # quick

Starts the fast fake upstream (bench/fastfake.py), the gateway under gunicorn as the
Procfile runs it (full auth, limits, metering, with a key made by the CLI) and the bare
passthrough (bench/passthrough.py) under the same gunicorn settings, then measures the
same workload direct to the upstream, through the passthrough and through the gateway.
"Added" latency is through-X minus direct. Prints a table, ratios and its targets
(PASS/FAIL); `--json PATH` also saves the raw figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import loadgen
import report
import servers
import streams

TARGETS = ("direct", "passthrough", "gateway")
BASE = {"model": servers.MODEL, "messages": [{"role": "user", "content": "Say hello."}]}
NONSTREAM_BODY = json.dumps({**BASE, "max_tokens": 64}).encode()
SHORT_STREAM_BODY = json.dumps({**BASE, "stream": True, "bench_chunks": 10}).encode()
TIMED_STREAM_BODY = json.dumps(
    {**BASE, "stream": True, "bench_chunks": 20, "bench_interval_ms": 10}
).encode()
REDIS_URI = "redis://127.0.0.1:6379/15"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker-class", choices=["gevent", "gthread"], default="gevent")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--limits-storage",
        choices=["memory", "redis"],
        help="default: memory for 1 worker, Redis (redis://127.0.0.1:6379/15) for more",
    )
    parser.add_argument("--threads", type=int, help="gthread threads (default: gunicorn.conf)")
    parser.add_argument("--worker-connections", type=int, default=2000, help="gevent only")
    parser.add_argument("--gunicorn-arg", action="append", default=[], help="extra, repeatable")
    parser.add_argument(
        "--sections", default="nonstream,stream,capacity", help="comma list of sections"
    )
    parser.add_argument("--clients", default="1,8,32", help="wrk concurrencies")
    parser.add_argument("--runs", type=int, default=3, help="wrk runs per point (median)")
    parser.add_argument("--seconds", type=int, default=4, help="length of one wrk run")
    parser.add_argument("--timed-streams", type=int, default=20)
    parser.add_argument("--capacity", default="100,500,1000", help="concurrent slow streams")
    parser.add_argument("--capacity-seconds", type=int, default=30)
    parser.add_argument("--capacity-targets", default="gateway")
    parser.add_argument("--profile", type=float, default=0, help="py-spy the gateway N s")
    parser.add_argument("--profile-mode", choices=["gil", "active"], default="gil")
    parser.add_argument("--json", help="write the raw results here")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    return parser.parse_args()


def gunicorn_overrides(args: argparse.Namespace) -> list[str]:
    overrides = ["--workers", str(args.workers)]
    if args.worker_class == "gevent":
        overrides += ["--worker-connections", str(args.worker_connections)]
    elif args.threads:
        overrides += ["--threads", str(args.threads)]
    # No control socket: several gunicorns on one host would share its default path.
    return [*overrides, "--no-control-socket", *args.gunicorn_arg]


def raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), "?")
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {"nproc": os.cpu_count(), "cpu": cpu, "mem_gb": round(mem_kb / 1e6, 1)}


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.results: dict[str, Any] = {"machine": machine(), "args": vars(args)}
        self.rss: dict[str, dict[int, int]] = {"passthrough": {}, "gateway": {}}
        self.servers: dict[str, servers.Server] = {}
        self.key: str | None = None

    def start(self) -> None:
        fake = servers.start_fake(self.tmp)
        self.servers["direct"] = fake
        fake.wait_ready(NONSTREAM_BODY, None)
        backend = self.args.limits_storage or ("memory" if self.args.workers == 1 else "redis")
        storage = "memory://" if backend == "memory" else REDIS_URI
        if storage.startswith("redis"):
            subprocess.run(["redis-cli", "-n", "15", "FLUSHDB"], check=True, capture_output=True)
        config = servers.write_config(self.tmp, fake.port, storage)
        env = servers.gateway_env(config, fake.port)
        # gunicorn.conf.py takes the worker class from the environment (gevent patches early).
        env["KEYMEAI_WORKER_CLASS"] = self.args.worker_class
        self.key = servers.create_key(env)
        overrides = gunicorn_overrides(self.args)
        for name, app in (("passthrough", "passthrough:app"), ("gateway", "app:app")):
            log = self.tmp / f"{name}.log"
            self.servers[name] = servers.start_gunicorn(name, app, env, overrides, log)
        for name in ("passthrough", "gateway"):
            self.servers[name].wait_ready(NONSTREAM_BODY, self.key)
        self.results["gunicorn"] = overrides

    def stop(self) -> None:
        for server in reversed(self.servers.values()):  # the upstream last
            server.stop()

    def key_for(self, target: str) -> str | None:
        return self.key if target == "gateway" else None

    def sample_rss(self) -> None:
        for name, by_pid in self.rss.items():
            for pid in self.servers[name].workers():
                by_pid[pid] = max(by_pid.get(pid, 0), loadgen.peak_rss_kb(pid))

    def wrk_point(self, body: bytes, clients: int) -> dict[str, loadgen.WrkResult]:
        """All targets at one concurrency, runs interleaved so drift hits all alike."""
        scripts = {t: loadgen.lua_script(body, self.key_for(t), self.tmp) for t in TARGETS}
        runs: dict[str, list[loadgen.WrkRun]] = {t: [] for t in TARGETS}
        for _ in range(self.args.runs):
            for target in TARGETS:
                server = self.servers[target]
                url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
                run = loadgen.run_wrk(url, scripts[target], clients, self.args.seconds, server.pid)
                runs[target].append(run)
            self.sample_rss()
        return {t: loadgen.WrkResult(r) for t, r in runs.items()}

    def nonstream(self) -> None:
        for clients in [int(c) for c in self.args.clients.split(",")]:
            point = self.wrk_point(NONSTREAM_BODY, clients)
            self.results.setdefault("nonstream", {})[clients] = point
            report.progress(f"non-stream, {clients} clients", point)

    def stream(self) -> None:
        point = self.wrk_point(SHORT_STREAM_BODY, 8)
        self.results["streams_per_s"] = point
        report.progress("short streams, 8 clients", point)
        timed = {}
        for target in TARGETS:
            port = self.servers[target].port
            timed[target] = streams.timed_streams(
                port, TIMED_STREAM_BODY, self.key_for(target), self.args.timed_streams
            )
        self.results["timed_streams"] = timed
        self.sample_rss()

    def capacity(self) -> None:
        seconds = self.args.capacity_seconds
        body = json.dumps(
            {**BASE, "stream": True, "bench_chunks": seconds + 1, "bench_interval_ms": 1000}
        ).encode()
        held = {}
        for target in self.args.capacity_targets.split(","):
            for count in [int(n) for n in self.args.capacity.split(",")]:
                fake = self.servers["direct"].port
                servers.stats(fake, reset=True)
                ramp = min(5.0, count / 200)
                stats = streams.hold_streams(
                    self.servers[target].port, body, self.key_for(target), count, seconds, ramp
                )
                self.sample_rss()
                held[(target, count)] = (stats, servers.stats(fake, reset=False))
                report.progress_capacity(target, count, stats)
        self.results["capacity"] = held

    def profile(self) -> None:
        import profiling

        gateway = self.servers["gateway"]
        self.results["profile"] = profiling.profile_gateway(
            gateway,
            NONSTREAM_BODY,
            self.key,
            self.args.profile,
            self.tmp,
            gil=self.args.profile_mode == "gil",
        )


def main() -> None:
    args = parse_args()
    raise_file_limit()
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="keymeai-bench-"))
    bench = Bench(args, tmp)
    load_before = os.getloadavg()
    try:
        bench.start()
        for section in args.sections.split(","):
            getattr(bench, section.strip())()
        if args.profile:
            bench.profile()
    finally:
        bench.stop()
    bench.results["rss_kb"] = bench.rss
    bench.results["load"] = (load_before, os.getloadavg())
    bench.results["elapsed_s"] = time.monotonic() - started
    report.print_report(bench.results, args.workers)
    if args.json:
        Path(args.json).write_text(json.dumps(report.as_json(bench.results), indent=1))
    if args.keep:
        print(f"logs kept in {tmp}")
    else:
        subprocess.run(["rm", "-rf", str(tmp)], check=False)


if __name__ == "__main__":
    sys.exit(main())
