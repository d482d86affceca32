"""Reading the gateway's /metrics page the way Prometheus does."""

from __future__ import annotations

from collections import Counter

import requests
from prometheus_client.parser import text_string_to_metric_families

Samples = Counter[tuple[str, frozenset[tuple[str, str]]]]


def scrape(url: str, token: str | None = None) -> Samples:
    """Every sample of `url`/metrics, keyed by sample name and labels (fresh connection)."""
    headers = {"Authorization": f"Bearer {token}", "Connection": "close"} if token else {}
    response = requests.get(f"{url}/metrics", headers=headers, timeout=10)
    response.raise_for_status()
    samples: Samples = Counter()
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] += sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)
