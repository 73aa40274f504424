"""The caller's arrays and the requests' pieces: checking a chunk's shape, splitting a chunk longer than
the server takes, and joining the answers back into one array per chunk."""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import Any

import numpy as np

from lstm_stream.client.errors import InvalidInput
from lstm_stream.client.types import ModelInfo
from lstm_stream.v1 import stream_pb2 as pb

Chunks = Iterable[Any] | AsyncIterable[Any]
LITTLE_ENDIAN_FLOAT32 = np.dtype("<f4")


def as_input(values: Any, model: ModelInfo) -> np.ndarray:
    """`values` as float32 [timesteps, features] (1-D accepted for a one-feature model), or InvalidInput."""
    x = np.asarray(values, dtype=np.float32)
    if x.ndim == 1 and model.input_features == 1:
        x = x.reshape(-1, 1)
    if x.ndim != 2 or x.shape[1] != model.input_features:
        raise InvalidInput(f"values: expected an array [timesteps, {model.input_features}]"
                           + (" (or 1-D)" if model.input_features == 1 else "") + f", got shape {x.shape}")
    if x.shape[0] == 0:
        raise InvalidInput("values: a chunk needs at least one timestep")
    return x


def pieces(x: np.ndarray, limit: int) -> list[np.ndarray]:
    """`x` cut into requests of at most `limit` timesteps (0: no limit)."""
    limit = limit or x.shape[0]
    return [x[start:start + limit] for start in range(0, x.shape[0], limit)]


def outputs_of(response: pb.PredictResponse) -> np.ndarray:
    return np.asarray(response.outputs, dtype=np.float32).reshape(response.timesteps, response.output_size)


def batch_request(chunks: list[pb.PredictRequest], values: list[np.ndarray]) -> pb.PredictBatchRequest:
    """A PredictBatch message: the chunks (their own `values` empty) and their values in one block of
    little-endian float32, chunk after chunk."""
    block = b"".join(x.astype(LITTLE_ENDIAN_FLOAT32, copy=False).tobytes() for x in values)
    return pb.PredictBatchRequest(chunks=chunks, values=block)


def batch_outputs(response: pb.PredictBatchResponse) -> list[np.ndarray | None]:
    """Each result's outputs [timesteps, output_size], from the response's block (or the results' own
    outputs); None for a failed chunk's result."""
    block = np.frombuffer(response.outputs, dtype=LITTLE_ENDIAN_FLOAT32)
    answers: list[np.ndarray | None] = []
    start = 0
    for result in response.results:
        if result.HasField("error"):
            answers.append(None)
        elif response.outputs:
            size = result.timesteps * result.output_size
            answers.append(block[start:start + size].reshape(result.timesteps, result.output_size))
            start += size
        else:
            answers.append(outputs_of(result))
    return answers


def join(parts: list[np.ndarray], model: ModelInfo) -> np.ndarray:
    # A last-step model answers one row per request; a split chunk's answer is its last piece's row.
    return np.concatenate(parts) if model.per_timestep_outputs else parts[-1]


async def aiter_chunks(chunks: Chunks) -> AsyncIterator[Any]:
    """An iterable or an async iterable, read as an async one."""
    if isinstance(chunks, AsyncIterable):
        async for chunk in chunks:
            yield chunk
    else:
        for chunk in chunks:
            yield chunk
