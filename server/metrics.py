"""Prometheus metrics, served over HTTP on --metrics-port (0 turns them off).

Where each number comes from:
- every call and every streamed message, by protocol, method and gRPC code, and its server-side
  latency: the interceptor at the edge (server/api/interceptors.py), so nothing refused before the
  data plane (INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE while draining) escapes the count;
- batch sizes, batch times and the wait in the batcher's queue: the batcher;
- queued and in-flight chunks: read from the batcher at scrape time (`Gauge.set_function`), so a
  scrape sees the queue as it is, not as it was at the last batch;
- Redis up, its round-trip time and its used memory: the health tracker's ping and INFO memory
  (server/app/redis_health.py), never the data path;
- compiles: the model runner. The dashboard deploy/grafana/dashboards/lstm-serve.json uses these names.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping

from prometheus_client import Counter, Gauge, Histogram, Info, start_http_server

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)

# --- the edge: every call and streamed message --------------------------------------------------
REQUESTS = Counter(
    "lstm_serve_requests_total",
    "Answers by protocol (native, triton, health, reflection), method and gRPC code: one per unary call, "
    "one per message of a stream (an error inside a stream message counts under its own code)",
    ["protocol", "method", "code"],
)
REQUEST_SECONDS = Histogram(
    "lstm_serve_request_seconds",
    "Server-side time from a request's arrival to its answer (a unary call, or one message of a stream)",
    ["protocol", "method"], buckets=_LATENCY_BUCKETS,
)
STREAMS = Counter("lstm_serve_streams_total", "Bidirectional streams ended, by final gRPC status",
                  ["protocol", "method", "code"])
OPEN_STREAMS = Gauge("lstm_serve_open_streams", "Bidirectional streams open now", ["protocol"])
IN_FLIGHT_CALLS = Gauge("lstm_serve_in_flight_calls", "Calls being handled now (streams included)", ["protocol"])
READY = Gauge("lstm_serve_ready", "1 while health says SERVING (model loaded, Redis answers, not draining)")

# --- the batcher ----------------------------------------------------------------------------------
CHUNKS = Counter("lstm_serve_chunks_total",
                 "Valid chunks the batcher answered, by outcome (ok, replayed, dropped: a broken stream's chunk "
                 "never started, or a gRPC code name); requests refused before the batcher are in "
                 "lstm_serve_requests_total",
                 ["outcome"])
TIMESTEPS = Counter("lstm_serve_timesteps_total", "Timesteps run through the model")
BATCH_SIZE = Histogram("lstm_serve_batch_chunks", "Chunks per model call",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
BATCH_SECONDS = Histogram("lstm_serve_batch_seconds", "Time of one batch: load, model, save",
                          buckets=_LATENCY_BUCKETS)
QUEUE_WAIT_SECONDS = Histogram("lstm_serve_queue_wait_seconds",
                               "Time a chunk waited in the batcher's queue before its batch started",
                               buckets=_LATENCY_BUCKETS)
QUEUED = Gauge("lstm_serve_queued_chunks", "Chunks waiting for a batch (read at scrape time)")
IN_FLIGHT_CHUNKS = Gauge("lstm_serve_in_flight_chunks", "Chunks in batches running now (read at scrape time)")
CONFLICTS = Counter("lstm_serve_conflicts_total", "Chunks run again because their slot changed under them")
SLOT_LOADS = Counter("lstm_serve_slot_loads_total", "Slots chunks started from, by source: memory (what this process "
                     "saved last, checked by the save's compare-and-set) or redis", ["source"])
SLOT_LOADS_MEMORY = SLOT_LOADS.labels("memory")
SLOT_LOADS_REDIS = SLOT_LOADS.labels("redis")
SLOT_MEMORY_REREADS = Counter("lstm_serve_slot_memory_rereads_total", "Chunks whose slot from memory led to an "
                              "answer without a save (a replay, a refusal), so Redis was read to decide it")
SLOT_MEMORY_REFUSED = Counter("lstm_serve_slot_memory_refused_total", "Chunks run on a slot from memory whose save "
                              "Redis refused: the slot had changed (another replica, a reset, an expiry); run again")

# --- Redis, the model, compiles ---------------------------------------------------------------------
REDIS_UP = Gauge("lstm_serve_redis_up", "1 while the state store answers the health tracker's PING")
REDIS_PING_SECONDS = Histogram("lstm_serve_redis_ping_seconds", "Round-trip time of the health tracker's PING",
                               buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0))
REDIS_USED_MEMORY = Gauge("lstm_serve_redis_used_memory_bytes",
                          "Bytes Redis uses (INFO memory used_memory; on a Cluster the sum over its masters), read "
                          "by the health tracker every second; it keeps its last value while Redis does not answer")
MODEL = Info("lstm_serve_model", "The model served: name, fingerprint and shapes")
MODEL_CALLS = Counter("lstm_serve_model_calls_total",
                      "Model calls by path: numpy (small batches, the NumPy twin) or tensorflow", ["path"])
MODEL_CALLS_NUMPY = MODEL_CALLS.labels("numpy")
MODEL_CALLS_TENSORFLOW = MODEL_CALLS.labels("tensorflow")
COMPILES = Counter("lstm_serve_compiles_total", "XLA compilations, by shape (masked, batch bucket, timesteps)",
                   ["masked", "batch", "timesteps"])
COMPILE_SECONDS = Counter("lstm_serve_compile_seconds_total", "Seconds spent compiling, by shape",
                          ["masked", "batch", "timesteps"])


_batchers: list[tuple[Callable[[], int], Callable[[], int]]] = []


def watch_batcher(queued: Callable[[], int], in_flight: Callable[[], int]) -> None:
    """Sample the batchers' queues and running chunks (one batcher per model, summed) whenever Prometheus scrapes."""
    _batchers.append((queued, in_flight))
    QUEUED.set_function(lambda: sum(q() for q, _ in _batchers))
    IN_FLIGHT_CHUNKS.set_function(lambda: sum(f() for _, f in _batchers))


def unwatch_batcher(queued: Callable[[], int]) -> None:
    _batchers[:] = [(q, f) for q, f in _batchers if q is not queued]


# Models and versions (docs/models.md).
MODEL_VERSIONS = Gauge("lstm_serve_model_versions", "Versions known to this process, by model and state "
                       "(READY, DRAINING, LOADING, UNAVAILABLE)", ["model", "state"])
MODEL_LOADS = Counter("lstm_serve_model_loads_total", "Version loads, by model and outcome (loaded, failed)",
                      ["model", "outcome"])
MIGRATIONS = Counter("lstm_serve_migrations_total", "Chunks of sequences pinned to a version no longer served, by "
                     "model and what they got (--on-retired-version: refuse, reset, replay)", ["model", "policy"])
VERSION_CHUNKS = Counter("lstm_serve_version_chunks_total", "Chunks run, by model and version",
                         ["model", "version"])
# Counted in Redis (server/state/live_versions.py): every replica reports the deployment's count; aggregate
# with max(), not sum().
LIVE_STREAMS = Gauge("lstm_serve_live_streams", "Streams with live state, by model and the version they are pinned "
                     "to, in the whole deployment (refreshed every --live-streams-interval-s)", ["model", "version"])


def count_slot_loads(chunks: int, from_memory: int, reread: int) -> None:
    """Once per batch (a labelled counter costs a lookup and a lock)."""
    SLOT_LOADS_MEMORY.inc(from_memory)
    SLOT_LOADS_REDIS.inc(chunks - from_memory)
    if reread:
        SLOT_MEMORY_REREADS.inc(reread)


# Only with API keys (--api-keys): one series per tenant of the key file and status code ("OK" for an
# answered chunk, replayed retries included; RESOURCE_EXHAUSTED for chunks over the tenant's limits).
TENANT_CHUNKS = Counter("lstm_serve_tenant_chunks_total", "Chunks answered per tenant, by gRPC status code name",
                        ["tenant", "code"])


def observe_counted(histogram: Histogram, amounts: Mapping[float, int]) -> None:
    """`histogram.observe(amount)` `count` times for each amount, with one increment per bucket touched.

    prometheus_client has no bulk observe, and each observe takes two locks: the batcher's queue wait, observed
    once per chunk, showed in the event loop's profile. The chunks of one message share one amount. This reads
    the histogram's buckets as Histogram.observe does (tests/unit/test_metrics_counted.py checks they agree)."""
    bounds = histogram._upper_bounds
    total = 0.0
    for amount, count in amounts.items():
        total += amount * count
        histogram._buckets[bisect.bisect_left(bounds, amount)].inc(count)
    histogram._sum.inc(total)


def serve_metrics(port: int, host: str) -> None:
    start_http_server(port, addr=host)
