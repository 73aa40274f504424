"""Small Keras models the tests build and serve: other shapes, other layers and other weights than the default."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras


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
