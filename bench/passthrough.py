"""The ceiling the gateway is measured against: a bare Flask + requests passthrough.

No auth, no limits, no validation, no metering: the body goes to the upstream as it came
and the answer comes back as it went, streams relayed chunk by chunk. It runs under the
same gunicorn settings as the gateway (`gunicorn -c gunicorn.conf.py passthrough:app`),
so the difference between the two is what KeyMeAI's own work costs.
"""

from __future__ import annotations

import os

import requests
from flask import Flask, Response, request
from requests.adapters import HTTPAdapter

UPSTREAM = os.environ["BENCH_UPSTREAM_URL"]  # e.g. http://127.0.0.1:PORT/v1
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer sk-passthrough"}

session = requests.Session()
session.trust_env = False
# The same pool size as the gateway's default `max_connections` per provider.
session.mount("http://", HTTPAdapter(pool_connections=1, pool_maxsize=100))
app = Flask(__name__)


@app.post("/v1/chat/completions")
def chat_completions() -> Response:
    upstream = session.post(
        f"{UPSTREAM}/chat/completions",
        data=request.get_data(),
        headers=HEADERS,
        timeout=(5, 300),
        stream=True,
    )
    content_type = upstream.headers.get("Content-Type", "application/json")
    if content_type.startswith("text/event-stream"):
        response = Response(upstream.iter_content(chunk_size=None), content_type=content_type)
        response.call_on_close(upstream.close)
        return response
    return Response(upstream.content, upstream.status_code, content_type=content_type)
