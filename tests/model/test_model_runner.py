"""Model hosting: which models load, what they are refused for, and last-step models served per chunk."""

from __future__ import annotations

import os
import uuid

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import pytest
import tensorflow as tf

from devkit.native_calls import outputs, predict
from devkit.references import TOLERANCE, keras_whole_sequence, load_model
from devkit.small_models import build_gru_stateful
from lstm_stream.v1 import stream_pb2 as pb
from server.config import DEFAULT_MODEL, ServerConfig
from server.model.layers import ServingStack
from server.model.runner import ModelLoadError, ModelRunner
from server.types import Runner

pytestmark = pytest.mark.timeout(120)


def load(path, *, xla: bool | None = None, max_batch: int | None = None,
         numpy_max_batch_timesteps: int | None = None) -> ModelRunner:
    """The runner as the server builds it with its default settings, except those given."""
    config = ServerConfig()
    return ModelRunner(path, config.max_chunk_timesteps, xla=config.xla if xla is None else xla,
                       max_batch=config.max_batch if max_batch is None else max_batch,
                       numpy_max_batch_timesteps=config.numpy_max_batch_timesteps
                       if numpy_max_batch_timesteps is None else numpy_max_batch_timesteps)


def save(model: keras.Model, path) -> str:
    model.save(path)
    return str(path)


def test_refuses_models_that_cannot_be_streamed(tmp_path) -> None:
    conv = keras.Sequential([keras.Input((None, 1)), keras.layers.Conv1D(4, 3, padding="causal"),
                             keras.layers.LSTM(4, return_sequences=True)])
    with pytest.raises(ModelLoadError, match="mixes timesteps"):
        load(save(conv, tmp_path / "conv.keras"))
    bidirectional = keras.Sequential([keras.Input((None, 1)),
                                      keras.layers.Bidirectional(keras.layers.LSTM(4, return_sequences=True))])
    with pytest.raises(ModelLoadError, match="depends on later timesteps"):
        load(save(bidirectional, tmp_path / "bi.keras"))
    backwards = keras.Sequential([keras.Input((None, 1)), keras.layers.GRU(4, go_backwards=True)])
    with pytest.raises(ModelLoadError, match="backwards"):
        load(save(backwards, tmp_path / "back.keras"))
    dense = keras.Sequential([keras.Input((None, 1)), keras.layers.Dense(2)])
    with pytest.raises(ModelLoadError, match="no recurrent layer"):
        load(save(dense, tmp_path / "dense.keras"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load(tmp_path / "missing.keras")
    (tmp_path / "junk.keras").write_bytes(b"junk")
    with pytest.raises(ModelLoadError, match="could not load"):
        load(tmp_path / "junk.keras")
    generic_rnn = keras.Sequential([keras.Input((None, 1)), keras.layers.RNN(keras.layers.LSTMCell(4))])
    with pytest.raises(ModelLoadError, match="supported recurrent layers are LSTM, GRU and SimpleRNN"):
        load(save(generic_rnn, tmp_path / "rnn.keras"))
    first, second = keras.Input((None, 1)), keras.Input((None, 1))
    two_inputs = keras.Model([first, second], keras.layers.LSTM(4)(keras.layers.Concatenate()([first, second])))
    with pytest.raises(ModelLoadError, match="the model has 2 inputs"):
        load(save(two_inputs, tmp_path / "two.keras"))
    flat = keras.Sequential([keras.Input((3,)), keras.layers.Reshape((3, 1)), keras.layers.LSTM(4)])
    with pytest.raises(ModelLoadError, match=r"expected \[batch, time, features\]"):
        load(save(flat, tmp_path / "flat.keras"))


def test_the_serving_stack_carries_states_from_one_chunk_to_the_next() -> None:
    """The stateless stack, run eagerly (the runner traces it; tracing hides it from line coverage): a
    sequence in two chunks with the states handed over equals Keras on the whole sequence from zero."""
    model = load_model(str(DEFAULT_MODEL))
    stack = ServingStack(model)
    x = np.random.default_rng(5).normal(size=(1, 30, stack.features)).astype(np.float32)
    first, states = stack.forward(tf.constant(x[:, :12]), tf.zeros((1, stack.state_size)))
    second, _ = stack.forward(tf.constant(x[:, 12:]), states)
    got = np.concatenate([first.numpy(), second.numpy()], axis=1)[0]
    np.testing.assert_allclose(got, keras_whole_sequence(DEFAULT_MODEL, x[0]), atol=TOLERANCE)


def test_describes_stateful_model_and_fingerprints_weights(tmp_path) -> None:
    runner = load(build_gru_stateful(tmp_path / "g.keras"))
    assert isinstance(runner, Runner)
    description = runner.description
    assert description.input_features == 3 and description.output_size == 2
    assert description.state_size == 24 + 12
    assert [(layer.kind, layer.units) for layer in description.recurrent_layers] == [("GRU", 24), ("SimpleRNN", 12)]
    model = keras.models.load_model(tmp_path / "g.keras")
    model.layers[-1].set_weights([w + 1e-3 for w in model.layers[-1].get_weights()])
    model.save(tmp_path / "g2.keras")
    assert load(tmp_path / "g2.keras").description.fingerprint != description.fingerprint
    assert load(tmp_path / "g.keras").description.fingerprint == description.fingerprint


@pytest.mark.timeout(180)
def test_last_step_model_answers_one_row_per_chunk(last_step_server, small_models) -> None:
    server, model_path = last_step_server, small_models["last_step"]
    info = server.stub.GetModel(pb.GetModelRequest())
    assert not info.per_timestep_outputs and info.output_size == 3
    stream = f"last-{uuid.uuid4().hex[:8]}"
    x = np.random.default_rng(2).normal(size=(30, 2)).astype(np.float32)
    for start, stop in ((0, 7), (7, 8), (8, 30)):
        reply = predict(server.stub, stream, x[start:stop])
        assert reply.timesteps == 1 and reply.offset == stop
        expected = keras_whole_sequence(model_path, x[:stop])
        assert np.max(np.abs(outputs(reply) - expected)) <= TOLERANCE


def test_xla_shapes_compile_in_the_background_and_agree_with_the_generic_call(tmp_path) -> None:
    from devkit.processes import wait_until
    from server.config import DEFAULT_MODEL

    # The NumPy twin takes batches of up to 10 chunks x timesteps: the warm-up compiles the buckets of 4 and 8
    # chunks of 5 steps (1 and 2 would never reach XLA), and the batch checked below (3 x 5) is over it.
    runner = load(DEFAULT_MODEL, max_batch=8, numpy_max_batch_timesteps=10)
    generic = load(DEFAULT_MODEL, xla=False, numpy_max_batch_timesteps=0)
    runner.warm_up((5,))
    xla = runner._xla
    wait_until(lambda: {(False, b, 5) for b in (4, 8)} <= set(xla._ready), 60,
               "XLA shapes for batches of 4 and 8 chunks of 5 steps")
    assert xla.lookup(False, 3, 5) is not None
    assert_agrees_with_generic(runner, generic, batch=3, timesteps=5, seed=3)  # a batch of 3 runs padded to 4
    runner.close()


def assert_agrees_with_generic(runner: ModelRunner, generic: ModelRunner, *, batch: int, timesteps: int,
                               seed: int) -> None:
    """One batch of random chunks and states through `runner` equals the uncompiled call, outputs and states."""
    rng = np.random.default_rng(seed)
    chunks = [rng.normal(size=(timesteps, 1)).astype(np.float32) for _ in range(batch)]
    states = rng.normal(0, 0.1, size=(batch, runner.state_size)).astype(np.float32)
    got, got_states = runner.run(chunks, states)
    want, want_states = generic.run(chunks, states)
    assert got_states.shape == (batch, runner.state_size)
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(got, want, strict=True)) <= 1e-5
    assert float(np.max(np.abs(got_states - want_states))) <= 1e-5


def test_shapes_whose_batches_all_run_on_the_numpy_twin_are_not_compiled() -> None:
    from devkit.processes import wait_until
    from server.config import DEFAULT_MODEL

    runner = load(DEFAULT_MODEL, max_batch=64)  # the twin serves up to 512 chunks x timesteps
    generic = load(DEFAULT_MODEL, xla=False, numpy_max_batch_timesteps=0)
    xla = runner._xla
    runner.warm_up((1, 20))
    over_the_limit = {(False, 32, 20), (False, 64, 20)}  # 32 x 20 = 640; 16 x 20 and 64 x 1 are within it
    wait_until(lambda: over_the_limit <= xla._ready, 120, "the shapes of 32 and 64 chunks of 20 steps")
    assert xla._queued == over_the_limit
    assert xla.lookup(False, 26, 20) == 32  # 26 x 20 = 520: over the limit, served compiled
    assert_agrees_with_generic(runner, generic, batch=26, timesteps=20, seed=5)
    runner.close()


def test_batches_over_16_are_padded_by_at_most_a_quarter() -> None:
    from server.model.shapes import XlaShapes as _XlaShapes

    assert [_XlaShapes.bucket(b) for b in (1, 3, 5, 9, 16)] == [1, 4, 8, 16, 16]
    fine = (17, 21, 32, 33, 41, 57, 64, 65, 100)
    assert [_XlaShapes.bucket(b) for b in fine] == [20, 24, 32, 40, 48, 64, 64, 80, 112]
    assert all(_XlaShapes.bucket(b) <= 1.25 * b for b in range(17, 1025))


def test_a_batch_runs_on_its_power_of_two_until_its_finer_bucket_is_compiled() -> None:
    from devkit.processes import wait_until
    from server.config import DEFAULT_MODEL

    # The NumPy twin takes batches of up to 63 chunks x timesteps: the warm-up compiles only the buckets of
    # 32 and 64 chunks of 2 steps (the smaller ones would never reach XLA), and every batch below is over it.
    runner = load(DEFAULT_MODEL, max_batch=64, numpy_max_batch_timesteps=63)
    generic = load(DEFAULT_MODEL, xla=False, numpy_max_batch_timesteps=0)
    xla = runner._xla
    runner.warm_up((2,))
    wait_until(lambda: (False, 64, 2) in xla._ready, 120, "the warm-up's power-of-two shapes")
    assert xla._ready == {(False, 32, 2), (False, 64, 2)}  # start-up compiles powers of two only
    assert xla.lookup(False, 33, 2) == 64  # served compiled at once, its own bucket queued
    wait_until(lambda: xla.lookup(False, 33, 2) == 40, 60, "the bucket of 40 chunks to compile")
    assert xla.lookup(False, 33, 3) is None  # a length not warmed up: its power of two is compiled, as before
    wait_until(lambda: xla.lookup(False, 33, 3) == 64, 60, "the bucket of 64 chunks of 3 steps to compile")
    assert_agrees_with_generic(runner, generic, batch=33, timesteps=2, seed=4)  # on the bucket of 40
    runner.close()
