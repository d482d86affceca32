"""Fixtures and pytest hooks: a fake provider over real HTTP, the gateway over real HTTP,
keys, clients. What tests import lives in tests/helpers."""

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
from keymeai.ledger import db, journal
from keymeai.ops import logs
from tests.helpers import services
from tests.helpers.admin import admin_gateway
from tests.helpers.browser import Pages, launch_browser
from tests.helpers.clients import SMALL_BODY_LIMIT, Api
from tests.helpers.config import base_config, build_config, write_toml
from tests.helpers.fake_upstream import FakeUpstream
from tests.helpers.ledger import JOURNALS
from tests.helpers.routing import FAST_TIMEOUTS, ROUTED_MODEL, ManualClock, Routed, add_route
from tests.helpers.servers import Blackhole, Gateway, Gunicorn, LiveServer

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


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[services.RedisServer]:
    """A Redis of the test's own, on a free port, that the test may stop, kill or freeze."""
    server = services.RedisServer(tmp_path).start()
    yield server
    server.kill()


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
def operator(start_gateway: Callable[..., Gateway]) -> Gateway:
    """A gateway with the admin token set, so the admin API and the dashboard are on."""
    return admin_gateway(start_gateway)[0]


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
    get short timeouts (routing.FAST_TIMEOUTS) unless told otherwise. Its breakers run on a
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
    yield from launch_browser()


@pytest.fixture
def pages(browser: Any) -> Iterator[Pages]:
    """Pages opened in `browser` for one test, each in a context of its own."""
    opened = Pages(browser)
    yield opened
    opened.close()
