"""GetStreamState and SetStreamState messages <-> the internal `StreamState` (server/types.py): stateless
converters, as triton_convert.py is for its protocol. What the tensors must be (names, shapes, values) is
the model's layout, checked by the data plane (server/model/state_layout.py)."""

from __future__ import annotations

import numpy as np

from lstm_stream.v1 import stream_pb2 as pb
from server.api.validation import check_stream_id
from server.types import StateTensor, StreamState


def state_from_proto(message: pb.StreamState) -> StreamState:
    """A SetStreamState request as a StreamState; INVALID_ARGUMENT for a bad stream id."""
    tensors = tuple(
        StateTensor(tensor.name, tuple(tensor.shape), np.asarray(tensor.values, dtype=np.float32))
        for tensor in message.tensors
    )
    return StreamState(check_stream_id(message.stream_id), message.offset, tensors, message.model,
                       message.model_version)


def state_to_proto(state: StreamState) -> pb.StreamState:
    return pb.StreamState(
        stream_id=state.stream_id, model=state.model, model_version=state.model_version, offset=state.offset,
        tensors=[pb.StateTensor(name=t.name, shape=list(t.shape), values=t.values.tolist()) for t in state.tensors],
    )
