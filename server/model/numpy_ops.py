"""The NumPy arithmetic the twin's layers share (server/model/numpy_twin.py): in-place activations, a
padded batch and its mask, weights as float32, and the error that says a model gets no twin.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np


def _tanh(x: np.ndarray) -> np.ndarray:
    return np.tanh(x, out=x)


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0, out=x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # sigmoid(x) = (1 + tanh(x / 2)) / 2: one transcendental call, in place.
    x *= 0.5
    np.tanh(x, out=x)
    x += 1.0
    x *= 0.5
    return x


def _linear(x: np.ndarray) -> np.ndarray:
    return x


# In-place activations, by Keras name; a model with any other activation gets no twin.
_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "tanh": _tanh, "relu": _relu, "sigmoid": _sigmoid, "linear": _linear,
}


def padded(inputs: list[np.ndarray], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunks of different lengths as one [rows, longest, features] array padded at the end with zeros, and
    the mask of real timesteps (rows past the chunks, idle padding, count as active throughout)."""
    lengths = np.array([chunk.shape[0] for chunk in inputs])
    longest = int(lengths.max())
    x = np.zeros((rows, longest, inputs[0].shape[1]), np.float32)
    for row, chunk in enumerate(inputs):
        x[row, : chunk.shape[0]] = chunk
    mask = np.ones((rows, longest), bool)
    mask[: len(inputs)] = np.arange(longest) < lengths[:, None]
    return x, mask


class Unsupported(Exception):
    """The model has a layer or option the twin does not compute; the message names it."""


def activation_name(function: object) -> str | None:
    """Keras' name of a built-in activation; None for anything else (a custom function, a layer)."""
    try:
        name = keras.activations.serialize(function)
    except Exception:  # Keras refuses to name some objects; none of them is a built-in activation
        return None
    return name if isinstance(name, str) else None


def activation(layer: keras.layers.Layer, option: str) -> Callable[[np.ndarray], np.ndarray]:
    function = getattr(layer, option)
    name = activation_name(function)
    if name not in _ACTIVATIONS:
        raise Unsupported(f"layer {layer.name!r} has {option}={name or function!r}")
    return _ACTIVATIONS[name]


def weights(*arrays: object) -> list[np.ndarray]:
    return [np.ascontiguousarray(keras.ops.convert_to_numpy(a), dtype=np.float32) for a in arrays]
