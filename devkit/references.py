"""Keras' own answers for whole sequences from zero state: the reference every served output is checked against.

Many sequences go to Keras in one compiled call (keras_whole_sequences): one sequence at a time in eager
mode cost test_continuation minutes."""

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
    """Keras' outputs for the whole sequence x [T, F] from zero state, float32 [T or 1, outputs]."""
    return keras_whole_sequences(model_path, [x])[0]


def keras_whole_sequences(model_path: Path | str, sequences: list[np.ndarray]) -> list[np.ndarray]:
    """Keras' outputs for many whole sequences from zero state, in few compiled calls (predict_on_batch):
    each [T, outputs] for a per-timestep model, [1, outputs] for one that answers the last step only.

    Sequences share a call padded at their end to the longest: a recurrent model is causal, so the padding
    cannot change a per-timestep output. A last-step model's answer would move with the padding, so its
    sequences are grouped by length instead. A model with a fixed batch size B (stateful) runs B rows a
    call, its states zeroed before each.
    """
    model = load_model(str(model_path))
    per_timestep = len(model.outputs[0].shape) == 3
    groups: dict[int, list[int]] = {}
    for index, x in enumerate(sequences):
        groups.setdefault(0 if per_timestep else len(x), []).append(index)
    answers: list[np.ndarray] = [np.empty(0)] * len(sequences)
    for indices in groups.values():
        outputs = _predict_padded(model, [sequences[index] for index in indices])
        for row, index in enumerate(indices):
            answer = outputs[row]
            answers[index] = answer[: len(sequences[index])] if per_timestep else answer.reshape(1, -1)
    return answers


def _predict_padded(model: keras.Model, sequences: list[np.ndarray]) -> np.ndarray:
    batch = model.inputs[0].shape[0] or len(sequences)
    length = max(len(x) for x in sequences)
    inputs = np.zeros((-(-len(sequences) // batch) * batch, length, sequences[0].shape[1]), dtype=np.float32)
    for row, x in enumerate(sequences):
        inputs[row, : len(x)] = x
    outputs = []
    for start in range(0, len(inputs), batch):
        for layer in model.layers:
            if getattr(layer, "stateful", False):
                layer.reset_state()
        outputs.append(np.asarray(model.predict_on_batch(inputs[start : start + batch]), dtype=np.float32))
    return np.concatenate(outputs)
