"""The per-app state the request path needs, kept on `app.extensions`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from flask import current_app
from flask_limiter import Limiter

from .api.auth import KeyCache
from .api.upstream import Router
from .config import Config
from .ledger.journal import Journal


@dataclass
class Gateway:
    config: Config
    router: Router
    keys: KeyCache
    limiter: Limiter
    journal: Journal


def current() -> Gateway:
    return cast(Gateway, current_app.extensions["keymeai"])
