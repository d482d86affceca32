"""How fast is the monthly usage report over a ledger of 10 million usage records?

    python -m bench.report_scale [--records 10000000] [--keys 1000] [--dir DIR]

Fills a fresh SQLite ledger with one month of usage records and their daily roll-ups,
then times `flask --app app usage report` for that month (table, CSV, per-day CSV) and
the same reports in-process, and prints the ledger's size.

The records are written with the very statements the meter runs for each request:
`metering.write_usage` is called once, its two INSERTs (the record, and the roll-up's
upsert-increment) are captured from peewee's query log, and then replayed with
`executemany` for every record, in big IMMEDIATE transactions. So the raw table really
holds every record, and the roll-ups are what the write path makes of them; at the end
both are summed and compared. Costs come from `billing.cost_units` and the price table
of config.toml.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tomli_w

from keymeai.config import load_config
from keymeai.ledger import billing, db, keys, metering, reports
from keymeai.ledger.billing import Usage, cost_units, format_cost
from keymeai.ledger.db import connection, write_transaction

ROOT = Path(__file__).resolve().parent.parent
MONTH = dt.date(2026, 3, 1)
BATCH = 250_000
PATTERNS = 4096
# Page cache while filling (the gateway keeps SQLite's default 2 MiB): the indexes of
# 10M records take random inserts all over, which a small cache turns into disk reads.
FILL_CACHE_KIB = 512 * 1024
# Share of requests per model: most traffic on the cheap chat models.
MODEL_WEIGHTS = {
    "deepseek-chat": 40,
    "qwen-plus": 25,
    "doubao-pro-32k": 15,
    "deepseek-reasoner": 12,
    "qwen-max": 8,
}


@contextmanager
def captured_sql() -> Iterator[list[tuple[str, Any]]]:
    """The (sql, params) of every statement peewee runs inside the block."""
    statements: list[tuple[str, Any]] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if isinstance(record.msg, tuple):
                statements.append(record.msg)

    logger = logging.getLogger("peewee")
    handler, level = Capture(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield statements
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def columns_of(sql: str) -> list[str]:
    """The column list of `INSERT INTO "t" ("a", "b", ...) VALUES ...`."""
    match = re.match(r'INSERT INTO "\w+" \(([^)]*)\)', sql)
    assert match, sql
    return [name.strip().strip('"') for name in match.group(1).split(",")]


def write_path_statements(key_id: int, config: Any) -> tuple[str, list[str], str, list[str]]:
    """Run the meter's write once (record number 1) and keep its two INSERTs."""
    pattern = {"model": "deepseek-chat", "prompt": 1000, "completion": 200, "cached": 0}
    pattern["cost"] = cost_units(config.models["deepseek-chat"].price, Usage(1000, 200))
    at = dt.datetime.combine(MONTH, dt.time())
    with captured_sql() as statements:
        metering.write_usage(record_fields(key_id, at, "req_0", pattern, config), None)
    record_sql, rollup_sql = [sql for sql, _ in statements if sql.startswith("INSERT")]
    assert "usage_record" in record_sql and "ON CONFLICT" in rollup_sql
    return record_sql, columns_of(record_sql), rollup_sql, columns_of(rollup_sql)


def record_fields(
    key_id: int, at: dt.datetime | str, request_id: str, p: dict[str, Any], config: Any
) -> dict[str, Any]:
    """A usage record's fields, as `Meter.finish` builds them."""
    upstream = config.models[p["model"]].upstreams[0]
    return {
        "key": key_id,
        "created_at": at,
        "request_id": request_id,
        "model": p["model"],
        "provider": upstream.provider,
        "upstream_model": upstream.model,
        "stream": True,
        "status": 200,
        "outcome": "ok",
        "attempts": 1,
        "prompt_tokens": p["prompt"],
        "completion_tokens": p["completion"],
        "total_tokens": p["prompt"] + p["completion"],
        "cached_tokens": p["cached"],
        "reasoning_tokens": 0,
        "estimated": False,
        "latency_ms": 1200,
        "cost_units": p["cost"],
    }


def usage_patterns(config: Any, rng: random.Random) -> list[dict[str, Any]]:
    """Typical requests: prompts of a few hundred to tens of thousands of tokens, a third
    of them partly cached, answers of tens to a few thousand tokens."""
    models, weights = list(MODEL_WEIGHTS), list(MODEL_WEIGHTS.values())
    patterns = []
    for _ in range(PATTERNS):
        model = rng.choices(models, weights=weights)[0]
        prompt = int(rng.lognormvariate(7, 1.2)) + 10
        cached = rng.randrange(prompt) if rng.random() < 0.33 else 0
        completion = int(rng.lognormvariate(5.5, 1)) + 1
        cost = cost_units(config.models[model].price, Usage(prompt, completion, cached))
        patterns.append(
            {"model": model, "prompt": prompt, "completion": completion, "cached": cached}
            | {"cost": cost}
        )
    return patterns


class Templates:
    """Each pattern's parameter rows for the two statements, with the per-record slots
    (key, time, request id; key and day) filled in per record: cheap in a tight loop."""

    def __init__(
        self, patterns: list[dict[str, Any]], columns: tuple[list[str], list[str]], config: Any
    ) -> None:
        record_cols, rollup_cols = columns
        self.records, self.rollups = [], []
        for p in patterns:
            fields = record_fields(0, "", "", p, config)
            self.records.append([fields["key" if c == "key_id" else c] for c in record_cols])
            daily = {**fields, "key_id": 0, "day": "", "requests": 1}
            self.rollups.append([daily[c] for c in rollup_cols])
        self.slots = [record_cols.index(c) for c in ("key_id", "created_at", "request_id")]
        self.daily_slots = [rollup_cols.index(c) for c in ("key_id", "day")]


def fill(records: int, key_count: int, config: Any) -> None:
    rng = random.Random(20260301)
    key_ids = [keys.create_key(f"customer {n}", "standard")[0].id for n in range(key_count)]
    record_sql, record_cols, rollup_sql, rollup_cols = write_path_statements(key_ids[0], config)
    patterns = usage_patterns(config, rng)
    templates = Templates(patterns, (record_cols, rollup_cols), config)
    key_slot, time_slot, id_slot = templates.slots
    daily_key_slot, day_slot = templates.daily_slots
    # Zipf-like: a few keys make most of the traffic, as with real customers.
    cumulative = _cumulative([1 / rank for rank in range(1, key_count + 1)])
    seconds = 86_400 * (billing.month_range(MONTH)[1] - MONTH).days
    start = dt.datetime.combine(MONTH, dt.time())
    done, began = 1, time.monotonic()  # the captured write was record number 1
    last_second, at = -1, ""
    while done < records:
        size = min(BATCH, records - done)
        chosen_keys = rng.choices(key_ids, cum_weights=cumulative, k=size)
        chosen = rng.choices(range(PATTERNS), k=size)
        record_rows, rollup_rows = [], []
        for n in range(size):
            index = done + n
            second = index * seconds // records  # records arrive in time order
            if second != last_second:
                last_second, at = second, str(start + dt.timedelta(seconds=second))
            row = templates.records[chosen[n]].copy()
            row[key_slot], row[time_slot], row[id_slot] = chosen_keys[n], at, f"req_{index:x}"
            daily = templates.rollups[chosen[n]].copy()
            daily[daily_key_slot], daily[day_slot] = chosen_keys[n], at[:10]
            record_rows.append(row)
            rollup_rows.append(daily)
        with connection(), write_transaction():
            db.db.execute_sql(f"PRAGMA cache_size = -{FILL_CACHE_KIB}")
            cursor = db.db.cursor()
            cursor.executemany(record_sql, record_rows)
            cursor.executemany(rollup_sql, rollup_rows)
        done += size
        rate = (done - 1) / (time.monotonic() - began)
        print(f"  {done:>11,} records  ({rate:,.0f}/s)", flush=True)


def _cumulative(weights: list[float]) -> list[float]:
    total, out = 0.0, []
    for weight in weights:
        total += weight
        out.append(total)
    return out


def check_rollups(records: int) -> float:
    """Sum the raw table the slow way and compare with the roll-ups; the time it took."""
    sums = "COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_tokens), "
    sums += "SUM(total_tokens), SUM(cost_units)"
    began = time.monotonic()
    with connection():
        raw = db.db.execute_sql(
            f"SELECT key_id, model, {sums} FROM usage_record GROUP BY key_id, model "
            "ORDER BY key_id, model"
        ).fetchall()
    elapsed = time.monotonic() - began
    rows = reports.monthly_usage(MONTH)
    rolled = [
        (r.key_id, r.model, r.requests, r.prompt_tokens, r.completion_tokens, r.cached_tokens,
         r.total_tokens, r.cost_units)
        for r in rows
    ]  # fmt: skip
    assert [tuple(row) for row in raw] == rolled, "roll-ups differ from the raw records"
    assert sum(r.requests for r in rows) == records
    return elapsed


def timed(action: Callable[[], Any], runs: int = 3) -> tuple[float, float]:
    """The first run's time (cold) and the median of `runs` more."""
    began = time.monotonic()
    action()
    first = time.monotonic() - began
    times = []
    for _ in range(runs):
        began = time.monotonic()
        action()
        times.append(time.monotonic() - began)
    return first, statistics.median(times)


def day_csv() -> str:
    return reports.to_csv(reports.monthly_usage(MONTH, by="day"), "day")


def run_cli(config_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KEYMEAI_CONFIG": str(config_path)}
    env.pop("DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", "usage", "report", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )


def size_report(path: Path) -> str:
    with connection():
        db.db.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        try:
            tables = db.db.execute_sql(
                "SELECT name, SUM(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC"
            ).fetchall()
        except Exception:  # noqa: BLE001 - dbstat is an optional SQLite build option
            tables = []
    lines = [f"ledger file: {path.stat().st_size / 2**20:,.0f} MiB"]
    lines += [f"  {name:<40} {size / 2**20:>9,.1f} MiB" for name, size in tables[:8]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=10_000_000)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--dir", type=Path, help="where to put the ledger (default: a temp dir)")
    parser.add_argument(
        "--reuse", action="store_true", help="time the reports on a ledger filled before in --dir"
    )
    args = parser.parse_args()
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="keymeai-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"ledger-{args.records}.db"
    reuse = args.reuse and path.exists()
    if not reuse:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    url = f"sqlite:///{path}"
    # The shipped config with this ledger (a config file, not DATABASE_URL: on this
    # branch's base, DATABASE_URL beside a [database] url is refused as an unknown key).
    data = tomllib.loads((ROOT / "config.toml").read_text())
    data["database"]["url"] = url
    config_path = workdir / "config.toml"
    config_path.write_text(tomli_w.dumps(data))
    config = load_config(config_path, {})
    db.open_database(url)
    db.upgrade()

    if not reuse:
        print(f"filling {path} with {args.records:,} records of {MONTH:%Y-%m} for {args.keys} keys")
        began = time.monotonic()
        fill(args.records, args.keys, config)
        print(f"filled in {time.monotonic() - began:,.0f} s")
    raw_seconds = check_rollups(args.records)
    with connection():
        daily_rows = db.db.execute_sql("SELECT COUNT(*) FROM usage_daily").fetchone()[0]
    print(f"roll-ups ({daily_rows:,} rows) equal the raw records; summing the raw table "
          f"took {raw_seconds:.1f} s")  # fmt: skip
    print(size_report(path))
    print(f"  {path.stat().st_size / args.records:.0f} bytes per record, indexes included")

    month = f"{MONTH:%Y-%m}"
    rows = reports.monthly_usage(MONTH)
    print(
        f"report: {len(rows):,} rows, total cost ${format_cost(reports.Totals.of(rows).cost_units)}"
    )
    per_day = ["--month", month, "--by", "day", "--format", "csv"]
    cases: list[tuple[str, Callable[[], Any]]] = [
        ("in-process report per key and model", lambda: reports.monthly_usage(MONTH)),
        ("in-process per-day CSV", day_csv),
        ("CLI usage report (table)", lambda: run_cli(config_path, "--month", month)),
        (
            "CLI usage report --format csv",
            lambda: run_cli(config_path, "--month", month, "--format=csv"),
        ),
        ("CLI usage report --by day --format csv", lambda: run_cli(config_path, *per_day)),
        (
            "CLI usage report, an empty month (start-up)",
            lambda: run_cli(config_path, "--month", "2001-01"),
        ),
    ]
    for name, action in cases:
        first, median = timed(action)
        print(f"{name:<45} first {first:6.2f} s   median of 3: {median:6.2f} s")


if __name__ == "__main__":
    main()
