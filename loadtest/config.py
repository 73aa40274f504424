"""What one load run does: a typed config, checked once before anything connects."""

from __future__ import annotations

import importlib.util
import os
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lstm_stream.client import defaults
from lstm_stream.wire import MAX_STREAM_ID_BYTES  # the server's limit, so no run is refused after connecting

APIS = ("unary", "stream")
# lstm-serve's default --metrics-port (README, "Ports"), for soak mode without --soak-metrics; not imported from
# the server, which the load tester never imports.
DEFAULT_METRICS_PORT = 9464


def _shipped_model() -> Path:
    """The model lstm-serve serves by default: server/model/default.keras of the same distribution.

    --verify recomputes with it unless given --model. Found where the `server` package lies, without
    importing it: the load tester runs no server code (pyproject's import contracts say so).
    """
    spec = importlib.util.find_spec("server")
    locations = list(spec.submodule_search_locations or ()) if spec is not None else []
    package = Path(locations[0]).resolve() if locations else Path("server")
    return package / "model" / "default.keras"


DEFAULT_MODEL = _shipped_model()


class ConfigError(ValueError):
    """The config asks for something impossible; the message says what (exit code 2)."""


def default_prefix() -> str:
    # Run-unique, so two runs on one server never share a stream unless asked to.
    return f"lt-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class LoadConfig:
    """One load run. Exactly one of `rate` (open loop) or `in_flight` (closed loop) applies: with
    `rate` set every stream sends `rate` chunks/s on a fixed schedule; otherwise `in_flight` chunks are
    kept in flight in all (default: one per stream, the most a stream can have, since its chunks must
    be applied in order)."""

    target: str = defaults.TARGET
    streams: int = 16
    chunk_timesteps: int = 1
    api: str = "unary"  # "unary": Predict; "stream": one PredictStream call per stream
    rate: float | None = None  # open loop: chunks/s of each stream
    in_flight: int | None = None  # closed loop: chunks in flight in all
    duration_s: float | None = 10.0  # measured seconds, after the warm-up; None: until total_chunks
    total_chunks: int | None = None  # chunks of all streams together, warm-up included
    warmup_s: float = 1.0
    channels: int = 4
    # Gateway connections the sensors are spread over (in all processes together), each forwarding many
    # sensors' chunks per message (PredictBatch / PredictBatchStream); 0: every sensor sends its own.
    gateways: int = 0
    processes: int = 1
    seed: int = 0
    stream_prefix: str = field(default_factory=default_prefix)
    timeout_s: float = defaults.ATTEMPT_TIMEOUT_S  # deadline of one attempt of one chunk
    max_retries: int = 5  # resends of a chunk failing with a retryable status (lstm_stream.client.retry)
    use_offsets: bool = True  # send start_offset; otherwise a request_id per chunk keeps retries safe
    max_restarts: int = 3  # after an unrecoverable error a stream starts a new sequence this often, then stops
    # A model of the server's repository that every chunk goes to ("": the server's only model).
    model_name: str = ""
    # Each stream's sequence ends after this many chunks and its next chunk starts a new one (None: never).
    sequence_chunks: int | None = None
    verify: bool = False
    model_path: str | None = None
    # --verify against a model repository: each sequence is checked against DIR/<model>/<version>/model.keras
    # of the version that answered it (the model: model_name, or the repository's only model).
    verify_repository: str | None = None
    tolerance: float = 1e-4
    # --verify checks every answer as the load runs (loadtest/live_verify.py); these streams (None: all)
    # also keep their sequences' first verify_sample_timesteps, recomputed whole after the run.
    verify_sample: int | None = 4
    verify_sample_timesteps: int = 50_000
    verify_batch: int = 64  # sequences per Keras call of the live verifier
    verify_threads: int = 1  # TensorFlow threads of the verifier process (0: TensorFlow's choice)
    verify_nice: int = 10  # the verifier's niceness increment: the load comes first
    # Exit 4 when a chunk failed for good (a sequence broke); retries that were answered are not failures.
    fail_on_errors: bool = True
    cleanup: bool = True  # ResetStream every stream after the run, so no slot waits for its idle expiry
    progress: bool = False
    connect_timeout_s: float = 5.0
    # TLS and API key, as lstm_stream.client takes them: PEM file paths; the key is sent as a bearer token.
    tls_ca: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    api_key: str | None = None
    # Soak mode (loadtest/soak.py; docs/loadtest.md, "Soak mode"): the server's /metrics sampled through the run,
    # short-lived streams churned beside it, and a verdict on memory growth and latency drift (exit 5).
    soak: bool = False
    soak_metrics: str | None = None  # the server's Prometheus URL; None: http://<target's host>:9464/metrics
    soak_interval_s: float = 5.0  # seconds between scrapes
    soak_scrape_timeout_s: float = 2.0  # a scrape slower than this is a gap in the samples, not a stall
    soak_churn: int = 0  # short-lived streams started every soak_churn_every_s beside the load (0: none)
    soak_churn_every_s: float = 1.0
    soak_churn_chunks: int = 3  # chunks each churned stream sends before its ResetStream
    # Past either, the soak fails. A least-squares fit of the server's RSS over the samples after the warm-up:
    # a server leaking 1 KiB a chunk at 1,000 chunks/s grows 3.4 GiB/h, while allocator noise and caches filling
    # stay within tens of MiB/h over ten minutes (docs/loadtest.md, "Soak mode").
    max_memory_slope_mib_h: float = 64.0
    max_p99_drift: float = 2.0  # the server's p99 over the last fifth of the samples / over the first fifth

    @property
    def metrics_url(self) -> str:
        """Where soak mode scrapes: --soak-metrics, or lstm-serve's default --metrics-port on the target's host."""
        if self.soak_metrics:
            return self.soak_metrics
        host = self.target.rsplit(":", 1)[0] if ":" in self.target else self.target
        return f"http://{host}:{DEFAULT_METRICS_PORT}/metrics"

    @property
    def open_loop(self) -> bool:
        return self.rate is not None

    @property
    def model_file(self) -> Path:
        return Path(self.model_path) if self.model_path else DEFAULT_MODEL

    @property
    def repository_model(self) -> str:
        """The model folder of `verify_repository` that --verify reads: `model_name`, or the only one there."""
        if self.model_name or not self.verify_repository:
            return self.model_name
        folders = sorted(p.name for p in Path(self.verify_repository).iterdir() if p.is_dir()) \
            if Path(self.verify_repository).is_dir() else []
        return folders[0] if len(folders) == 1 else ""

    def model_file_for(self, version: int) -> Path:
        """The model file of the version that answered: the repository's (model.keras, or model.h5), or the one
        model file (`model_path`, default the shipped model) for every version."""
        if not self.verify_repository:
            return self.model_file
        folder = Path(self.verify_repository) / self.repository_model / str(version)
        return next((folder / name for name in ("model.keras", "model.h5") if (folder / name).is_file()),
                    folder / "model.keras")

    def stream_id(self, index: int) -> str:
        return f"{self.stream_prefix}-{index}"

    def chunk_budget(self, index: int) -> int | None:
        """How many chunks stream `index` sends when the run is bounded by a chunk count."""
        if self.total_chunks is None:
            return None
        share, extra = divmod(self.total_chunks, self.streams)
        return share + (1 if index < extra else 0)

    def check(self) -> LoadConfig:
        problems = []
        if self.streams < 1:
            problems.append("streams must be at least 1")
        if self.chunk_timesteps < 1:
            problems.append("chunk timesteps must be at least 1")
        if self.api not in APIS:
            problems.append(f"api must be one of {', '.join(APIS)}, not {self.api!r}")
        if self.rate is not None and self.in_flight is not None:
            problems.append("give a rate (open loop) or an in-flight count (closed loop), not both")
        if self.rate is not None and not self.rate > 0:
            problems.append("rate must be positive")
        if self.in_flight is not None and not 1 <= self.in_flight <= self.streams:
            problems.append(
                f"in-flight must be between 1 and the number of streams ({self.streams}): a stream's chunks "
                "are applied in order, so each stream has at most one chunk in flight"
            )
        if self.in_flight is not None and self.in_flight < self.processes:
            problems.append("in-flight must be at least the number of processes (each process keeps its share)")
        if self.duration_s is None and self.total_chunks is None:
            problems.append("give a duration or a total number of chunks")
        if self.duration_s is not None and not self.duration_s > 0:
            problems.append("duration must be positive")
        if self.total_chunks is not None and self.total_chunks < 1:
            problems.append("total chunks must be at least 1")
        if self.warmup_s < 0:
            problems.append("warm-up must not be negative")
        if self.channels < 1:
            problems.append("channels must be at least 1")
        if self.gateways < 0 or self.gateways > self.streams:
            problems.append("gateways must be between 0 (none) and the number of streams")
        if self.gateways and self.gateways < self.processes:
            problems.append("gateways must be at least the number of processes (each process forwards through its own)")
        if not 1 <= self.processes <= max(1, self.streams):
            problems.append("processes must be between 1 and the number of streams")
        if self.processes > 4 * (os.cpu_count() or 1):
            problems.append(f"{self.processes} processes is far more than this machine's {os.cpu_count()} cores")
        if not self.timeout_s > 0 or not self.connect_timeout_s > 0:
            problems.append("timeouts must be positive")
        if self.max_retries < 0 or self.max_restarts < 0:
            problems.append("max retries and max restarts must not be negative")
        if not self.tolerance >= 0:
            problems.append("tolerance must not be negative")
        if self.verify_sample is not None and self.verify_sample < 0:
            problems.append("verify sample must not be negative (or all)")
        if self.verify_sample_timesteps < 1 or self.verify_batch < 1 or self.verify_threads < 0 or \
                not 0 <= self.verify_nice <= 19:
            problems.append("verify sample timesteps and verify batch must be at least 1, verify threads at least 0, "
                            "verify nice between 0 and 19")
        last_id = self.stream_id(self.streams - 1)
        if len(last_id.encode()) > MAX_STREAM_ID_BYTES:
            problems.append(f"stream ids like {last_id!r} are longer than {MAX_STREAM_ID_BYTES} bytes")
        if not self.stream_prefix or any(not ("!" <= c <= "~") or c in "{}" for c in self.stream_prefix):
            problems.append("stream prefix must be printable ASCII without spaces or braces")
        if (self.client_cert is None) != (self.client_key is None):
            problems.append("a client certificate needs its key: give both --client-cert and --client-key")
        for name in ("tls_ca", "client_cert", "client_key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                problems.append(f"--{name.replace('_', '-')} {path!r} is not a readable file")
        if self.verify and not self.verify_repository and not self.model_file.is_file():
            problems.append(f"--verify needs the server's model file; {str(self.model_file)!r} does not exist")
        if self.verify_repository is not None and (self.model_path is not None or not self.verify):
            problems.append("--verify-repository goes with --verify, instead of --model")
        if self.verify_repository is not None and not self.repository_model:
            problems.append(f"--verify-repository {self.verify_repository!r}: name the model with --model-name (a "
                            "folder of DIR/<model>/<version>/model.keras), or give a folder with one model")
        if self.sequence_chunks is not None and self.sequence_chunks < 1:
            problems.append("chunks per sequence must be at least 1")
        problems += self._soak_problems()
        if problems:
            raise ConfigError("; ".join(problems))
        return self

    def _soak_problems(self) -> list[str]:
        problems = []
        if not self.soak and (self.soak_metrics is not None or self.soak_churn):
            problems.append("--soak-metrics and --soak-churn apply to a soak run: add --soak")
        if not self.soak_interval_s > 0 or not self.soak_scrape_timeout_s > 0 or not self.soak_churn_every_s > 0:
            problems.append("the soak interval, scrape timeout and churn period must be positive")
        if self.soak_churn < 0 or self.soak_churn_chunks < 1:
            problems.append("soak churn must not be negative, and each churned stream sends at least one chunk")
        if not self.max_memory_slope_mib_h > 0 or not self.max_p99_drift > 1:
            problems.append("the largest memory slope must be positive and the largest p99 drift above 1")
        if self.soak and not self.metrics_url.startswith(("http://", "https://")):
            problems.append(f"--soak-metrics must be an http:// or https:// URL, not {self.metrics_url!r}")
        churn_id = self.churn_stream_id(10**9)
        if self.soak_churn and len(churn_id.encode()) > MAX_STREAM_ID_BYTES:
            problems.append(f"churned stream ids like {churn_id!r} are longer than {MAX_STREAM_ID_BYTES} bytes")
        return problems

    def churn_stream_id(self, index: int) -> str:
        return f"{self.stream_prefix}-churn-{index}"

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["model_path"] = str(self.model_file) if self.verify else self.model_path
        data["api_key"] = "(set)" if self.api_key else None  # a report is shared; the key is not
        return data
