"""Small helpers to call the native API from tests."""

from __future__ import annotations

import grpc
import numpy as np

from lstm_stream.v1 import stream_pb2 as pb


def request(stream_id: str, x: np.ndarray, *, start_offset: int | None = None, **flags: object) -> pb.PredictRequest:
    message = pb.PredictRequest(stream_id=stream_id, values=x.astype(np.float32).ravel(), timesteps=x.shape[0],
                                **flags)
    if start_offset is not None:
        message.start_offset = start_offset
    return message


def outputs(response: pb.PredictResponse) -> np.ndarray:
    return np.asarray(response.outputs, dtype=np.float32).reshape(response.timesteps, response.output_size)


def predict(stub, stream_id: str, x: np.ndarray, *, start_offset: int | None = None, timeout: float = 30,
            **flags: object) -> pb.PredictResponse:
    return stub.Predict(request(stream_id, x, start_offset=start_offset, **flags), timeout=timeout)


def status_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    """Run a call that must fail; return its code, message and trailing metadata."""
    try:
        call(*args, **kwargs)
    except grpc.RpcError as error:
        return error.code(), error.details(), dict(error.trailing_metadata() or ())
    raise AssertionError("the call succeeded but was expected to fail")
