"""Running the gateway: health and readiness checks and `/metrics` (`health`),
Prometheus counters (`metrics`), JSON logs scrubbed of secrets (`logs`, `scrub`) and
what the operator is told about the configuration (`diagnostics`).
"""
