"""metrics.observe_counted, the batcher's bulk observe, leaves a histogram as the same observe() calls would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from server import metrics


def _samples(histogram: Histogram) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in histogram.collect() for s in m.samples
            if not s.name.endswith("_created")}


def test_observe_counted_equals_observe_each_time() -> None:
    buckets = (0.001, 0.01, 0.1, 1.0)
    amounts = {0.0: 3, 0.001: 2, 0.0011: 1, 0.5: 4, 1.0: 1, 7.0: 2, -0.25: 1}  # on, between and past the bounds
    counted = Histogram("counted", "bulk", buckets=buckets, registry=CollectorRegistry())
    one_by_one = Histogram("counted", "bulk", buckets=buckets, registry=CollectorRegistry())
    metrics.observe_counted(counted, amounts)
    for amount, count in amounts.items():
        for _ in range(count):
            one_by_one.observe(amount)
    assert _samples(counted) == _samples(one_by_one)
    assert _samples(counted)[("counted_count", ())] == sum(amounts.values())
