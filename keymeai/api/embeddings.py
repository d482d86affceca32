"""POST /v1/embeddings: the request's checks and the answer's encoding.

An embedding request travels the chat completion's path (keymeai.api.serve.serve: allow-list,
token quota and spend cap, routing with failover, meter) as a request with no
completion: its hold is the prompt estimate alone. What differs is checked here.

The gateway always asks the provider for floats (DashScope's compatible mode documents
`float` only) and encodes base64 itself when the client asks for it, as the openai SDK
does by default: little-endian float32, as OpenAI sends it.
"""

from __future__ import annotations

import array
import base64
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flask import Response, request

from .. import gateway
from ..catalogue import Model
from ..errors import invalid
from ..tokens import estimate_tenths, tokens
from . import concurrency
from .dialect import ChatCompletions
from .serve import bp, read_body, serve
from .validation import ChatRequest, find_model, parse_json_body

# OpenAI's bound on the inputs of one request; providers take fewer (DashScope: 10) and
# say so themselves.
MAX_INPUTS = 2048
MAX_DIMENSIONS = 65536
ENCODINGS = ("float", "base64")


@dataclass
class EmbeddingRequest(ChatRequest):
    """A validated embedding request: no stream, no completion (`choices` 0, so the
    quota holds no completion tokens), the prompt estimate of its inputs."""

    encoding: str = "float"  # what the client asked for; the upstream is asked for floats


def parse_embedding_request(body: dict[str, Any], models: Mapping[str, Model]) -> EmbeddingRequest:
    """Check `model`, `input`, `dimensions` and `encoding_format`; the rest (`user`, a
    provider's own fields) passes through."""
    model = find_model(body, models, "embedding")
    if body.get("stream"):
        raise invalid("embeddings are not streamed; leave stream out", "stream")
    texts = _inputs(body.get("input"))
    dimensions = body.get("dimensions")
    if dimensions is not None and not (
        isinstance(dimensions, int)
        and not isinstance(dimensions, bool)
        and 0 < dimensions <= MAX_DIMENSIONS
    ):
        raise invalid(f"dimensions must be an integer from 1 to {MAX_DIMENSIONS}", "dimensions")
    encoding = body.get("encoding_format")
    if encoding is None:
        encoding = "float"
    if encoding not in ENCODINGS:
        raise invalid("encoding_format must be float or base64", "encoding_format")
    estimate = tokens(sum(estimate_tenths(text) for text in texts))
    return EmbeddingRequest(
        body=dict(body, encoding_format="float"),
        model=model,
        stream=False,
        include_usage=False,
        completion_limit=None,
        choices=0,
        prompt_estimate=estimate,
        encoding=encoding,
    )


def _inputs(value: Any) -> list[str]:
    """The texts to embed: a string or a non-empty array of strings, none empty."""
    if value is None:
        raise invalid("you must provide an input parameter", "input")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts:
        raise invalid("input must be a string or a non-empty array of strings", "input")
    if len(texts) > MAX_INPUTS:
        raise invalid(f"input must have at most {MAX_INPUTS} items", "input")
    for i, text in enumerate(texts):
        if isinstance(text, str) and text:
            continue
        param = "input" if isinstance(value, str) else f"input[{i}]"
        if isinstance(text, int | list) and not isinstance(text, bool):
            raise invalid(
                "token arrays are not supported: none of the configured providers takes "
                "them; send the text as strings",
                param,
            )
        raise invalid(f"{param} must be a non-empty string", param)
    return texts


class Embeddings(ChatCompletions):
    """OpenAI's embeddings: the provider's body as sent, or with its vectors encoded as
    base64 when the client asked for that."""

    def __init__(self, request: EmbeddingRequest) -> None:
        super().__init__(request)
        self.encoding = request.encoding

    def answer(self, completion: dict[str, Any], raw: bytes) -> bytes:
        if self.encoding != "base64":
            return raw
        data = [_base64_item(item) for item in completion["data"]]
        return json.dumps(dict(completion, data=data), ensure_ascii=False).encode()


def _base64_item(item: Any) -> Any:
    vector = item.get("embedding") if isinstance(item, dict) else None
    if not isinstance(vector, list):
        return item
    try:
        floats = array.array("f", vector)
    except (TypeError, OverflowError):
        return item  # not a vector of numbers: relayed as the provider sent it
    if sys.byteorder == "big":
        floats.byteswap()
    return dict(item, embedding=base64.b64encode(floats.tobytes()).decode("ascii"))


@bp.post("/embeddings")  # limited like chat completions: `init_app`
@concurrency.holding_slot
def embeddings() -> Response:
    gw = gateway.current()
    raw = read_body(gw.config.gateway.max_request_bytes)
    body = parse_json_body(raw, request.content_type)
    request_ = parse_embedding_request(body, gw.config.model_names)
    return serve(request_, Embeddings(request_))
