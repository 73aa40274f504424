"""Prometheus metrics, served over HTTP on --metrics-port (0 turns them off).

Counted where the data path already has the numbers in hand: per chunk outcome in the processor's
caller (the batcher), per batch size and stage time, so the cost is a few counter increments a batch.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

CHUNKS = Counter("lstm_serve_chunks_total", "Chunks answered, by outcome (ok, replayed or a gRPC code name)",
                 ["outcome"])
TIMESTEPS = Counter("lstm_serve_timesteps_total", "Timesteps run through the model")
BATCH_SIZE = Histogram("lstm_serve_batch_chunks", "Chunks per model call",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
BATCH_SECONDS = Histogram("lstm_serve_batch_seconds", "Time of one batch: load, model, save",
                          buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0))
QUEUED = Gauge("lstm_serve_queued_chunks", "Chunks waiting for a batch")
CONFLICTS = Counter("lstm_serve_conflicts_total", "Chunks run again because their slot changed under them")

# Only with API keys (--api-keys): one series per tenant of the key file and status code ("OK" for an
# answered chunk, replayed retries included; RESOURCE_EXHAUSTED for chunks over the tenant's limits).
TENANT_CHUNKS = Counter("lstm_serve_tenant_chunks_total", "Chunks answered per tenant, by gRPC status code name",
                        ["tenant", "code"])


def serve_metrics(port: int, host: str) -> None:
    start_http_server(port, addr=host)
