"""Small Keras models built by the tests, and Keras' own answer for a whole sequence."""

from __future__ import annotations

import functools
import os
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np

TOLERANCE = 1e-5


def build_gru_stateful(path: Path, batch_size: int = 4) -> Path:
    """Three features, GRU then SimpleRNN, saved with stateful=True and a fixed batch size: the way the
    Keras answer tells people to build a model that carries state across batches."""
    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [
            keras.Input(batch_shape=(batch_size, None, 3)),
            keras.layers.GRU(24, return_sequences=True, stateful=True, name="gru"),
            keras.layers.SimpleRNN(12, return_sequences=True, stateful=True, name="rnn"),
            keras.layers.Dense(2, name="out"),
        ],
        name="gru_stateful",
    )
    model.save(path)
    return path


def build_last_step(path: Path) -> Path:
    """Two features, LSTM then GRU returning only its last step: one output row per chunk."""
    keras.utils.set_random_seed(11)
    model = keras.Sequential(
        [
            keras.Input(shape=(None, 2)),
            keras.layers.LSTM(16, return_sequences=True),
            keras.layers.GRU(8),
            keras.layers.Dense(3),
        ],
        name="last_step",
    )
    model.save(path)
    return path


def build_lstm(path: Path, units: int = 32, seed: int = 3) -> Path:
    """A one-feature LSTM like the default model, with other weights (another fingerprint)."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input(shape=(None, 1)), keras.layers.LSTM(units, return_sequences=True), keras.layers.Dense(1)],
        name=f"lstm_{units}_{seed}",
    )
    model.save(path)
    return path


@functools.cache
def _load(path: str) -> keras.Model:
    return keras.models.load_model(path, compile=False)


def keras_whole_sequence(model_path: Path | str, x: np.ndarray) -> np.ndarray:
    """Keras' outputs for the whole sequence x [T, F] from zero state, float32 [T or 1, outputs].

    A stateful model with a fixed batch size runs x as row 0 of a batch of that size.
    """
    model = _load(str(model_path))
    batch = model.inputs[0].shape[0] or 1
    inputs = np.zeros((batch, *x.shape), dtype=np.float32)
    inputs[0] = x
    for layer in model.layers:
        if getattr(layer, "stateful", False):
            layer.reset_state()
    y = keras.ops.convert_to_numpy(model(inputs, training=False))[0]
    return y if y.ndim == 2 else y.reshape(1, -1)


def keras_whole_sequences(model_path: Path | str, sequences: list[np.ndarray]) -> list[np.ndarray]:
    """keras_whole_sequence for many sequences in one model call: each is padded at its end to the longest.

    Valid for per-timestep models without a fixed batch size (the default model): a recurrent model is
    causal, so the padding after a sequence's last step cannot change any of its outputs.
    """
    model = _load(str(model_path))
    length = max(len(x) for x in sequences)
    inputs = np.zeros((len(sequences), length, sequences[0].shape[1]), dtype=np.float32)
    for row, x in enumerate(sequences):
        inputs[row, : len(x)] = x
    y = keras.ops.convert_to_numpy(model(inputs, training=False))
    assert y.ndim == 3, "keras_whole_sequences needs a per-timestep model"
    return [y[row, : len(x)] for row, x in enumerate(sequences)]
