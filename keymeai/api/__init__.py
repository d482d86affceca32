"""The request path: a key's request read top to bottom.

auth (`auth`) → limits (`limits`, `concurrency`, `guesses`) → validation (`bodies`,
`validation`) → route (`upstream`, `transport`) → relay (`relay`, `sse`, `stalls`) →
meter (`keymeai.ledger.metering`). The APIs our clients speak are views on one
blueprint (`serve`): chat completions and models, embeddings, Anthropic's Messages
(`messages`, `anthropic`) and OpenAI's Responses (`responses`, `responses_*`); each
translates to chat completions through its `dialect`.
"""

from __future__ import annotations

from flask import Flask, request
from flask_limiter import Limiter

from . import chat, embeddings, limits, messages, responses  # noqa: F401  (their views join `bp`)
from .serve import bp, require_key


def init_app(app: Flask, limiter: Limiter) -> None:
    """The API and its policy: every request's key, then each POST's request limit.

    The key is taken in an app hook, not the blueprint's: an app's hooks run before its
    blueprints', and Flask-Limiter counts the blueprint's limit in its own app hook, which
    must come after this one (so `limits.init_app` must come after this function).
    """
    if limiter.initialized:
        raise RuntimeError("api.init_app must run before limits.init_app: the limit needs the key")

    app.before_request(_key_first)
    limits.per_key(limiter)(bp)
    app.register_blueprint(bp)


def _key_first() -> None:
    if request.blueprint == bp.name:
        require_key()
