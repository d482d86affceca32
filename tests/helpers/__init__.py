"""What the tests share, one module per concern; tests/conftest.py holds the fixtures.

- config: the gateway's config as tests build it (models on the fake, test prices).
- servers: the gateway served in this process (`LiveServer`, `Gateway`) or by gunicorn.
- services: the PostgreSQL and Redis servers (shared, or a `RedisServer` of a test's own).
- cli: the operator's `flask --app app ...` commands, in the app or as real processes.
- clients: the openai SDK and raw HTTP against a running gateway.
- ledger: what the gateway recorded (journals applied), and costs worked out apart.
- errors: the shape of the gateway's errors, and no secret in them or in its logs.
- routing: fault-mode upstreams of one model, and a clock the breaker tests move.
- admin, browser, signup, metrics: the admin API and dashboard over HTTP, pages in
  Chromium, sign-up with a mail sink, the /metrics page as Prometheus reads it.
- raw_http: sockets that send or read slowly. strategies: any JSON, for Hypothesis.
- fake_upstream (the server) and fake_replies (what it answers): the fake providers.
"""
