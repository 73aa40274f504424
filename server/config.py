"""Server configuration: one typed object, read once at start-up from flags and environment.

Every option has a flag and an `LSTM_SERVE_<NAME>` environment variable; a flag wins over the
environment, the environment over the default.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path

from server.model.repository import PolicyError, VersionPolicy
from server.redis_addresses import parse_sentinels, sentinel_credentials_in

# Package data (server/model/default.keras, a link to models/default.keras in a checkout), so that a
# non-editable install (pip install ., the container image) finds the model inside site-packages too.
DEFAULT_MODEL = Path(__file__).resolve().parent / "model" / "default.keras"
ENV_PREFIX = "LSTM_SERVE_"
# Added to the largest valid chunk's float bytes for the derived message size limit: protobuf tags and
# lengths, stream and request ids (256 bytes each), Triton's names, shape and parameters.
MESSAGE_HEADROOM_BYTES = 64 * 1024
# Per chunk of a PredictBatchRequest, beyond its float bytes: its stream and request ids (256 bytes each)
# and the tags and lengths around them.
BATCH_CHUNK_OVERHEAD_BYTES = 560
# Bytes one float may take in a KServe v2 or native JSON body ("-0.123456789012345678," and the brackets of its
# row), for the derived HTTP body limit: JSON spells out in up to 24 characters what protobuf packs in 4.
JSON_BYTES_PER_VALUE = 32
# The record's count of kept answers is a uint32; more than this many would only make records large.
MAX_REPLAY_WINDOW = 256


@dataclass(frozen=True, slots=True)
class ServerConfig:
    model: str = str(DEFAULT_MODEL)
    # A model repository (docs/models.md): DIR/<model>/<version>/model.keras; when set, --model is not used.
    model_repository: str = ""
    repository_poll_s: float = 10.0
    version_policy: str = "latest:1"
    version_drain_s: float = 3600.0
    on_retired_version: str = "refuse"
    history_timesteps: int = 0
    live_streams_interval_s: float = 5.0
    host: str = "127.0.0.1"
    port: int = 50051
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_autostart: bool = True
    redis_data_dir: str = ".lstm-serve/redis"
    redis_cluster: bool = False
    redis_sentinels: str = ""
    redis_sentinel_master: str = ""
    redis_wait_replicas: int = 0
    redis_wait_timeout_ms: int = 1000
    key_prefix: str = "lstm"
    state_ttl_s: float = 86_400.0
    ended_ttl_s: float = 300.0
    # Answers kept per stream for retries (invariant 11): pipe()'s default window is the same
    # (clients/python/lstm_stream/client/defaults.py). Chosen from docs/performance.md, "Replay window".
    replay_window: int = 8
    replay_window_bytes: int = 64 * 1024
    request_deadline_s: float = 10.0
    max_chunk_timesteps: int = 1024
    max_batch: int = 256
    max_delay_ms: float = 0.0
    busy_delay_ms: float = 1.0
    max_in_flight: int = 2
    xla: bool = True
    numpy_max_batch_timesteps: int = 512
    slot_memory_mb: float = 64.0
    slot_memory_roaming_s: float = 300.0
    warmup_timesteps: str = "1,20"
    reset_on_model_change: bool = False
    workers: int = 1
    metrics_port: int = 9464
    # Triton's HTTP port: `tritonclient.http` and `perf_analyzer -i http` find it where they expect it.
    http_port: int = 8000
    identity_model: bool = False
    log_level: str = "INFO"
    log_format: str = "json"
    # Bounded resources, invariant 12 (docs/invariants.md).
    max_message_bytes: int = 0
    max_concurrent_rpcs: int = 1024
    max_queued_chunks: int = 10_000
    max_batch_chunks: int = 1024
    max_batch_timesteps: int = 65_536
    stream_window: int = 64
    stream_window_bytes: int = 1024 * 1024
    http2_bdp_probe: bool = False
    # Longer than Envoy's upstream idle_timeout (300 s, deploy/envoy.yaml), so the proxy closes its pooled
    # connections first; short enough that abandoned or flooding connections give their descriptors back.
    max_connection_idle_s: float = 600.0
    # Drain on SIGTERM (docs/operations.md, "Shutdown and draining"). The delay covers a load balancer noticing
    # NOT_SERVING: Envoy's active health check (interval 1 s x unhealthy threshold 2) plus a margin.
    # The grace bounds the whole shutdown; 15 s fits Kubernetes' default 30 s termination grace.
    drain_delay_s: float = 5.0
    shutdown_grace_s: float = 15.0
    # Security (docs/security.md).
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    api_keys: str = ""
    tenant_max_streams: int = 0
    tenant_chunks_per_s: float = 0.0
    redis_url_file: str = ""
    metrics_host: str = "127.0.0.1"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    # The same settings in the units their users count in, converted here only.
    @property
    def max_delay_s(self) -> float:
        return self.max_delay_ms / 1000

    @property
    def busy_delay_s(self) -> float:
        return self.busy_delay_ms / 1000

    @property
    def max_delay_us(self) -> int:
        return int(self.max_delay_ms * 1000)

    @property
    def state_ttl_ms(self) -> int:
        return int(self.state_ttl_s * 1000)

    @property
    def state_ttl_us(self) -> int:
        return int(self.state_ttl_s * 1_000_000)

    @property
    def slot_memory_bytes(self) -> int:
        return int(self.slot_memory_mb * 1024 * 1024)

    @property
    def max_connection_idle_ms(self) -> int:
        """grpc's `grpc.max_connection_idle_ms`, an int32: anything past 24 days is as good as never."""
        return min(round(self.max_connection_idle_s * 1000), 2**31 - 1)

    @property
    def http_idle_s(self) -> float:
        """aiohttp's keepalive_timeout for the HTTP port: --max-connection-idle-s, the gRPC port's, or for 0
        (never) as long as gRPC's longest; aiohttp reads 0 as closing each connection after one answer."""
        return self.max_connection_idle_ms / 1000 if self.max_connection_idle_s else (2**31 - 1) / 1000

    @property
    def ended_ttl_ms(self) -> int:
        return int(self.ended_ttl_s * 1000)

    def message_limits(self, input_features: int, output_size: int) -> tuple[int, int]:
        """(receive, send) limits in bytes: the largest valid chunk or answer plus headroom, unless set."""
        if self.max_message_bytes:
            return self.max_message_bytes, self.max_message_bytes
        # The largest of one chunk (Predict) and one full gateway message (PredictBatch).
        timesteps = max(self.max_chunk_timesteps, self.max_batch_timesteps)
        overhead = MESSAGE_HEADROOM_BYTES + self.max_batch_chunks * BATCH_CHUNK_OVERHEAD_BYTES
        receive = timesteps * input_features * 4 + overhead
        send = timesteps * output_size * 4 + overhead
        return receive, max(receive, send)

    def http_body_limit(self, input_features: int) -> int:
        """Largest HTTP request body accepted: the longest valid chunk spelt as JSON plus headroom, unless set.

        One chunk per request (the REST API has no PredictBatch), so max_chunk_timesteps bounds it; a binary
        tensor (Triton's extension) takes 4 bytes a value and fits the same bound."""
        if self.max_message_bytes:
            return self.max_message_bytes
        return self.max_chunk_timesteps * input_features * JSON_BYTES_PER_VALUE + MESSAGE_HEADROOM_BYTES

    def warmup_lengths(self) -> tuple[int, ...]:
        lengths = tuple(int(part) for part in self.warmup_timesteps.split(",") if part.strip())
        if any(length < 1 for length in lengths):
            raise ValueError("chunk lengths must be positive")
        return lengths


_HELP = {
    "model": "path of the Keras 3 .keras model to serve (default: the shipped sensor forecaster)",
    "model_repository": "serve every model in this folder, laid out DIR/<model>/<version>/model.keras (version a "
    "positive integer), instead of --model; each model has its own stream namespace (docs/models.md)",
    "repository_poll_s": "how often the repository is read for new, changed and removed versions (0: only at "
    "start-up and on RepositoryModelLoad / `lstm-stream models load`); a version is loaded once its files have "
    "not changed for one poll",
    "version_policy": "which versions of each model take new sequences: latest:N (the N newest), all, or "
    "specific:1,3; a file DIR/<model>/version_policy overrides it for one model. Versions that leave the policy "
    "keep serving the sequences pinned to them while streams use them (--version-drain-s)",
    "version_drain_s": "a retired version (out of the policy, removed, or unloaded) keeps serving the sequences "
    "pinned to it until none has used it for this many seconds (unloaded on request: this long after it)",
    "on_retired_version": "what a chunk of a sequence pinned to a version no longer served gets: refuse "
    "(FAILED_PRECONDITION naming the version), reset (it starts a new sequence from zero state on the newest "
    "version), or replay (the sequence goes on at its offset on the newest version, from a state rebuilt from the "
    "stream's kept inputs, --history-timesteps; reset when none are kept); the answer says which",
    "history_timesteps": "input timesteps kept with each stream's state (0: none), for --on-retired-version replay: "
    "4 x features bytes each per stream; exact when they cover the whole sequence (docs/models.md)",
    "live_streams_interval_s": "how often each replica writes which streams ran on which model version to Redis "
    "and counts the live streams of each version (the metric lstm_serve_live_streams, the same deployment-wide "
    "count from every replica; 0: not counted)",
    "host": "address to listen on (0.0.0.0 for every interface)",
    "port": "gRPC port (0 picks a free one and logs it)",
    "redis_url": "where stream state lives: redis://[user:password@]host:port/db, rediss:// for TLS (any node of a "
    "cluster with --redis-cluster; with --redis-sentinels only its credentials, db and TLS are used, and "
    "?sentinel_password= gives the sentinels' own)",
    "redis_autostart": "when nothing answers at a loopback redis_url, start a private redis-server",
    "redis_data_dir": "data folder of the private redis-server (append-only file on)",
    "redis_cluster": "--redis-url names any node of a Redis Cluster; keys are routed to the node that owns them",
    "redis_sentinels": "find the Redis master through these sentinels, host:port[,host:port...] (--redis-url then "
    "gives only credentials, db and TLS)",
    "redis_sentinel_master": "name of the master the sentinels monitor (needed with --redis-sentinels)",
    "redis_wait_replicas": "acknowledge a chunk only after Redis WAIT reports this many replicas hold its write "
    "(0: acknowledge once the master has it)",
    "redis_wait_timeout_ms": "how long WAIT may take; fewer replicas in time answer UNAVAILABLE (retry replays)",
    "key_prefix": "prefix of every Redis key this server writes",
    "state_ttl_s": "a stream's state expires after this many idle seconds",
    "ended_ttl_s": "after a chunk with end, its answer is kept this long for retries",
    "replay_window": "answers of a stream's last applied chunks kept with its state, so a retry of any of them "
    "(after a broken call, from any replica) is answered with its outputs instead of refused (1: the last only, "
    "which the previous release reads too)",
    "replay_window_bytes": "most bytes those answers take per stream (the last chunk's is kept whatever its size)",
    "request_deadline_s": "longest the server works on one call when its caller sets no deadline or a longer "
    "one: how long it keeps retrying a stalled or restarting Redis, and finding out whether a save whose "
    "answer was lost landed, before it answers UNAVAILABLE",
    "max_chunk_timesteps": "most timesteps one chunk may carry",
    "max_batch": "most chunks (of distinct streams) in one model call",
    "max_delay_ms": "extra wait for more chunks before every batch runs (0: none; then a batch starts as soon as a "
    "batch slot is free and it would reach the model as the model becomes free, growing meanwhile, and waits "
    "--busy-delay-ms while several callers are served at once)",
    "busy_delay_ms": "wait for more chunks before a batch runs while several callers are served at once (the last "
    "batch held chunks of more than one message): the callers answered last send their next chunks meanwhile, so "
    "batches grow and cost less per chunk; a lone caller never waits (0: never; --max-delay-ms above 0 applies "
    "instead)",
    "max_in_flight": "batches running at once; above 1, one batch's Redis round trips and replies overlap another's "
    "model call (1: one batch at a time)",
    "xla": "run batches through XLA-compiled calls, compiled per shape in the background",
    "numpy_max_batch_timesteps": "batches of at most this many chunks x timesteps (of the longest chunk) run on "
    "the model's NumPy twin instead of TensorFlow: several times less CPU for short chunks (0: never)",
    "slot_memory_mb": "memory for the slots this process saved last (per worker): a stream's next chunk starts "
    "from its slot there instead of reading Redis, and the save's compare-and-set still checks it (0: always read)",
    "slot_memory_roaming_s": "how long a stream another writer changed (a refused save: its chunks reach several "
    "replicas) is kept out of memory, its chunks reading Redis instead of running twice on a stale slot",
    "warmup_timesteps": "chunk lengths whose XLA shapes are compiled at start-up, comma-separated",
    "reset_on_model_change": "reset slots written by another model instead of refusing them (the same as "
    "--on-retired-version reset)",
    "metrics_port": "Prometheus metrics over HTTP on this port, at /metrics (0: off; worker i uses port + i)",
    "http_port": "HTTP/REST port beside the gRPC one, in the same process: KServe v2 as Triton serves it "
    "(/v2/..., JSON and binary tensors, sequence parameters) and the native API as JSON (/v1/...); same TLS, API "
    "keys, limits and drain (0: off; every worker of --workers shares it)",
    "workers": "server processes sharing the port (SO_REUSEPORT); each holds the model, none holds state",
    "identity_model": "benchmark ceiling: skip the model call (outputs copy inputs), keep every other step",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "log_format": "json (one object a line) or text",
    "max_message_bytes": "largest gRPC message accepted or sent (0: derived, the larger of max_chunk_timesteps "
    f"and max_batch_timesteps x features x 4 bytes + {MESSAGE_HEADROOM_BYTES // 1024} KiB + "
    f"{BATCH_CHUNK_OVERHEAD_BYTES} bytes per max_batch_chunks); a larger one is refused with RESOURCE_EXHAUSTED. "
    "Also the largest HTTP body (0: derived, max_chunk_timesteps x features x "
    f"{JSON_BYTES_PER_VALUE} bytes + {MESSAGE_HEADROOM_BYTES // 1024} KiB; larger: 413)",
    "max_concurrent_rpcs": "calls served at once, open streams included; more are refused with RESOURCE_EXHAUSTED",
    "max_queued_chunks": "chunks waiting for a batch; more are refused with RESOURCE_EXHAUSTED",
    "max_batch_chunks": "most chunks one PredictBatch message may carry; a larger message is refused whole with "
    "RESOURCE_EXHAUSTED",
    "max_batch_timesteps": "most timesteps (all chunks together) one PredictBatch message may carry; a larger "
    "message is refused whole with RESOURCE_EXHAUSTED",
    "stream_window": "requests one stream connection may have read but not yet answered; then reading pauses "
    "(HTTP/2 flow control pushes back on the client)",
    "stream_window_bytes": "bytes of requests one stream connection may have read but not yet answered "
    "(at least one request is always read)",
    "http2_bdp_probe": "let gRPC grow HTTP/2 flow-control windows to the measured bandwidth-delay product: faster "
    "large transfers over long links, but each connection may then hold several MiB the server has not read",
    "max_connection_idle_s": "close a client connection that has had no call open for this many seconds (HTTP/2 "
    "GOAWAY; clients reconnect on their next call, an open stream is never cut however quiet; 0: never); on the "
    "HTTP port too, where a request's headers must also arrive whole within it (slow clients)",
    "drain_delay_s": "on SIGTERM, health reads NOT_SERVING at once and calls are still served this long, so load "
    "balancers stop routing here; then new calls get UNAVAILABLE and open streams are ended",
    "shutdown_grace_s": "most seconds from SIGTERM to exit, drain delay included; accepted chunks are finished "
    "within it, calls still running when it ends are cancelled",
    "tls_cert": "PEM certificate chain: the gRPC port then serves TLS only (re-read on SIGHUP or change)",
    "tls_key": "PEM private key of --tls-cert (unencrypted; keep the file readable only by the server)",
    "tls_client_ca": "PEM CA bundle: require client certificates signed by it (mutual TLS)",
    "api_keys": "file of `TENANT KEY` lines: every call needs `authorization: Bearer KEY`, and each tenant "
    "gets its own stream namespace (re-read on SIGHUP or change)",
    "tenant_max_streams": "live streams each tenant may hold (0: no limit; a key file line can override it)",
    "tenant_chunks_per_s": "chunks/s each tenant may send to each server process (0: no limit; a key file line "
    "can override it)",
    "redis_url_file": "read the Redis URL from this file instead (keeps a password out of `ps` and the flags)",
    "metrics_host": "address the metrics endpoint listens on (0.0.0.0 for every interface)",
}


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lstm-serve",
        description="Serve a stateful Keras recurrent model over gRPC, one Redis state slot per stream.",
        epilog=f"Every option can also be set as an environment variable {ENV_PREFIX}<OPTION>, "
        f"for example {ENV_PREFIX}REDIS_URL.",
    )
    defaults = ServerConfig()
    for item in fields(ServerConfig):
        flag = "--" + item.name.replace("_", "-")
        default = getattr(defaults, item.name)
        env_name = ENV_PREFIX + item.name.upper()
        kind = _parse_bool if isinstance(default, bool) else type(default)
        help_text = f"{_HELP[item.name]} (env {env_name}; default {default})"
        if isinstance(default, bool):
            parser.add_argument(flag, type=kind, nargs="?", const=True, default=None, metavar="BOOL", help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=None, help=help_text)
    parser.add_argument("--version", action=_PrintVersion,
                        help="print the server's version and the slot record formats it reads and writes, and exit")
    return parser


class _PrintVersion(argparse.Action):
    """`lstm-serve --version`: exits 0 before anything loads a model or reaches Redis (CHANGELOG.md)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        # Imported here: only --version needs them (numpy, a file read); neither imports TensorFlow or redis.
        from server.state.record import NEWEST_FORMAT, PREVIOUS_RELEASE_FORMAT, READ_FORMATS
        from server.version import server_version

        reads = ", ".join(str(f) for f in READ_FORMATS)
        print(f"lstm-serve {server_version()}\nslot record formats: reads {reads}; writes {PREVIOUS_RELEASE_FORMAT} "
              f"to {NEWEST_FORMAT}, the newest its deployment's record-format key allows")
        parser.exit(0)


def load_config(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> ServerConfig:
    environ = dict(os.environ) if environ is None else environ
    parser = build_parser()
    args = parser.parse_args(argv)
    values = {}
    for item in fields(ServerConfig):
        flag_value = getattr(args, item.name)
        if flag_value is not None:
            values[item.name] = flag_value
            continue
        env_value = environ.get(ENV_PREFIX + item.name.upper())
        if env_value is not None:
            default = getattr(ServerConfig(), item.name)
            kind = _parse_bool if isinstance(default, bool) else type(default)
            try:
                values[item.name] = kind(env_value)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                parser.error(f"{ENV_PREFIX}{item.name.upper()}={env_value!r}: {exc}")
    if values.get("redis_url_file"):
        if "redis_url" in values:
            parser.error("give the Redis URL once: --redis-url or --redis-url-file, not both")
        values["redis_url"] = _read_redis_url(values["redis_url_file"], parser)
    config = ServerConfig(**values)
    _check(config, parser)
    return config


def _read_redis_url(path: str, parser: argparse.ArgumentParser) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            url = handle.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        parser.error(f"--redis-url-file {path}: cannot read it ({exc.__class__.__name__})")
    if not url.startswith(("redis://", "rediss://", "unix://")):
        # Never echo the content: it holds a password.
        parser.error(f"--redis-url-file {path}: expected one redis://, rediss:// or unix:// URL")
    return url


def _check(config: ServerConfig, parser: argparse.ArgumentParser) -> None:
    if config.max_batch < 1:
        parser.error("--max-batch must be at least 1")
    if config.max_chunk_timesteps < 1:
        parser.error("--max-chunk-timesteps must be at least 1")
    if config.workers < 1:
        parser.error("--workers must be at least 1")
    if config.workers > 1 and config.port == 0:
        parser.error("--workers above 1 needs a fixed --port: the workers share it")
    if config.numpy_max_batch_timesteps < 0:
        parser.error("--numpy-max-batch-timesteps must not be negative")
    if not 0 <= config.slot_memory_mb < float("inf"):
        parser.error("--slot-memory-mb must not be negative (0: every chunk reads its slot from Redis)")
    if not 0 <= config.slot_memory_roaming_s < float("inf"):
        parser.error("--slot-memory-roaming-s must not be negative (0: a roaming stream is kept again at once)")
    if config.max_in_flight < 1:
        parser.error("--max-in-flight must be at least 1")
    try:
        config.warmup_lengths()
    except ValueError:
        parser.error(f"--warmup-timesteps must be comma-separated positive integers, got {config.warmup_timesteps!r}")
    if config.max_delay_ms < 0:
        parser.error("--max-delay-ms must not be negative")
    if not config.busy_delay_ms >= 0:  # NaN too
        parser.error("--busy-delay-ms must not be negative")
    if not config.request_deadline_s > 0:
        parser.error("--request-deadline-s must be positive")
    if not 1 <= config.replay_window <= MAX_REPLAY_WINDOW:
        parser.error(f"--replay-window must be between 1 (the last answer only) and {MAX_REPLAY_WINDOW}")
    if config.replay_window_bytes < 0:
        parser.error("--replay-window-bytes must not be negative")
    if config.state_ttl_s <= 0 or config.ended_ttl_s <= 0:
        parser.error("--state-ttl-s and --ended-ttl-s must be positive")
    if not 0 <= config.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    if not 0 <= config.http_port <= 65535:
        parser.error("--http-port must be between 0 (off) and 65535")
    _check_redis(config, parser)
    if config.max_message_bytes < 0:
        parser.error("--max-message-bytes must not be negative (0: derived from --max-chunk-timesteps)")
    for name in ("max_concurrent_rpcs", "max_queued_chunks", "stream_window", "stream_window_bytes",
                 "max_batch_chunks", "max_batch_timesteps"):
        if getattr(config, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not (config.max_connection_idle_s == 0 or 0.001 <= config.max_connection_idle_s < float("inf")):
        parser.error("--max-connection-idle-s must be 0 (never close idle connections) or at least 0.001")
    if config.drain_delay_s < 0 or config.shutdown_grace_s <= 0:
        parser.error("--drain-delay-s must not be negative and --shutdown-grace-s must be positive")
    if config.drain_delay_s >= config.shutdown_grace_s:
        parser.error(f"--drain-delay-s ({config.drain_delay_s:g}) must be shorter than --shutdown-grace-s "
                     f"({config.shutdown_grace_s:g}): the grace includes the drain delay")
    try:
        VersionPolicy.parse(config.version_policy)
    except PolicyError as exc:
        parser.error(f"--version-policy: {exc}")
    if config.on_retired_version not in ("refuse", "reset", "replay"):
        parser.error("--on-retired-version must be refuse, reset or replay")
    if config.history_timesteps < 0:
        parser.error("--history-timesteps must not be negative (0: keep none)")
    if config.repository_poll_s < 0 or config.version_drain_s < 0:
        parser.error("--repository-poll-s and --version-drain-s must not be negative")
    if not 0 <= config.live_streams_interval_s < float("inf"):
        parser.error("--live-streams-interval-s must not be negative (0: live streams are not counted)")
    if config.log_format not in ("json", "text"):
        parser.error("--log-format must be json or text")
    if bool(config.tls_cert) != bool(config.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if config.tls_client_ca and not config.tls_cert:
        parser.error("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    if (config.tenant_max_streams or config.tenant_chunks_per_s) and not config.api_keys:
        parser.error("--tenant-max-streams and --tenant-chunks-per-s limit tenants, which need --api-keys")
    if config.tenant_max_streams < 0 or not 0 <= config.tenant_chunks_per_s < float("inf"):
        parser.error("--tenant-max-streams and --tenant-chunks-per-s must be 0 (no limit) or positive")


def _check_redis(config: ServerConfig, parser: argparse.ArgumentParser) -> None:
    try:
        sentinels = parse_sentinels(config.redis_sentinels)
    except ValueError as exc:
        parser.error(f"--redis-sentinels: {exc}")
    if sentinels and config.redis_cluster:
        parser.error("--redis-cluster and --redis-sentinels exclude each other: a cluster fails over by itself")
    if sentinels and not config.redis_sentinel_master:
        parser.error("--redis-sentinels needs --redis-sentinel-master, the name the sentinels monitor")
    if not sentinels and (names := sentinel_credentials_in(config.redis_url)):
        parser.error(f"--redis-url: {' and '.join(names)} are the sentinels' credentials, for --redis-sentinels only")
    if config.redis_sentinel_master and not sentinels:
        parser.error("--redis-sentinel-master needs --redis-sentinels host:port[,host:port...]")
    if config.redis_wait_replicas < 0:
        parser.error("--redis-wait-replicas must not be negative")
    if config.redis_wait_timeout_ms < 1:
        parser.error("--redis-wait-timeout-ms must be at least 1 (Redis reads WAIT 0 as wait forever)")
