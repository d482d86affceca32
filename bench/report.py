"""The benchmark's table, ratios and the targets it is held to, from the raw results.

How to read it: "added" is through-X minus direct to the upstream (same workload, same
run), so it is what the hop costs; "CPU µs/req" is the server processes' CPU time per
request (user + system, from /proc), which is much less noisy than req/s on a shared
machine; "spread" is (max - min) / median of the runs' req/s.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any

from loadgen import WrkResult
from streams import StreamStats, percentile

TARGETS = ("direct", "passthrough", "gateway")


def _ms(us: float) -> str:
    return "-" if math.isnan(us) else f"{us / 1000:.2f}"


def progress(label: str, point: dict[str, WrkResult]) -> None:
    parts = [f"{t} {r.rps:.0f}/s p50 {_ms(r.p50_us)} ms" for t, r in point.items()]
    print(f"  {label}: " + "; ".join(parts), flush=True)


def progress_capacity(target: str, count: int, stats: StreamStats) -> None:
    print(
        f"  capacity {target} x{count}: held {stats.peak_open}, "
        f"p99 delay {_ms(percentile(stats.delays_us, 99))} ms, errors {stats.errors}",
        flush=True,
    )


def _nonstream_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "clients target       req/s  spread  p50 ms  p99 ms  added p50  added p99  "
        "CPU us/req  errors"
    ]
    for clients, point in results.get("nonstream", {}).items():
        direct = point["direct"]
        for target in TARGETS:
            r = point[target]
            added = (
                ("", "")
                if target == "direct"
                else (_ms(r.p50_us - direct.p50_us), _ms(r.p99_us - direct.p99_us))
            )
            lines.append(
                f"{clients:>7} {target:<11} {r.rps:>7.0f} {r.rps_spread:>6.0%} "
                f"{_ms(r.p50_us):>7} {_ms(r.p99_us):>7} {added[0]:>10} {added[1]:>10} "
                f"{r.cpu_us_per_req:>11.0f} {r.errors:>7}"
            )
    return lines


def _stream_table(results: dict[str, Any]) -> list[str]:
    per_s = results.get("streams_per_s")
    timed = results.get("timed_streams")
    if not per_s or not timed:
        return []
    base = percentile(timed["direct"].ttfc_us, 50)
    lines = [
        "target       streams/s  CPU us/stream  TTFC p50  TTFC added  chunk delay p50  "
        "p99 ms  batched reads  errors"
    ]
    for target in TARGETS:
        s: StreamStats = timed[target]
        ttfc = percentile(s.ttfc_us, 50)
        lines.append(
            f"{target:<11} {per_s[target].rps:>10.0f} {per_s[target].cpu_us_per_req:>14.0f} "
            f"{_ms(ttfc):>9} {_ms(ttfc - base) if target != 'direct' else '':>11} "
            f"{_ms(percentile(s.delays_us, 50)):>16} {_ms(percentile(s.delays_us, 99)):>7} "
            f"{s.batched_reads:>14} {s.error_count + per_s[target].errors:>7}"
        )
    return lines


def _capacity_table(results: dict[str, Any]) -> list[str]:
    held = results.get("capacity")
    if not held:
        return []
    lines = [
        "target       streams  held  TTFC p99  delay p50  delay p99  delay max  errors  "
        "upstream lag p99"
    ]
    for (target, count), (s, fake) in held.items():
        lines.append(
            f"{target:<11} {count:>8} {s.peak_open:>5} {_ms(percentile(s.ttfc_us, 99)):>9} "
            f"{_ms(percentile(s.delays_us, 50)):>10} {_ms(percentile(s.delays_us, 99)):>10} "
            f"{_ms(max(s.delays_us, default=math.nan)):>10} {s.error_count:>7} "
            f"{_ms(fake['send_lag_p99_us']):>17}"
        )
    return lines


def _ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def targets(results: dict[str, Any], workers: int) -> list[tuple[str, float, str, bool]]:
    """(what, measured, target, passed) for every target the run has figures for."""
    checks: list[tuple[str, float, str, bool]] = []
    nonstream = results.get("nonstream", {})
    if 1 in nonstream:
        p = nonstream[1]
        added50 = (p["gateway"].p50_us - p["direct"].p50_us) / 1000
        added99 = (p["gateway"].p99_us - p["direct"].p99_us) / 1000
        ceiling = (p["passthrough"].p50_us - p["direct"].p50_us) / 1000
        checks += [
            ("1 client: added latency p50 (ms)", added50, "<= 1.5", added50 <= 1.5),
            ("1 client: added latency p99 (ms)", added99, "<= 5", added99 <= 5),
            (
                "1 client: added p50 / passthrough's",
                r := _ratio(added50, ceiling),
                "<= 1.2",
                r <= 1.2,
            ),
        ]
    floor = 800 if workers == 1 else 1200
    for clients in (8, 32):
        if clients in nonstream:
            p = nonstream[clients]
            rps = p["gateway"].rps
            ratio = _ratio(rps, p["passthrough"].rps)
            checks += [
                (
                    f"{clients} clients: gateway req/s ({workers} worker(s))",
                    rps,
                    f">= {floor}",
                    rps >= floor,
                ),
                (f"{clients} clients: gateway / passthrough req/s", ratio, ">= 0.9", ratio >= 0.9),
            ]
    timed = results.get("timed_streams")
    if timed:
        ttfc = (
            percentile(timed["gateway"].ttfc_us, 50) - percentile(timed["direct"].ttfc_us, 50)
        ) / 1000
        # A loaded client can batch too (chunks wait in its socket buffer): direct's count
        # is that noise floor.
        batched = timed["gateway"].batched_reads
        floor_batched = timed["direct"].batched_reads
        checks += [
            ("stream: first chunk added p50 (ms)", ttfc, "<= 2", ttfc <= 2),
            (
                "stream: reads with batched chunks",
                batched,
                f"<= direct's {floor_batched}",
                batched <= floor_batched,
            ),
        ]
    for (target, count), (s, _) in (results.get("capacity") or {}).items():
        if target == "gateway" and count == 1000:
            p99 = percentile(s.delays_us, 99) / 1000
            checks += [
                ("1000 slow streams: p99 chunk delay of those held (ms)", p99, "< 50", p99 < 50),
                ("1000 slow streams: errors", s.error_count, "== 0", s.error_count == 0),
            ]
    rss = results.get("rss_kb", {}).get("gateway", {})
    if rss:
        peak = max(rss.values()) / 1024
        checks.append(("peak RSS per gateway worker (MB)", peak, "<= 60", peak <= 60))
    return checks


def print_report(results: dict[str, Any], workers: int) -> None:
    m = results["machine"]
    (before, after) = results["load"]
    print()
    print(
        f"Machine: {m['nproc']} cores, {m['cpu']}, {m['mem_gb']} GB; load average "
        f"{before[0]:.2f} before, {after[0]:.2f} after; run took {results['elapsed_s']:.0f} s"
    )
    print(f"gunicorn -c gunicorn.conf.py {' '.join(results.get('gunicorn', []))}")
    args = results["args"]
    sections = [
        (
            f"Non-streaming (median of {args['runs']} x {args['seconds']} s wrk runs)",
            _nonstream_table(results),
        ),
        (
            "Streaming (streams/s: 10-chunk streams, 8 clients; TTFC and delay: "
            f"{args['timed_streams']} streams of 20 chunks 10 ms apart)",
            _stream_table(results),
        ),
        (
            f"Capacity (slow streams, 1 chunk/s for {args['capacity_seconds']} s)",
            _capacity_table(results),
        ),
    ]
    for title, lines in sections:
        if lines:
            print(f"\n{title}")
            print("\n".join(lines))
    print("\nPeak RSS per worker (VmHWM, MB):")
    for name, by_pid in results["rss_kb"].items():
        print(f"  {name}: " + ", ".join(f"{kb / 1024:.1f}" for kb in by_pid.values()))
    print("\nTargets:")
    for what, value, target, passed in targets(results, workers):
        print(f"  {'PASS' if passed else 'FAIL'}  {what}: {value:.2f} (target {target})")
    if "profile" in results:
        print("\nProfile of the gateway worker (py-spy: share of samples, CPU us/req):")
        for name, share, micros in results["profile"]:
            print(f"  {share:6.1%} {micros:6.0f}  {name}")


def as_json(results: dict[str, Any]) -> dict[str, Any]:
    """The results with dataclasses turned into plain data."""

    def plain(value: Any) -> Any:
        if isinstance(value, WrkResult):
            return {"runs": [asdict(r) for r in value.runs]}
        if isinstance(value, StreamStats):
            s = asdict(value)
            s.update(
                {f"delay_p{p}_us": percentile(value.delays_us, p) for p in (50, 99)},
                ttfc_p50_us=percentile(value.ttfc_us, 50),
            )
            del s["delays_us"]
            return s
        if isinstance(value, dict):
            return {
                (k if isinstance(k, str | int) else "/".join(map(str, k))): plain(v)
                for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return plain(results)
