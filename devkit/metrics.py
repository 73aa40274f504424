"""A server's Prometheus /metrics, scraped and read by sample name and labels."""

from __future__ import annotations

import urllib.request
from typing import Protocol

from prometheus_client.parser import text_string_to_metric_families

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]  # {sample name: {sorted labels: value}}


class HasMetricsPort(Protocol):
    metrics_port: int


def scrape(server: HasMetricsPort) -> Samples:
    """Every sample of a server's /metrics."""
    return scrape_port(server.metrics_port)


def scrape_port(metrics_port: int) -> Samples:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when the server has not counted it yet."""
    return samples.get(name, {}).get(tuple(sorted(labels.items())), 0.0)
