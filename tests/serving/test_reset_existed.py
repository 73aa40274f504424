"""`ResetStream.existed` says what `GetStream.exists` said just before (issue 23; the proto's comment).

After a chunk with `end`, the server keeps a short-lived record only to answer retries of that chunk:
the stream itself no longer exists, so GetStream says `exists=false`, and a reset then answers
`existed=false` too (it used to answer true, contradicting GetStream).
"""

from __future__ import annotations

import uuid

import numpy as np

from devkit.native_calls import predict
from lstm_stream.v1 import stream_pb2 as pb


def _chunk(length: int) -> np.ndarray:
    return np.random.default_rng(length).normal(size=(length, 1)).astype(np.float32)


def _exists(stub, stream: str) -> bool:
    return stub.GetStream(pb.GetStreamRequest(stream_id=stream)).exists


def _reset(stub, stream: str) -> bool:
    return stub.ResetStream(pb.ResetStreamRequest(stream_id=stream)).existed


def test_reset_after_end_agrees_with_get_stream(default_server) -> None:
    stub, stream = default_server.stub, f"reset-after-end-{uuid.uuid4().hex[:8]}"
    predict(stub, stream, _chunk(5))
    predict(stub, stream, _chunk(3), end=True)
    assert not _exists(stub, stream)
    assert not _reset(stub, stream)


def test_reset_of_a_live_stream_and_of_an_unknown_one(default_server) -> None:
    stub, stream = default_server.stub, f"reset-live-{uuid.uuid4().hex[:8]}"
    assert not _exists(stub, stream) and not _reset(stub, stream)
    predict(stub, stream, _chunk(4))
    assert _exists(stub, stream)
    assert _reset(stub, stream)
    assert not _exists(stub, stream) and not _reset(stub, stream)
