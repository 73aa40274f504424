"""The model's NumPy twin (server/model/numpy_twin.py): small batches run without a TensorFlow call.

Invariant 1 (docs/invariants.md) must hold whichever path a batch takes: the twin is compared here with
the TensorFlow path and with Keras for every layer kind it computes, on chunks of equal and of different
lengths; tests/serving/test_continuation.py runs the whole server on each path alone against Keras.
"""

from __future__ import annotations

import logging
import os
import warnings

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
import pytest

from devkit.references import TOLERANCE, keras_whole_sequence
from devkit.small_models import build_gru_stateful, build_last_step
from server import metrics
from server.config import DEFAULT_MODEL
from server.model import numpy_twin
from server.model import runner as runner_module
from server.model.numpy_twin import NumpyTwin, Unsupported
from server.model.runner import ModelRunner
from tests.model.test_model_runner import load

pytestmark = pytest.mark.timeout(120)


def build_every_option(path) -> str:
    """The twin's other arithmetic: GRU without reset_after and without bias, SimpleRNN with relu, LSTM
    without bias returning its last step, dropout, and activations after Dense."""
    keras.utils.set_random_seed(5)
    model = keras.Sequential([
        keras.Input(shape=(None, 2)),
        keras.layers.GRU(12, return_sequences=True, reset_after=False, use_bias=False),
        keras.layers.Dropout(0.5),
        keras.layers.SimpleRNN(10, return_sequences=True, activation="relu"),
        keras.layers.Dense(8, activation="sigmoid"),
        keras.layers.Activation("tanh"),
        keras.layers.LSTM(6, use_bias=False),
        keras.layers.Dense(3, activation="relu"),
    ], name="every_option")
    model.save(path)
    return str(path)


def build_lstm_stack(path) -> str:
    """Four stacked LSTM layers of different widths, the last returning its last step: two pairs that
    run as one at small batches (numpy_twin._LSTMPair), the second pair ending in a last step."""
    keras.utils.set_random_seed(6)
    model = keras.Sequential([
        keras.Input(shape=(None, 2)),
        keras.layers.LSTM(8, return_sequences=True),
        keras.layers.LSTM(5, return_sequences=True),
        keras.layers.LSTM(7, return_sequences=True),
        keras.layers.LSTM(6),
        keras.layers.Dense(2),
    ], name="lstm_stack")
    model.save(path)
    return str(path)


MODELS = {
    "default": lambda tmp: str(DEFAULT_MODEL),
    "lstm-stack": lambda tmp: build_lstm_stack(tmp / "stack.keras"),
    "gru-simplernn": lambda tmp: str(build_gru_stateful(tmp / "gru.keras")),
    "lstm-gru-last-step": lambda tmp: str(build_last_step(tmp / "last.keras")),
    "every-option": lambda tmp: build_every_option(tmp / "every.keras"),
}


def random_batch(runner: ModelRunner, lengths: list[int], seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    chunks = [rng.normal(0, 1.5, size=(length, runner.features)).astype(np.float32) for length in lengths]
    states = rng.normal(0, 0.5, size=(len(lengths), runner.state_size)).astype(np.float32)
    return chunks, states


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("name", list(MODELS))
def test_twin_equals_tensorflow_and_keras(name, tmp_path) -> None:
    path = MODELS[name](tmp_path)
    runner = load(path, xla=False)
    assert runner._twin is not None, f"{name}: no NumPy twin"
    batch = 4 if name == "gru-simplernn" else 5  # a stateful model's fixed batch size
    for seed, lengths in enumerate(([1] * batch, [7] * batch, [1, 9, 3, 9, 2][:batch], [20, 1, 1, 5, 13][:batch])):
        chunks, states = random_batch(runner, lengths, seed)
        twin_outputs, twin_states = runner._twin.run(chunks, states)
        tf_outputs, tf_states = runner._run_tensorflow(chunks, states)
        assert [o.shape for o in twin_outputs] == [o.shape for o in tf_outputs]
        assert max_diff(twin_outputs, tf_outputs) <= TOLERANCE, (name, lengths)
        assert float(np.max(np.abs(twin_states - tf_states))) <= TOLERANCE, (name, lengths)

    # One sequence cut into chunks on the twin alone equals Keras on the whole of it.
    x = np.random.default_rng(9).normal(0, 1.5, size=(31, runner.features)).astype(np.float32)
    states, got = runner.zero_states(batch), []
    for start, stop in ((0, 1), (1, 8), (8, 9), (9, 31)):
        outputs, states = runner._twin.run([x[start:stop]] * batch, states)
        got.append(outputs[0])
    expected = keras_whole_sequence(path, x)
    chunked = np.concatenate(got) if runner.per_timestep_outputs else got[-1].reshape(1, -1)
    assert float(np.max(np.abs(chunked - expected))) <= TOLERANCE
    runner.close()


def test_stacked_lstm_layers_run_as_one_pair_at_small_batches(tmp_path, monkeypatch) -> None:
    path = build_lstm_stack(tmp_path / "stack.keras")
    runner = load(path, xla=False)
    assert runner._twin is not None and sorted(runner._twin._pairs) == [0, 1, 2]  # layers 0+1, then 2+3
    pair_runs = []
    real_run = numpy_twin._LSTMPair.run
    monkeypatch.setattr(numpy_twin._LSTMPair, "run", lambda pair, *args: pair_runs.append(1) or real_run(pair, *args))
    most, least = numpy_twin._LSTMPair.MAX_ROWS, numpy_twin._LSTMPair.MIN_STEPS
    for lengths, fused in (([least] * most, 2), ([20], 2), ([20] * most, 2), ([least] * (most + 1), 0),
                           ([least - 1] * most, 0), ([20, 4, 7], 0)):
        pair_runs.clear()
        chunks, states = random_batch(runner, lengths, seed=len(lengths))
        twin_outputs, twin_states = runner._twin.run(chunks, states)
        tf_outputs, tf_states = runner._run_tensorflow(chunks, states)
        assert len(pair_runs) == fused, lengths
        assert max_diff(twin_outputs, tf_outputs) <= TOLERANCE, lengths
        assert float(np.max(np.abs(twin_states - tf_states))) <= TOLERANCE, lengths
    runner.close()


def test_saturated_gates_give_their_limits_without_warnings() -> None:
    """The twin's gates are 1 / (1 + exp(-x)) (numpy_twin._Gates): inputs large enough that exp overflows
    to inf give the limits 0 and 1, as in TensorFlow, and no overflow warning, paired or not."""
    runner = load(str(DEFAULT_MODEL), xla=False)
    assert runner._twin is not None
    for lengths in ([6] * 3, [6] * 12, [6, 2, 5]):
        chunks, states = random_batch(runner, lengths, seed=len(lengths))
        chunks = [chunk * 1e4 for chunk in chunks]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # NumPy's default for an overflow is a RuntimeWarning
            twin_outputs, twin_states = runner._twin.run(chunks, states)
        tf_outputs, tf_states = runner._run_tensorflow(chunks, states)
        assert max_diff(twin_outputs, tf_outputs) <= TOLERANCE, lengths
        assert float(np.max(np.abs(twin_states - tf_states))) <= TOLERANCE, lengths
    runner.close()


def test_other_layers_get_no_twin_and_run_in_tensorflow(tmp_path) -> None:
    keras.utils.set_random_seed(2)
    normalized = keras.Sequential([keras.Input(shape=(None, 1)), keras.layers.LSTM(8, return_sequences=True),
                                   keras.layers.LayerNormalization(), keras.layers.Dense(1)])
    hard = keras.Sequential([keras.Input(shape=(None, 1)),
                             keras.layers.LSTM(8, return_sequences=True, recurrent_activation="hard_sigmoid")])
    for model, reason in ((normalized, "LayerNormalization"), (hard, "activations other than tanh and sigmoid")):
        with pytest.raises(Unsupported, match=reason):
            NumpyTwin(model)
        path = tmp_path / f"{model.name}.keras"
        model.save(path)
        runner = load(path, xla=False)
        assert runner._twin is None
        x = np.random.default_rng(1).normal(size=(6, 1)).astype(np.float32)
        outputs, _ = runner.run([x], runner.zero_states(1))
        assert float(np.max(np.abs(outputs[0] - keras_whole_sequence(path, x)))) <= TOLERANCE
        runner.close()

    def doubled(x):
        return x * 2

    custom = keras.Sequential([keras.Input(shape=(None, 1)), keras.layers.LSTM(4, return_sequences=True),
                               keras.layers.Dense(1, activation=doubled)])
    with pytest.raises(Unsupported, match="activation=<function"):
        NumpyTwin(custom)


def test_batches_up_to_the_limit_run_on_the_twin_and_larger_ones_in_tensorflow() -> None:
    runner = load(DEFAULT_MODEL, xla=False, numpy_max_batch_timesteps=40)
    numpy_calls, tensorflow_calls = metrics.MODEL_CALLS_NUMPY, metrics.MODEL_CALLS_TENSORFLOW
    for lengths, path in (([5] * 8, "numpy"), ([5] * 9, "tensorflow"), ([40], "numpy"), ([1, 41], "tensorflow"),
                          ([1] * 40, "numpy")):
        before = (numpy_calls._value.get(), tensorflow_calls._value.get())
        chunks, states = random_batch(runner, lengths, seed=len(lengths))
        runner.run(chunks, states)
        after = (numpy_calls._value.get(), tensorflow_calls._value.get())
        assert after[0] - before[0] == (path == "numpy") and after[1] - before[1] == (path == "tensorflow"), lengths
    runner.close()

    never = load(DEFAULT_MODEL, xla=False, numpy_max_batch_timesteps=0)
    assert never._twin is None
    never.close()


def test_a_twin_that_disagrees_with_keras_is_not_used(monkeypatch, caplog) -> None:
    class OffByALittle(NumpyTwin):
        def run(self, inputs, states):
            outputs, new_states = super().run(inputs, states)
            return outputs, new_states + 1e-3

    monkeypatch.setattr(runner_module, "NumpyTwin", OffByALittle)
    with caplog.at_level(logging.WARNING, logger=runner_module.log.name):
        runner = load(DEFAULT_MODEL, xla=False)
    assert runner._twin is None
    assert any("NumPy twin differs from Keras" in record.getMessage() for record in caplog.records)
    before = metrics.MODEL_CALLS_TENSORFLOW._value.get()
    runner.run(*random_batch(runner, [1], seed=0))
    assert metrics.MODEL_CALLS_TENSORFLOW._value.get() == before + 1
    runner.close()


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="OpenBLAS starts no worker thread on one core anyway")
def test_the_server_keeps_numpy_to_one_blas_thread() -> None:
    """The server's process loads NumPy with one BLAS thread (server/__init__.py); NumPy alone starts more."""
    import subprocess
    import sys

    count_threads = "import os, numpy; print(len(os.listdir('/proc/self/task')))"
    # OpenBLAS also reads these two: none may limit the NumPy-alone count.
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")}

    def threads(code: str) -> int:
        done = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True,
                              timeout=60, check=True)
        return int(done.stdout)

    assert threads("import server; " + count_threads) == 1
    assert threads(count_threads) > 1
