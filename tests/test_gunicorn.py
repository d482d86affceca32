"""The gateway under `gunicorn -c gunicorn.conf.py app:app`, as the Procfile runs it.

PORT and WEB_CONCURRENCY, graceful shutdown of streams, metrics summed over worker
processes, and JSON log lines that never carry a key.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
import requests
from openai import OpenAI

from keymeai.ledger import keys
from tests.helpers import clients
from tests.helpers.cli import cli_env
from tests.helpers.config import ROOT, UPSTREAM_KEY
from tests.helpers.ledger import wait_for_records
from tests.helpers.metrics import scrape, value
from tests.helpers.servers import Gunicorn, free_port

Start = Callable[..., Gunicorn]


def sdk(server: Gunicorn, key: str, fresh_connections: bool = False) -> OpenAI:
    """The openai SDK on the server; optionally a new connection (any worker) per call."""
    options: dict[str, Any] = {}
    if fresh_connections:
        options["http_client"] = httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))
    return clients.sdk(server.url, key, **options)


def worker_pids(server: Gunicorn, count: int, timeout: float = 20) -> list[int]:
    """The pids of the first `count` workers, once they have all booted."""
    deadline = time.monotonic() + timeout
    while True:
        pids = [int(p) for p in re.findall(r"Booting worker with pid: (\d+)", server.log())]
        if len(pids) >= count or time.monotonic() > deadline:
            return pids
        time.sleep(0.1)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.redis
def test_port_and_web_concurrency_are_honoured(
    start_gunicorn: Start, config_data: dict[str, Any], redis_url: str
) -> None:
    config_data["ratelimit"]["storage_uri"] = redis_url
    server = start_gunicorn(env={"WEB_CONCURRENCY": "3"})
    assert len(worker_pids(server, 3)) == 3
    log = server.log()
    assert f"Listening at: http://0.0.0.0:{server.port}" in log
    assert "Using worker: gevent" in log
    assert "Control socket" not in log
    assert requests.get(f"{server.url}/healthz", timeout=5).status_code == 200


def refused_start(
    config: dict[str, Any], tmp_path: Path, **env: str
) -> subprocess.CompletedProcess[str]:
    """Start gunicorn expecting a refusal: it exits non-zero and leaves no metrics dir."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "app:app"],
        cwd=ROOT,
        env=cli_env(config, tmp_path, PORT="0", TMPDIR=str(temp), **env),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert list(temp.iterdir()) == []
    return result


def test_memory_limits_with_several_workers_are_refused(
    config_data: dict[str, Any], tmp_path: Path
) -> None:
    result = refused_start(config_data, tmp_path, WEB_CONCURRENCY="2")
    assert "memory:// but 2 workers" in result.stderr


def test_a_dyno_refuses_a_sqlite_ledger(config_data: dict[str, Any], tmp_path: Path) -> None:
    """Ephemeral disk: the ledger would vanish at the next restart."""
    config_data["database"]["url"] = f"sqlite:///{tmp_path / 'dyno.db'}"
    result = refused_start(config_data, tmp_path, DYNO="web.1")
    assert "ephemeral disk" in result.stderr and "DATABASE_URL" in result.stderr


def test_settings_resolve_as_documented(config_data: dict[str, Any], tmp_path: Path) -> None:
    env = cli_env(config_data, tmp_path, PORT="5123", WEB_CONCURRENCY="1", TMPDIR=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--print-config", "app:app"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    settings = dict(
        re.findall(r"^(\w+)\s+= (.*)$", result.stdout, flags=re.MULTILINE),
    )
    assert settings["bind"] == "['0.0.0.0:5123']"
    assert settings["workers"] == "1"
    assert settings["worker_class"] == "gevent"
    assert int(settings["worker_connections"]) >= 1000
    assert int(settings["graceful_timeout"]) < 30  # Heroku's SIGKILL comes at 30 s
    # One worker is never recycled: nobody would accept connections while it drains.
    assert settings["max_requests"] == "0"
    env.update(WEB_CONCURRENCY="2", KEYMEAI_WORKER_CLASS="gthread")
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "--print-config", "app:app"],
        cwd=ROOT,
        env={**env, "REDIS_URL": "redis://127.0.0.1:6379/0"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    settings = dict(re.findall(r"^(\w+)\s+= (.*)$", result.stdout, flags=re.MULTILINE))
    assert settings["worker_class"] == "gthread" and int(settings["threads"]) >= 64
    assert int(settings["max_requests"]) > 0 and int(settings["max_requests_jitter"]) > 0


def test_sigterm_lets_an_in_flight_stream_finish_and_record(
    start_gunicorn: Start, ledger: None
) -> None:
    server = start_gunicorn()
    key = keys.create_key("t", "standard")[1]
    stream = sdk(server, key).chat.completions.create(
        model="deepseek-chat",
        messages=[{"role": "user", "content": "x"}],
        stream=True,
        extra_body={"fake": {"words": 15, "interval": 0.2}},
    )
    chunks = [next(stream)]
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    chunks.extend(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " ".join(f"w{i}" for i in range(1, 16))
    assert time.monotonic() - stopped_at > 2  # the stream really outlived the SIGTERM
    assert server.process.wait(30) == 0
    with pytest.raises(requests.ConnectionError):  # no new requests once stopping
        requests.get(f"{server.url}/healthz", timeout=2)
    (record,) = wait_for_records(1)
    assert (record.outcome, record.estimated, record.completion_tokens) == ("ok", False, 15)


def test_a_stream_cut_by_the_shutdown_deadline_is_still_recorded(
    start_gunicorn: Start, ledger: None
) -> None:
    server = start_gunicorn(args=["--graceful-timeout", "2"])
    key = keys.create_key("t", "standard")[1]
    stream = sdk(server, key).chat.completions.create(
        model="deepseek-chat",
        messages=[{"role": "user", "content": "x"}],
        stream=True,
        extra_body={"fake": {"words": 40, "interval": 0.25}},
    )
    next(stream)
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    with pytest.raises(openai.APIError, match="restarting") as cut:
        for _ in stream:
            pass
    assert cut.value.code == "server_shutting_down"
    assert server.process.wait(30) == 0
    records = wait_for_records(1, timeout=3)
    assert len(records) == 1, server.log()[-2000:]
    assert records[0].outcome == "interrupted" and records[0].estimated
    assert records[0].completion_tokens > 0


@pytest.mark.redis
def test_metrics_are_totals_over_all_workers(
    start_gunicorn: Start, config_data: dict[str, Any], redis_url: str, ledger: None
) -> None:
    config_data["ratelimit"]["storage_uri"] = redis_url
    server = start_gunicorn(env={"WEB_CONCURRENCY": "2"})
    workers = set(worker_pids(server, 2))
    client = sdk(server, keys.create_key("t", "standard")[1], fresh_connections=True)

    def ask(_: int) -> None:
        client.chat.completions.create(
            model="qwen-plus", messages=[{"role": "user", "content": "hello there"}]
        )

    def counter_files() -> dict[int, Path]:
        """Worker pid -> its counter file in the directory gunicorn.conf.py made."""
        found = Path(tempfile.gettempdir()).glob("keymeai-metrics-*/counter_*.db")
        files = {int(path.stem.split("_")[-1]): path for path in found}
        return {pid: path for pid, path in files.items() if pid in workers}

    sent = 0
    with ThreadPoolExecutor(8) as pool:
        # Until both workers have answered some (the kernel picks who accepts).
        while sent < 400 and len(counter_files()) < 2:
            list(pool.map(ask, range(20)))
            sent += 20
    files = counter_files()
    assert set(files) == workers, "one worker answered every request"

    for _ in range(6):  # fresh connections: whichever worker answers
        samples = scrape(server.url)
        assert value(samples, "keymeai_requests_total", model="qwen-plus", status="200") == sent
        assert value(samples, "keymeai_upstream_latency_seconds_count") == sent
        assert value(samples, "keymeai_tokens_total", kind="prompt") == sent * 5

    # The in-flight gauge is a live sum: one stream shows as 1 from every worker.
    started = threading.Event()
    streamer = sdk(server, keys.create_key("s", "standard")[1])

    def stream() -> None:
        for _ in streamer.chat.completions.create(
            model="deepseek-chat",
            messages=[{"role": "user", "content": "x"}],
            stream=True,
            extra_body={"fake": {"words": 10, "interval": 0.2}},
        ):
            started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(10)
    assert [value(scrape(server.url), "keymeai_streams_in_flight") for _ in range(4)] == [1] * 4
    reader.join(20)
    assert value(scrape(server.url), "keymeai_streams_in_flight") == 0
    assert server.stop() == 0
    assert not next(iter(files.values())).parent.exists()  # removed at exit


def test_log_lines_are_json_with_request_context_and_no_secrets(
    start_gunicorn: Start, config_data: dict[str, Any], upstream: Any, ledger: None
) -> None:
    config_data["providers"]["ark"]["base_url"] = f"{upstream.url}/ark/401/api/v3"
    server = start_gunicorn(
        env={"LOG_LEVEL": "DEBUG"}, args=["--access-logfile", "-", "--log-level", "debug"]
    )
    row, key = keys.create_key("logged", "standard")
    client = sdk(server, key)
    response = client.chat.completions.with_raw_response.create(
        model="deepseek-chat",
        messages=[{"role": "user", "content": "one two"}],
        extra_headers={"X-Request-Id": "trace-log-1"},
    )
    usage = response.parse().usage
    assert usage is not None
    failed = requests.post(  # the upstream refuses the gateway's provider key: 503
        f"{server.url}/v1/chat/completions",
        json={"model": "doubao-pro-32k", "messages": [{"role": "user", "content": "x"}]},
        headers={"Authorization": f"Bearer {key}", "X-Request-Id": "trace-log-2"},
        timeout=10,
    )
    assert failed.status_code == 503
    wrong_key = key[:-4] + "abcd"
    assert (
        requests.get(
            f"{server.url}/v1/models", headers={"Authorization": f"Bearer {wrong_key}"}, timeout=5
        ).json()["error"]["code"]
        == "invalid_api_key"
    )
    wait_for_records(2)
    time.sleep(0.3)  # let the access log line of the last request reach the file

    log = server.log()
    lines = {entry.get("request_id"): entry for entry in json_lines(log) if "status" in entry}
    ok = lines["trace-log-1"]
    assert ok["key_id"] == row.id and ok["model"] == "deepseek-chat"
    assert ok["upstream"] == "deepseek/deepseek-chat" and ok["status"] == 200
    assert isinstance(ok["latency_ms"], int) and ok["level"] == "info"
    assert (ok["prompt_tokens"], ok["completion_tokens"]) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert lines["trace-log-2"]["status"] == 503
    assert lines["trace-log-2"]["upstream"] == "ark/doubao-pro-32k-241215"
    assert "POST /v1/chat/completions" in log  # the access log is on
    for secret in (key, wrong_key, key[11:], UPSTREAM_KEY, "Bearer"):
        assert secret not in log


def test_a_warning_logged_during_a_request_carries_its_request_id(
    start_gunicorn: Start, config_data: dict[str, Any]
) -> None:
    config_data["ratelimit"]["storage_uri"] = f"redis://127.0.0.1:{free_port()}/6"  # down
    server = start_gunicorn()
    ready = requests.get(f"{server.url}/readyz", headers={"X-Request-Id": "probe-77"}, timeout=10)
    assert ready.status_code == 503
    deadline = time.monotonic() + 5
    while not (warnings := [e for e in json_lines(server.log()) if "readiness" in e["message"]]):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    assert warnings[0]["message"].startswith("readiness: limiter storage unreachable")
    assert warnings[0]["request_id"] == "probe-77"
