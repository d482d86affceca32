"""KeyMeAI: a self-hosted, OpenAI-compatible gateway to DeepSeek, Qwen and Doubao."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask

    from .config import Config

__all__ = ["create_app"]


def create_app(config: Config | None = None) -> Flask:
    """Build the gateway from `config` (default: config.toml and the environment).

    The app's modules are imported here, not when the package is: gunicorn's master
    reads the config (keymeai.config) before a gevent worker patches the standard
    library, and ssl, sockets and locks must be imported after that patching.
    """
    from pathlib import Path

    from flask import Flask
    from werkzeug.middleware.proxy_fix import ProxyFix

    from . import api
    from .api import concurrency, guesses, limits, standing
    from .api.auth import KeyCache
    from .api.bodies import BodyDeadline
    from .api.upstream import Router
    from .config import load_config
    from .errors import register_error_handlers
    from .gateway import Gateway
    from .ledger import db, journal, replay
    from .operator import (
        account,
        admin,
        cli,
        dashboard,
        dashboard_invites,  # noqa: F401  (its routes join the dashboard's blueprint)
        invites,
        pages,
        signup,
    )
    from .ops import health, logs

    config = config or load_config()
    logs.configure()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.gateway.max_request_bytes
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    if config.gateway.trusted_proxies:
        # Behind a TLS-terminating proxy (Heroku's router, nginx): the client's address
        # and scheme come from the X-Forwarded-* headers the trusted hops add.
        hops = config.gateway.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)  # type: ignore[method-assign]
    gw = config.gateway
    app.wsgi_app = BodyDeadline(app.wsgi_app, gw.body_timeout_seconds, gw.max_request_bytes)  # type: ignore[method-assign]

    db.open_database(config.database_url)
    db.check_reachable(config.database_url)
    db.upgrade()  # creates the tables on first start; a no-op once up to date
    journal_dir = journal.check_directory(
        Path(config.metering.journal_dir or journal.default_directory(config.database_url))
    )
    replay.recover(journal_dir)  # what a killed worker of an earlier run left

    register_error_handlers(app, pages.is_page, pages.error_page)
    health.init_app(app)
    limiter = limits.create(config)
    api.init_app(app, limiter)  # before the limiter's hooks: they need the request's key
    app.register_blueprint(standing.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(invites.bp)
    limits.init_app(app, limiter)
    guesses.init_app(app, limiter, fail_open=config.ratelimit.on_storage_error == "allow")
    concurrency.init_app(app, config, limiter)
    pages.init_app(app)
    dashboard.init_app(app, config, limiter)
    account.init_app(app, limiter)
    signup.init_app(app, limiter)
    router = Router(config)
    logs.REDACT.add(router.scrub)  # no log line carries a provider's key or address
    app.extensions["keymeai"] = Gateway(
        config=config,
        router=router,
        keys=KeyCache(config.gateway.key_cache_seconds),
        limiter=limiter,
        journal=journal.Journal(journal_dir),
    )
    cli.init_app(app)
    return app
