"""The seed's semantics, literally: Keras `stateful=True` rows continue across batches; here streams do.

The Keras answer: with stateful=True, row i of batch k continues row i of batch k-1, until
reset_states(). We feed the same chunks both ways, as rows of a stateful Keras model and as streams
of the server, and require the same outputs, including after a reset of one stream alone.
"""

from __future__ import annotations

import numpy as np
import pytest

from devkit.native_calls import outputs, predict
from devkit.references import TOLERANCE, load_model
from lstm_stream.v1 import stream_pb2 as pb

ROWS = 4  # the batch size of small_models["gru_stateful"]


@pytest.mark.timeout(180)
def test_stream_slots_behave_like_stateful_rows(gru_stateful_server, small_models) -> None:
    server = gru_stateful_server
    model = load_model(str(small_models["gru_stateful"]))
    assert model.inputs[0].shape[0] == ROWS
    for layer in model.layers:
        if getattr(layer, "stateful", False):
            layer.reset_state()
    rng = np.random.default_rng(5)
    streams = [f"seed-row-{row}" for row in range(ROWS)]
    for stream in streams:
        server.stub.ResetStream(pb.ResetStreamRequest(stream_id=stream))

    for batch_number in range(4):
        batch = rng.normal(size=(ROWS, 7, 3)).astype(np.float32)
        if batch_number == 2:
            # reset_states() for row 1 alone: Keras can only zero all rows, so zero row 1's variables by hand.
            for layer in model.layers:
                if getattr(layer, "stateful", False):
                    for state in layer.states:
                        value = np.asarray(state.numpy())
                        value[1] = 0
                        state.assign(value)
            server.stub.ResetStream(pb.ResetStreamRequest(stream_id=streams[1]))
        keras_rows = np.asarray(model(batch, training=False))
        # Send the rows in a different order each time: the slot follows the stream, not the position.
        for row in rng.permutation(ROWS):
            reply = predict(server.stub, streams[row], batch[row])
            diff = float(np.max(np.abs(outputs(reply) - keras_rows[row])))
            assert diff <= TOLERANCE, f"batch {batch_number} row {row}: {diff}"
