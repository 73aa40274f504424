"""Keras' own answers for whole sequences from zero state: the reference every served output is checked against.

Many sequences go to Keras in one batched call (keras_whole_sequences) where the model allows it: one
sequence at a time costs a model call each (26x slower over test_continuation's streams)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np

TOLERANCE = 1e-5


@functools.cache
def load_model(path: str) -> keras.Model:
    return keras.models.load_model(path, compile=False)


def keras_whole_sequence(model_path: Path | str, x: np.ndarray) -> np.ndarray:
    """Keras' outputs for the whole sequence x [T, F] from zero state, float32 [T or 1, outputs].

    A stateful model with a fixed batch size runs x as row 0 of a batch of that size.
    """
    model = load_model(str(model_path))
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
    model = load_model(str(model_path))
    length = max(len(x) for x in sequences)
    inputs = np.zeros((len(sequences), length, sequences[0].shape[1]), dtype=np.float32)
    for row, x in enumerate(sequences):
        inputs[row, : len(x)] = x
    y = keras.ops.convert_to_numpy(model(inputs, training=False))
    assert y.ndim == 3, "keras_whole_sequences needs a per-timestep model"
    return [y[row, : len(x)] for row, x in enumerate(sequences)]
