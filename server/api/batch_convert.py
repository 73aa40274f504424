"""PredictBatch messages <-> chunks and answers: the conversion of the native API's many-chunk messages.

A message is checked as a whole first (its number of chunks and timesteps, the size of its values block:
invariants 12 and 17, docs/invariants.md), then chunk by chunk: a bad chunk becomes its own ServiceError
and the others go on (invariant 17). With the
values in one block (`PredictBatchRequest.values`), the block is read as one NumPy view: no Python object
per value, and each chunk's values are a slice of it; the answer's outputs are written back as one block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from lstm_stream.v1 import stream_pb2 as pb
from lstm_stream.wire import MAX_REQUEST_ID_CHARS, status_number
from server.api.validation import PLAIN_STREAM_ID, make_chunk
from server.errors import ServiceError, batch_too_many_chunks, batch_too_many_timesteps, invalid_argument
from server.types import Chunk, Prediction

# A request's model name -> the served model's name and its input features; raises ServiceError (NOT_FOUND).
ModelShapes = Callable[[str], tuple[str, int]]

LITTLE_ENDIAN_FLOAT32 = np.dtype("<f4")


class BatchLimits:
    """What one PredictBatch message may carry (ServerConfig's max_batch_chunks and max_batch_timesteps)."""

    __slots__ = ("chunks", "timesteps")

    def __init__(self, chunks: int, timesteps: int) -> None:
        self.chunks = chunks
        self.timesteps = timesteps


def batch_chunks(
    request: pb.PredictBatchRequest,
    *,
    models: ModelShapes,
    max_timesteps: int,
    limits: BatchLimits,
    tenant: str,
    deadline: float,
) -> list[Chunk | ServiceError]:
    """The message's chunks, validated one by one; raises ServiceError when the message is refused whole."""
    requests = request.chunks
    if len(requests) > limits.chunks:
        raise batch_too_many_chunks(len(requests), limits.chunks)
    declared = [r.timesteps for r in requests]
    total = sum(declared)
    if total > limits.timesteps:
        raise batch_too_many_timesteps(total, limits.timesteps)
    shapes = _models_of(requests, models, whole=bool(request.values))
    # Values per chunk: timesteps x its model's features (one model's, in the common case).
    widths = [declared[i] * shape[1] if not isinstance(shape, ServiceError) else 0 for i, shape in enumerate(shapes)]
    block: np.ndarray | None = None
    if request.values:
        if len(request.values) % 4:
            raise invalid_argument("values", f"is {len(request.values)} bytes long: not whole float32 values")
        block = np.frombuffer(request.values, dtype=LITTLE_ENDIAN_FLOAT32)
        if block.size != sum(widths):
            raise invalid_argument(
                "values", f"has {block.size} values; the chunks' timesteps add up to {total}, times their models' "
                f"features = {sum(widths)}"
            )
    # One pass over the whole block: the chunks without a NaN or an Inf skip that check, and only the others
    # are checked one by one (to name the value in their error).
    finite = [block is not None] * len(requests)
    if block is not None and not (flags := np.isfinite(block)).all():
        ends = np.cumsum(np.asarray(widths, dtype=np.int64))
        for index in set(np.searchsorted(ends, np.flatnonzero(~flags), side="right").tolist()):
            finite[index] = False
    chunks: list[Chunk | ServiceError] = []
    start = 0
    for index, (chunk_request, timesteps, known_finite, shape, width) in enumerate(zip(
            requests, declared, finite, shapes, widths, strict=True)):
        if isinstance(shape, ServiceError):
            chunks.append(shape)
            continue
        if block is not None:
            if chunk_request.values:
                raise invalid_argument(f"chunks[{index}].values", "must be empty when the message's values are set")
            values = block[start:start + width]
            start += width
            if known_finite and 0 < timesteps <= max_timesteps and not chunk_request.reset:
                stream_id, request_id = chunk_request.stream_id, chunk_request.request_id
                if PLAIN_STREAM_ID.fullmatch(stream_id) and len(request_id) <= MAX_REQUEST_ID_CHARS:
                    # The common case, every check of make_chunk's passed on sight (a printable ASCII id, no reset
                    # whose offset needs checking): built directly, positionally in Chunk's field order (this
                    # runs once per chunk). make_chunk below gives any other chunk its error.
                    chunks.append(Chunk(
                        stream_id, values.reshape(timesteps, shape[1]),
                        chunk_request.start_offset if chunk_request.HasField("start_offset") else None,
                        False, chunk_request.end, request_id, False, deadline, tenant, None, shape[0],
                        chunk_request.model_version,
                    ))
                    continue
        else:
            values = np.asarray(chunk_request.values, dtype=np.float32)
        try:
            chunks.append(make_chunk(
                stream_id=chunk_request.stream_id,
                values=values,
                timesteps=timesteps,
                features=shape[1],
                max_timesteps=max_timesteps,
                start_offset=chunk_request.start_offset if chunk_request.HasField("start_offset") else None,
                reset=chunk_request.reset,
                end=chunk_request.end,
                request_id=chunk_request.request_id,
                tenant=tenant,
                deadline=deadline,
                known_finite=known_finite,
                model=shape[0],
                model_version=chunk_request.model_version,
            ))
        except ServiceError as exc:
            chunks.append(exc)
    return chunks


def _models_of(requests: Sequence[pb.PredictRequest], models: ModelShapes, *, whole: bool
               ) -> list[tuple[str, int] | ServiceError]:
    """Each chunk's model and features, looked up once per name. A chunk naming no served model fails alone,
    except in a message with one values block: its slices cannot be told apart then, so the message is refused."""
    found: dict[str, tuple[str, int] | ServiceError] = {}
    shapes: list[tuple[str, int] | ServiceError] = []
    for index, chunk in enumerate(requests):
        name = chunk.model
        if name not in found:
            try:
                found[name] = models(name)
            except ServiceError as exc:
                if whole:
                    raise invalid_argument(f"chunks[{index}].model", exc.message) from None
                found[name] = exc
        shapes.append(found[name])
    return shapes


def error_result(request: pb.PredictRequest, error: ServiceError) -> pb.PredictResponse:
    """A failed chunk's answer, on PredictStream and in a PredictBatch result: the stream and request id echoed,
    `offset` the stream's (on FAILED_PRECONDITION) or 0, no outputs."""
    return pb.PredictResponse(
        stream_id=request.stream_id,
        request_id=request.request_id,
        offset=error.current_offset or 0,
        error=pb.Error(code=status_number(error.code), message=error.message),
    )


def batch_response(
    request: pb.PredictBatchRequest, answers: list[Prediction | ServiceError]
) -> pb.PredictBatchResponse:
    """One result per chunk, in order; the outputs in one block when the request's values came in one."""
    response = pb.PredictBatchResponse()
    results = response.results
    add = results.add
    packed = bool(request.values)
    blocks: list[bytes] = []
    for chunk_request, answer in zip(request.chunks, answers, strict=True):
        if isinstance(answer, ServiceError):
            results.append(error_result(chunk_request, answer))
            continue
        outputs = answer.outputs
        rows, columns = outputs.shape
        # Fields left at their defaults are not passed: each keyword costs as much as a set field.
        result = add(stream_id=answer.stream_id or "", timesteps=rows, output_size=columns, offset=answer.offset)
        if answer.replayed:
            result.replayed = True
        if answer.request_id:
            result.request_id = answer.request_id
        if answer.model_version:
            result.model_version = answer.model_version
        if answer.migration:
            set_migration(result, answer)
        if not packed:
            result.outputs.extend(outputs.reshape(-1).tolist())
        elif outputs.dtype == LITTLE_ENDIAN_FLOAT32:
            blocks.append(outputs.tobytes())
        else:
            blocks.append(outputs.astype(LITTLE_ENDIAN_FLOAT32).tobytes())
    if packed:
        response.outputs = b"".join(blocks)
    return response


def set_migration(response: pb.PredictResponse, prediction: Prediction) -> None:
    """The answer says how the chunk moved its stream off a retired version, when it did (invariant 14)."""
    if prediction.migration:
        migration = response.migration
        migration.from_version, migration.policy = prediction.migrated_from, prediction.migration
        if prediction.migration == "replay":
            migration.history_start = prediction.history_start


def refused_response(error: ServiceError) -> pb.PredictBatchResponse:
    """PredictBatchStream's answer to a message refused whole: the stream goes on."""
    return pb.PredictBatchResponse(error=pb.Error(code=status_number(error.code), message=error.message))
