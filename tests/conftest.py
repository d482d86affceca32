"""Fixtures: a fake provider over real HTTP, the gateway over real HTTP, keys, clients."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from keymeai import create_app
from keymeai.config import Config, parse_config
from keymeai.ledger import db, journal, keys
from keymeai.ops import logs
from tests import services
from tests.checks import SMALL_BODY_LIMIT, Api
from tests.fake_upstream import FakeUpstream
from tests.support import (
    FAST_TIMEOUTS,
    JOURNALS,
    PROVIDER_ENV,
    ROUTED_MODEL,
    Blackhole,
    Gunicorn,
    LiveServer,
    ManualClock,
    Routed,
    add_route,
    base_config,
    write_toml,
)

BACKENDS = ("sqlite", "postgres")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--database",
        choices=BACKENDS,
        default=os.environ.get("KEYMEAI_TEST_DATABASE", "sqlite"),
        help="the ledger backend of every test (default: $KEYMEAI_TEST_DATABASE or sqlite); "
        "tests marked both_databases run on both whatever this says",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run the tests marked `both_databases` once per ledger backend."""
    if "database_backend" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "both_databases"
    ):
        metafunc.parametrize(
            "database_backend",
            [pytest.param("sqlite"), pytest.param("postgres", marks=pytest.mark.postgres)],
            indirect=True,
        )


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("postgres"):
        services.require_postgres()
    if item.get_closest_marker("redis"):
        services.require_redis()


@pytest.fixture
def database_backend(request: pytest.FixtureRequest) -> str:
    """The backend: a both_databases test's parameter, else --database (sqlite/postgres)."""
    backend: str = getattr(request, "param", None) or request.config.getoption("--database")
    return backend


@pytest.fixture
def database_url(database_backend: str, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty ledger: a SQLite file in tmp_path or a new PostgreSQL database."""
    if database_backend == "postgres":
        services.require_postgres()
        with services.postgres_database() as url:
            yield url
            _close_pool()
        return
    yield f"sqlite:///{tmp_path / 'ledger.db'}"
    _close_pool()


def _close_pool() -> None:
    """Drain every journal this test opened into its ledger (a writer left running would
    apply its lines to the next test's ledger: `db` is one global proxy), then close this
    process's ledger connections so nothing holds the test's database."""
    journal.close_all()
    if db.db.obj is not None:
        db.db.obj.close_all()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A flushed Redis database (one of 1-10) held by this test alone."""
    services.require_redis()
    with services.redis_database() as url:
        yield url


@pytest.fixture(scope="session")
def fake() -> Iterator[FakeUpstream]:
    """One fake provider server (DeepSeek, DashScope and Ark shapes) for the session."""
    with FakeUpstream().start() as server:
        yield server


@pytest.fixture
def upstream(fake: FakeUpstream) -> FakeUpstream:
    """The fake provider, with its request log and switches cleared for this test."""
    fake.reset()
    return fake


@pytest.fixture
def config_data(upstream: FakeUpstream, database_url: str, tmp_path: Path) -> dict[str, Any]:
    """The gateway config as a dict; tests edit it before the gateway starts. Its usage
    journal is the test's own, and `usage_records` applies it before reading."""
    data = base_config(upstream.url, database_url)
    data["metering"] = {"journal_dir": str(tmp_path / "journal")}
    JOURNALS[:] = [tmp_path / "journal"]
    return data


def build_config(data: dict[str, Any], env: dict[str, str] | None = None) -> Config:
    return parse_config(data, {**PROVIDER_ENV, **(env or {})})


class Gateway:
    """The gateway app served by Werkzeug in this process, with helpers."""

    def __init__(self, server: LiveServer) -> None:
        self.server = server
        self.app = server.app
        self.url = server.url

    def create_key(self, tier: str = "standard", name: str = "test") -> str:
        return keys.create_key(name, tier)[1]

    def client(self, key: str, **options: Any) -> OpenAI:
        options = {"max_retries": 0, "timeout": 60, **options}  # the SDK's default wait: 600 s
        return OpenAI(base_url=f"{self.url}/v1", api_key=key, **options)


@pytest.fixture
def start_gateway(config_data: dict[str, Any]) -> Iterator[Callable[..., Gateway]]:
    """Start the gateway on the (possibly edited) config; stopped after the test."""
    servers: list[LiveServer] = []

    def start(data: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> Gateway:
        app = create_app(build_config(data or config_data, env))
        server = LiveServer(app).start()
        servers.append(server)
        return Gateway(server)

    yield start
    for server in servers:
        server.stop()
        server.app.extensions["keymeai"].router.close()
        server.app.extensions["keymeai"].journal.close()


@pytest.fixture
def gateway(start_gateway: Callable[..., Gateway]) -> Gateway:
    return start_gateway()


@pytest.fixture
def key(gateway: Gateway) -> str:
    return gateway.create_key("standard")


@pytest.fixture
def client(gateway: Gateway, key: str) -> OpenAI:
    return gateway.client(key)


@pytest.fixture
def ledger(config_data: dict[str, Any]) -> None:
    """Open the config's ledger in this process (to create keys for a gunicorn server)."""
    db.open_database(config_data["database"]["url"])
    db.upgrade()


@pytest.fixture
def start_gunicorn(
    config_data: dict[str, Any], tmp_path: Path
) -> Iterator[Callable[..., Gunicorn]]:
    """Start `gunicorn -c gunicorn.conf.py app:app` on the config; stopped after the test.
    `wait=False` returns at once: call the server's `ready()` (to boot several together)."""
    started: list[Gunicorn] = []

    def start(
        data: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        wait: bool = True,
    ) -> Gunicorn:
        n = len(started)
        path = write_toml(data or config_data, tmp_path / f"gunicorn-{n}.toml")
        server = Gunicorn(path, tmp_path / f"gunicorn-{n}.log", env, args).start(wait=wait)
        started.append(server)
        return server

    yield start
    # The test is over: all servers stopped at once. A gevent worker takes a second or two
    # to stop gracefully (it looks once a second), so it gets gunicorn's quick shutdown;
    # a gthread worker stops at once (and its quick shutdown may wait for the pool's
    # threads). Graceful stops are tested where they matter, by the tests themselves.
    for server in started:
        server.send(signal.SIGTERM if server.worker_class == "gthread" else signal.SIGQUIT)
    for server in started:
        server.wait()


@pytest.fixture
def gateway_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """The gateway's log lines (INFO and up; third-party WARNING and up, as in production).

    The `keymeai` logger does not propagate to the root, so caplog's handler is hung on it
    directly; other libraries' lines reach caplog through the root logger. It scrubs the
    providers' secrets as the gateway's own handler does.
    """
    logger = logging.getLogger("keymeai")
    logger.addHandler(caplog.handler)
    caplog.handler.addFilter(logs.REDACT)
    caplog.set_level(logging.WARNING)
    try:
        yield caplog
    finally:
        caplog.handler.removeFilter(logs.REDACT)
        logger.removeHandler(caplog.handler)


@pytest.fixture
def blackhole() -> Iterator[Blackhole]:
    """A provider address where connecting hangs (for connect_timeout tests)."""
    hole = Blackhole()
    yield hole
    hole.close()


@pytest.fixture
def route(
    config_data: dict[str, Any], upstream: FakeUpstream, start_gateway: Callable[..., Gateway]
) -> Callable[..., Routed]:
    """Start a gateway whose model `resilient` has one upstream per given fake mode.

    `route("503", "ark/ok", read_timeout=1, routing={"failure_threshold": 1})`: providers
    get short timeouts (support.FAST_TIMEOUTS) unless told otherwise. Its breakers run on a
    `ManualClock`: a cooldown ends when the test moves `routed.clock` on.
    """

    def start(*modes: str, routing: dict[str, Any] | None = None, **options: Any) -> Routed:
        providers = add_route(
            config_data, upstream.url, ROUTED_MODEL, list(modes), **{**FAST_TIMEOUTS, **options}
        )
        config_data["routing"].update(routing or {})
        gateway = start_gateway()
        clock = ManualClock()
        gateway.app.extensions["keymeai"].router.clock = clock
        key = gateway.create_key()
        return Routed(gateway.client(key, timeout=15), providers, key, clock)

    return start


@pytest.fixture
def api(
    start_gateway: Callable[..., Gateway], config_data: dict[str, Any], upstream: FakeUpstream
) -> Api:
    """A gateway with a small body limit and a standard-tier key, for raw-HTTP tests."""
    config_data["gateway"]["max_request_bytes"] = SMALL_BODY_LIMIT
    gateway = start_gateway()
    return Api(gateway, gateway.create_key("standard"), upstream)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium (Debian's) for a module of page tests."""
    from tests.browser_support import launch_browser  # it imports this module

    yield from launch_browser()


@pytest.fixture
def pages(browser: Any) -> Iterator[Any]:
    """Pages opened in `browser` for one test, each in a context of its own."""
    from tests.browser_support import Pages

    opened = Pages(browser)
    yield opened
    opened.close()
