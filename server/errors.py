"""One exception type for every failure a caller should see, carrying its gRPC status code, and one
base for every failure at start-up (`StartupError`).

The protocol edges map it in one place (a decorator for unary calls, an `error` field for streams);
the data path below them (data plane, batcher, processor, state store) raises it and never imports
gRPC itself: the status codes come through this module, the only one below the edges that imports
`grpc`, and only for `grpc.StatusCode`. Each error a caller can see is named here by a factory, in
the order of the README's error table, so the table can be checked against this one module; the
Triton protocol's own errors (its wording, for its clients) close the file.
"""

from __future__ import annotations

import grpc

# The metadata keys and outcomes clients read: their one home is the wire module of the client distribution.
# On chunk errors from the state store the outcome is "not-applied" (certain) or "unknown" (invariant 9).
from lstm_stream.wire import (
    NOT_APPLIED,
    OFFSET_METADATA_KEY,
    OUTCOME_METADATA_KEY,
    OUTCOME_UNKNOWN,
    SERVER_INTERNAL_PREFIX,
)

# The exit code of a start-up failure: the supervisor of --workers does not restart a worker that exits
# with it (every restart would fail the same way), and neither should a container's restart policy.
EXIT_STARTUP_ERROR = 2


class StartupError(Exception):
    """The server cannot start as configured; the message says what to change.

    Every start-up failure is one of these or a subclass (the model, Redis, the topology, key and
    certificate files, ports), raised where it is found, never wrapped again, and caught once, by
    `lstm-serve` (server/app/main.py), which logs `log_line()` and exits with EXIT_STARTUP_ERROR."""

    # What kind of failure, before the message in the log line ("" for none).
    headline = ""

    def log_line(self) -> str:
        return f"{self.headline}: {self}" if self.headline else str(self)


class TracingConfigError(StartupError):
    """The OTEL_* environment asks for traces this server cannot send (server/app/tracing.py)."""

    headline = "tracing"


class ServiceError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, *, current_offset: int | None = None,
                 outcome: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        # Set on FAILED_PRECONDITION for an offset mismatch: the stream's offset now.
        self.current_offset = current_offset
        # Set on state-store errors of a chunk: NOT_APPLIED or OUTCOME_UNKNOWN.
        self.outcome = outcome

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        metadata: tuple[tuple[str, str], ...] = ()
        if self.current_offset is not None:
            metadata += ((OFFSET_METADATA_KEY, str(self.current_offset)),)
        if self.outcome is not None:
            metadata += ((OUTCOME_METADATA_KEY, self.outcome),)
        return metadata

    def __repr__(self) -> str:
        return f"ServiceError({self.code.name}, {self.message!r})"


# --- INVALID_ARGUMENT: bad input (invariant 6); the message names the field. ---

def invalid_argument(field: str, problem: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {problem}")


def malformed_message(problem: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid protobuf message for this method ({problem})"
    )


# --- NOT_FOUND: a stream without state (GetStreamState); models and versions not served are below. ---

def stream_not_found(stream_id: str) -> ServiceError:
    """GetStreamState of a stream without state: never seen, ended, reset or expired (GetStream: exists false)."""
    return ServiceError(
        grpc.StatusCode.NOT_FOUND,
        f"stream {stream_id!r} has no state (never started, ended, reset or expired); SetStreamState gives it one",
    )


# --- FAILED_PRECONDITION: the chunk does not fit the stream's saved state; nothing was applied. ---

def offset_mismatch(stream_id: str, requested: int, current: int, replay_window: int = 1) -> ServiceError:
    if requested < current:
        # Invariant 10: an earlier chunk of this sequence arriving late (or one of an older sequence); a
        # retry of one whose answer is kept was replayed before this (invariant 11).
        why = (f"if it was applied before, its answer is no longer kept (answers are kept for the last "
               f"{replay_window} chunks of a sequence: --replay-window), else it is a chunk of an earlier "
               "sequence; it was not applied again")
    else:
        why = "it was not applied"
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"stream {stream_id!r} is at offset {current}, but the chunk starts at offset {requested}: {why}; "
        f"resend from offset {current}, or send reset to start a new sequence",
        current_offset=current,
    )


def late_duplicate(stream_id: str, current: int, which: str) -> ServiceError:
    """Invariant 10: a delayed copy of an earlier chunk of the current sequence changes nothing."""
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"stream {stream_id!r}: this chunk is a late duplicate of {which}, already applied; it was not applied "
        f"again. The stream is at offset {current}. To start the stream again with the same data on purpose, "
        "send it with a new request_id, or call ResetStream first",
        current_offset=current,
    )


def saved_by_other_model(stream_id: str, saved: str, serving: str) -> ServiceError:
    """Invariant 7: a slot written by another model is never fed to this one."""
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"stream {stream_id!r} was saved by another model (fingerprint {saved}, this server runs {serving}); "
        "its state cannot be continued by this model. Send reset or call ResetStream to start the stream "
        "again, or run the server with --reset-on-model-change",
    )


def version_retired(stream_id: str, model: str, retired: int, newest: int) -> ServiceError:
    """Invariant 14: a sequence pinned to a version that no longer serves (--on-retired-version refuse)."""
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"stream {stream_id!r}: its sequence runs on model {model!r} version {retired}, which was retired and no "
        f"longer serves; send reset (or call ResetStream) to start it again on the newest version ({newest}), set "
        "a state computed for that version (SetStreamState), or run the server with --on-retired-version reset",
    )


def pinned_to_version(stream_id: str, model: str, pinned: int, asked: int) -> ServiceError:
    """Invariant 14: a chunk naming another version than the one its sequence started on."""
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"stream {stream_id!r}: its sequence runs on model {model!r} version {pinned}, not version {asked}; a "
        f"sequence stays on the version that started it. Send model_version 0 or {pinned}, or send reset to start "
        f"a new sequence on version {asked}",
    )


def model_version_unavailable(model: str, asked: int, ready: list[int]) -> ServiceError:
    """A new sequence asked for a version that takes none (unknown, loading, draining), or none is ready."""
    serving = ", ".join(str(v) for v in ready) or "none"
    what = f"version {asked}" if asked else "a version"
    return ServiceError(
        grpc.StatusCode.NOT_FOUND,
        f"model {model!r} has no {what} ready for new sequences (ready: {serving}); see ListModels",
    )


def model_not_found(name: str, known: list[str]) -> ServiceError:
    """A request naming a model the server does not serve, or naming none when it serves several."""
    served = ", ".join(repr(n) for n in known) or "none"
    if not name:
        problem = f"this server serves several models ({served}): name one in `model`"
    else:
        problem = f"model {name!r} is not served here; served: {served}"
    return ServiceError(grpc.StatusCode.NOT_FOUND, problem)


def version_loading(stream_id: str, model: str, version: int) -> ServiceError:
    """Invariant 14: the stream's sequence runs on a version this replica is loading for it (retryable)."""
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        f"stream {stream_id!r}: its sequence runs on model {model!r} version {version}, which this replica is loading "
        "from the repository now; the chunk was not applied, retry it",
        outcome=NOT_APPLIED,
    )


def model_load_failed(model: str, reasons: list[str]) -> ServiceError:
    """RepositoryModelLoad found no version of the model it could serve (the versions serving keep serving)."""
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT,
                        f"model {model!r}: no version could be loaded: " + "; ".join(reasons))


def no_model_repository() -> ServiceError:
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        "this server serves one model file (--model); loading and unloading models needs --model-repository",
    )


def stream_not_started(stream_id: str) -> ServiceError:
    """Triton's rule: a sequence must begin with its START flag (Chunk.must_exist)."""
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"stream {stream_id!r} has no state (never started, ended, reset or expired); "
        "its first chunk must start the sequence",
        current_offset=0,
    )


def slot_wrong_type(stream_id: str, key: str, redis_type: str) -> ServiceError:
    """Something other than this server wrote another kind of value under the stream's key."""
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"stream {stream_id!r} cannot be saved: its Redis key {key!r} holds a {redis_type}, not a stream record "
        "(another program writes under this key prefix?); the chunk was not applied. Delete the key "
        "(ResetStream does) or choose another --key-prefix",
        outcome=NOT_APPLIED,
    )


# --- UNAVAILABLE: Redis did not answer or refused (`x-chunk-outcome` says whether the chunk was applied). ---

def redis_unavailable(detail: str, action: str = "the chunk was not applied, retry it",
                      outcome: str | None = NOT_APPLIED) -> ServiceError:
    """Redis did not answer or refused, and nothing was written (a chunk's load failed, or Redis refused its
    save): retrying is always safe. Reads and resets pass their own `action` and no outcome."""
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE, f"state store (Redis) unavailable: {detail}; {action}", outcome=outcome
    )


def outcome_unknown(stream_id: str, detail: str) -> ServiceError:
    """Invariant 9: Redis stopped answering in the middle of a save and did not answer again before the
    deadline. UNAVAILABLE, because the remedy is the same as for an outage: retry; the retry is safe with
    start_offset or request_id (answered `replayed` if the first attempt was applied)."""
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        f"state store (Redis) stopped answering while saving stream {stream_id!r} ({detail}), and the deadline "
        "passed before the server could find out whether the chunk was applied: the outcome is unknown. "
        "Retrying it with its start_offset or request_id is safe: if it was applied, the retry is answered "
        "with replayed=true and not applied twice",
        outcome=OUTCOME_UNKNOWN,
    )


def replication_unconfirmed(confirmed: int | None, wanted: int, timeout_ms: int) -> ServiceError:
    """Redis WAIT came back short (or, with None, could not follow a write that was redirected to another
    cluster node): the write is on the master, which could still lose it in a failover."""
    why = (f"only {confirmed} of {wanted} replicas confirmed it within {timeout_ms} ms" if confirmed is not None
           else "its slot was moving between cluster nodes, so no replica confirmation was asked for")
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        f"the chunk was applied on the Redis master, but {why}, so it is not acknowledged; retry it with its "
        "start_offset: the retry replays the stored answer once replicas confirm it, or applies the chunk again "
        "if a failover lost it",
        outcome=OUTCOME_UNKNOWN,  # applied, but whether it survives a failover is not known
    )


def answer_unconfirmed(confirmed: int | None, wanted: int, timeout_ms: int) -> ServiceError:
    """With --redis-wait-replicas, an answer that ends in no save (a replay, a refusal) is given only from a
    master whose replicas confirm the stream's slot; this one could not (an old master cut off by a
    failover has fewer replicas), so its slot may not be the stream's state."""
    why = (f"only {confirmed} of {wanted} replicas confirmed" if confirmed is not None
           else "its slot was moving between cluster nodes, so no replica confirmation was asked for")
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        f"the answer depends on the stream's slot on the Redis master, but {why} it within {timeout_ms} ms, "
        "so the server does not answer from it; nothing was applied by this attempt: retry the chunk with its "
        "start_offset or request_id",
    )


# --- UNAVAILABLE: the server is shutting down. ---

def shutting_down() -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; the chunk was not applied, retry it")


def draining() -> ServiceError:
    # UNAVAILABLE: clients and Envoy retry it, and the load balancer has already been told (health
    # NOT_SERVING) to send the next attempt to another replica.
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        "this replica is draining (shutting down); the request was not applied: retry it, another replica will "
        "answer",
    )


def stream_drained() -> ServiceError:
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        "this replica is draining (shutting down): every chunk answered on this stream was applied, later ones "
        "were not; reopen the stream and resend from the last answered offset",
    )


# --- DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED: the server's own limits (invariants 9 and 12). ---

def deadline_passed(stream_id: str | None) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"the deadline of the chunk of stream {stream_id!r} passed before it could run; it was not applied",
        outcome=NOT_APPLIED,
    )


def queue_full(limit: int) -> ServiceError:
    """Invariant 12 (docs/invariants.md): the batcher holds at most `limit` chunks; past that, refuse, not queue."""
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"server busy: {limit} chunks are already waiting for a batch (--max-queued-chunks); "
        "the chunk was not applied, retry it after a short wait",
        outcome=NOT_APPLIED,
    )


def batch_too_many_chunks(chunks: int, limit: int) -> ServiceError:
    """Invariant 12: a PredictBatch message carries at most --max-batch-chunks chunks; a larger one is refused whole
    (INVALID_ARGUMENT: the same message would be refused again; ModelInfo tells clients the limit)."""
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"chunks: the message carries {chunks} chunks; at most {limit} are allowed in one message "
        "(--max-batch-chunks): split it; nothing of it was applied",
        outcome=NOT_APPLIED,
    )


def batch_too_many_timesteps(timesteps: int, limit: int) -> ServiceError:
    """Invariant 12: the chunks of one PredictBatch message carry at most --max-batch-timesteps timesteps."""
    return ServiceError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"chunks: the message carries {timesteps} timesteps in all; at most {limit} are allowed in one message "
        "(--max-batch-timesteps): split it; nothing of it was applied",
        outcome=NOT_APPLIED,
    )


def queue_full_for_batch(chunks: int, waiting: int, limit: int) -> ServiceError:
    """Invariant 12: a message's chunks are queued all or none, so a full queue refuses the whole message."""
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"server busy: the message's {chunks} chunks do not fit beside the {waiting} already waiting for a batch "
        f"(--max-queued-chunks {limit}); nothing of it was applied, retry it after a short wait",
        outcome=NOT_APPLIED,
    )


def stream_kept_changing(stream_id: str | None) -> ServiceError:
    """Another writer replaced the stream's record under the chunk more often than the batcher retries."""
    return ServiceError(
        grpc.StatusCode.ABORTED, f"stream {stream_id!r} kept changing under this chunk (another writer); retry"
    )


def state_kept_changing(stream_id: str) -> ServiceError:
    """SetStreamState: chunks of the stream kept saving between its read and its compare-and-set until the
    call's deadline; the state was not set."""
    return ServiceError(
        grpc.StatusCode.ABORTED,
        f"stream {stream_id!r} kept changing (chunks being applied) while its state was set, until the deadline; "
        "the state was not set: retry, or stop sending chunks to the stream first",
    )


def slot_from_newer_release(stream_id: str, found: int, newest: int) -> ServiceError:
    """A record written by a newer release (a rolling upgrade under way, or after a rollback): not lost, but
    not for this replica: UNAVAILABLE, so clients and Envoy retry and another replica answers."""
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        f"stream {stream_id!r} was saved by a newer release of the server (record format {found}; this replica "
        f"reads formats up to {newest}); nothing was applied: retry it, a replica of the newer release reads it",
        outcome=NOT_APPLIED,
    )


# --- DATA_LOSS: the stream's record cannot be read. ---

def slot_unreadable(stream_id: str, problem: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.DATA_LOSS,
        f"the saved state of stream {stream_id!r} is unreadable ({problem}); "
        "send reset or call ResetStream to start it again",
    )


# --- UNAUTHENTICATED and RESOURCE_EXHAUSTED: API keys and tenants (invariant 13, docs/invariants.md). ---
# No message ever carries a key.

def missing_api_key() -> ServiceError:
    return ServiceError(
        grpc.StatusCode.UNAUTHENTICATED,
        "this server needs an API key: send the metadata `authorization: Bearer <key>` with every call",
    )


def unknown_api_key() -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAUTHENTICATED, "the API key in `authorization` is not known to this server")


def api_key_withdrawn() -> ServiceError:
    """An open call's key was removed from the key file, or moved to another tenant, by a reload."""
    return ServiceError(
        grpc.StatusCode.UNAUTHENTICATED,
        "the API key of this call was revoked or moved to another tenant when the key file was reloaded; the "
        "call is ended, and the request received after the reload was not applied: open a new call with a "
        "valid key",
    )


def tenant_rate_exceeded(tenant: str, chunks_per_s: float) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"tenant {tenant!r} is over its limit of {chunks_per_s:g} chunks/s on this server; the chunk was not "
        "applied, send it again later",
        outcome=NOT_APPLIED,
    )


def tenant_streams_exceeded(tenant: str, max_streams: int, what: str = "the chunk was not applied") -> ServiceError:
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"tenant {tenant!r} already has its limit of {max_streams} live streams; {what}. "
        "End (`end`) or reset (ResetStream) streams it no longer uses, or wait until idle ones expire",
        outcome=NOT_APPLIED,
    )


# --- INTERNAL: a bug in the server. ---

def internal_error(detail: str) -> ServiceError:
    """An exception nobody expected; `detail` names it (never a Redis error: the store sorts those)."""
    # The prefix tells clients it is the server's own INTERNAL, not a call cut by the transport.
    return ServiceError(grpc.StatusCode.INTERNAL, f"{SERVER_INTERNAL_PREFIX}{detail}")


# --- The Triton / KServe v2 protocol's own errors (server/api/triton.py). ---

def unknown_model(name: str, version: str = "") -> ServiceError:
    """Triton's wording and code (NOT_FOUND), so clients that match on it keep working."""
    what = f"'{name}'" + (f" version {version}" if version else "")
    return ServiceError(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: {what} is not found")


# --- The HTTP/REST port's own errors (server/api/rest.py): a body that never became a request. ---
# Nothing was applied for any of them: the body is read whole and converted before the data plane sees it.

def body_too_large(limit: int) -> ServiceError:
    """HTTP 413: the body passed the limit derived from the largest valid chunk (or --max-message-bytes)."""
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"body: larger than this server's limit of {limit} bytes (the longest valid chunk as JSON, or "
        "--max-message-bytes); nothing was applied: send fewer timesteps per request",
    )


def body_unreadable(problem: str) -> ServiceError:
    """The body ended early (a truncated upload) or could not be read; the request was not applied."""
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"body: {problem}; nothing was applied")


def body_too_slow(seconds: float) -> ServiceError:
    """HTTP 408: a client that sends its body slower than the request deadline holds no handler longer."""
    return ServiceError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"body: not received within {seconds:g} s (--request-deadline-s); nothing was applied",
    )


def no_such_path(method: str, path: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.NOT_FOUND,
        f"no such endpoint: {method} {path[:200]} (KServe v2 under /v2/, the native API under /v1/; README, "
        "\"HTTP/REST\")",
    )


def method_not_allowed(method: str, path: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not served on {path[:200]}")
