"""The internal request and answer types every protocol edge converts to and from.

The native API and the Triton/KServe protocol are thin servicers over one path:
`Chunk -> DataPlane.predict -> Prediction`. Nothing here knows about protobuf, Redis or Keras.
Below the data plane, the batcher and the processor share the batch results defined here, and the
processor sees the model only through the runner interface `Runner`: it imports neither the batcher
that calls it nor the Keras runner (nor TensorFlow).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from server.errors import ServiceError

# (tenant, stream_id): what makes a stream one stream. The tenant is "" on a server without API keys.
StreamKey = tuple[str, str]


@dataclass(slots=True)
class StageTimes:
    """When one chunk passed each stage of the data path, in time.monotonic_ns(); 0: not reached.

    An edge that reports stages (the Triton protocol's ModelStatistics) hands one in with its Chunk and
    reads it once answered; the batcher and the batch processor fill it in. A chunk run again after a
    conflict keeps the times of its last batch.
    """

    queued: int = 0  # handed to the data plane
    batch_started: int = 0  # its batch left the queue: slots load from Redis, the stream rules apply
    model_started: int = 0  # the model call began (0: answered without it, e.g. a replayed retry)
    model_finished: int = 0  # the model call ended: slots save to Redis
    batch_finished: int = 0  # the batch's answers are ready
    model_batch: int = 0  # chunks in that model call
    # That model call, shared with the other chunks of it that carry times (tracing links them: one span per call).
    call: ModelCall | None = None
    # The edge's trace of the request this chunk belongs to (server/api/tracing.py); opaque to the data path.
    trace: object | None = None

    def batch_began(self, now_ns: int) -> None:
        self.batch_started = now_ns
        self.model_started = self.model_finished = self.model_batch = 0
        self.call = None

    def model_ran(self, started_ns: int, finished_ns: int, chunks: int, call: ModelCall | None = None) -> None:
        self.model_started, self.model_finished, self.model_batch = started_ns, finished_ns, chunks
        self.call = call


@dataclass(slots=True, eq=False)
class ModelCall:
    """One model call, as the chunks in it that carry StageTimes see it: who else was in it (a batch's model span
    links to every request in it), and the edge's mark that its span is out, so it is written once."""

    members: list[StageTimes]
    span: object | None = None  # set by the edge that wrote the call's span (server/api/tracing.py)


# Chunk, Prediction (and the state record) are built once per chunk: plain slotted dataclasses, never changed
# once built. A frozen one's __init__ (object.__setattr__ per field) costs about four times as much.
@dataclass(slots=True)
class Chunk:
    """Consecutive timesteps of one stream, already validated.

    `values` is float32 [timesteps, features]. `stream_id` None means one-shot inference from zero
    state that saves nothing (Keras `stateful=False`), used by the Triton protocol without a sequence.
    """

    stream_id: str | None
    values: np.ndarray
    start_offset: int | None = None
    reset: bool = False
    end: bool = False
    request_id: str = ""
    # Refuse (FAILED_PRECONDITION) instead of starting from zero when the stream has no state and the
    # chunk does not reset: Triton's rule that a sequence must begin with its START flag.
    must_exist: bool = False
    # time.monotonic() by which the caller needs its answer: the caller's gRPC deadline, capped by
    # --request-deadline-s (also used when it set none). The server keeps retrying Redis until then, and
    # finds out whether a save whose answer was lost landed (invariant 9, docs/invariants.md).
    deadline: float | None = None
    # The API key's tenant (invariant 13, docs/invariants.md); "" when the server has no keys.
    tenant: str = ""
    # Filled in on the way through the data path when the edge asked (None: nobody reads them).
    times: StageTimes | None = field(default=None, compare=False)
    # The model it runs on (its name, resolved by the edge: server/dataplane/plane.py `served`), and the version
    # its first chunk asks a new sequence to start on (0: the newest).
    model: str = ""
    model_version: int = 0

    @property
    def timesteps(self) -> int:
        return len(self.values)

    @property
    def stream(self) -> StreamKey | None:
        """The stream's identity: two tenants' streams with the same id are two streams."""
        return None if self.stream_id is None else (self.tenant, self.stream_id)


@dataclass(slots=True)
class Prediction:
    """The model's answer to one chunk.

    `outputs` is float32 [rows, output_size]: one row per timestep for a per-timestep model, one row
    (the chunk's last step) for a last-step model. `offset` is the stream's offset after the chunk.
    """

    stream_id: str | None
    outputs: np.ndarray
    offset: int
    replayed: bool = False
    request_id: str = ""
    # The model version that answered (0: unknown, a replay of a version this process never served), and how
    # the chunk moved its stream off a retired version `migrated_from` (0: another model's slot): "" not moved,
    # "reset" (a new sequence), "replay" (its state rebuilt from the inputs kept since offset `history_start`).
    model_version: int = 0
    migration: str = ""
    migrated_from: int = 0
    history_start: int = 0


@dataclass(frozen=True, slots=True)
class StreamStatus:
    stream_id: str
    exists: bool
    offset: int = 0
    updated_unix_ms: int = 0
    expires_in_ms: int = 0
    model_fingerprint: str = ""
    model: str = ""
    model_version: int = 0


@dataclass(frozen=True, slots=True)
class StateTensor:
    """One state of one recurrent layer of one stream (server/model/state_layout.py): `name` is
    "<layer name>/<index>" in Keras order, `shape` one stream's (no batch axis), `values` float32, flat."""

    name: str
    shape: tuple[int, ...]
    values: np.ndarray


@dataclass(frozen=True, slots=True)
class StreamState:
    """A stream's recurrent state as named tensors, in the model's layer order, and its offset: what
    GetStreamState answers and SetStreamState writes (invariant 15, docs/invariants.md)."""

    stream_id: str
    offset: int
    tensors: tuple[StateTensor, ...]
    model: str = ""  # the model's name ("" on SetStreamState: the server's only model)
    model_version: int = 0  # 0 on SetStreamState: the newest


@dataclass(frozen=True, slots=True)
class RecurrentLayerInfo:
    name: str
    kind: str
    units: int


@dataclass(frozen=True, slots=True)
class ModelDescription:
    """What clients need to know about the hosted model."""

    name: str
    fingerprint: str
    input_features: int
    output_size: int
    per_timestep_outputs: bool
    state_size: int
    recurrent_layers: tuple[RecurrentLayerInfo, ...] = field(default_factory=tuple)


@runtime_checkable
class Runner(Protocol):
    """What the data path needs of a model runner: the Keras one (server/model/runner.py) or the benchmark's
    identity stand-in (server/model/identity.py). A slot is one stream's states, float32 [state_size]."""

    description: ModelDescription
    state_size: int
    max_chunk_timesteps: int

    def zero_states(self, batch: int) -> np.ndarray:
        """float32 [batch, state_size]: the states of streams that start from nothing."""
        ...

    def run(self, inputs: list[np.ndarray], states: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """One chunk per stream (float32 [timesteps, features] each) and their states [batch, state_size] in;
        their outputs (float32 [rows, output_size] each) and new states [batch, state_size] out."""
        ...

    def warm_up(self, timesteps: tuple[int, ...] = ()) -> None:
        """Prepare the calls for chunks of these lengths before the first request needs them."""
        ...

    def close(self) -> None:
        """Release threads and compiled calls."""
        ...


class Conflict:
    """A batch result meaning: the slot changed under this chunk (another replica); run it again."""


CONFLICT = Conflict()
# What the processor answers for each chunk of a batch, and the batcher hands back to its caller.
BatchResult = Prediction | ServiceError | Conflict
