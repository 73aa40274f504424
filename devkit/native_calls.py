"""Small calls to the native API (lstm_stream.v1), for tests and checks that drive a server by hand."""

from __future__ import annotations

import uuid

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


def continue_a_stream(stub) -> None:
    """A new stream's first chunk, then the next one continuing it: the server reads back what it saved."""
    stream = f"continue-{uuid.uuid4().hex[:6]}"
    x = np.ones((3, 1), np.float32)
    assert predict(stub, stream, x, reset=True).offset == 3
    assert predict(stub, stream, x, start_offset=3).offset == 6
