"""A NumPy copy of the model, for short chunks: the same weights, computed without a TensorFlow call.

A TensorFlow call costs 0.5-1 ms of CPU on this machine however little it computes; a chunk of one
timestep needs a few small matrix products per layer. For small batches the NumPy loop below is 3 to 17
times cheaper (CPU and latency); for large ones XLA's fused loop wins, so the runner picks by chunks x
timesteps of the batch (`--numpy-max-batch-timesteps`). Only models made entirely of layers whose
arithmetic is written out here get a twin, and the runner uses it only after it agreed with Keras and
with the TensorFlow path at load.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import keras
import numpy as np

from server.model.numpy_ops import Unsupported, activation, activation_name, padded, weights

# Layers that compute nothing at inference.
_INFERENCE_IDENTITY = tuple(
    kind for name in ("Dropout", "GaussianNoise", "GaussianDropout", "AlphaDropout", "SpatialDropout1D")
    if isinstance(kind := getattr(keras.layers, name, None), type)
)


class _Recurrent:
    """One recurrent layer: its states in, its outputs (every timestep or the last) and states out."""

    state_sizes: tuple[int, ...]
    units: int
    return_sequences: bool

    def run(self, x: np.ndarray, states: list[np.ndarray], active: np.ndarray | None
            ) -> tuple[np.ndarray, list[np.ndarray]]:
        """`x` is time-major [T, B, features] (so each step's slice is contiguous), `active` [T, B]; the
        outputs are time-major too."""
        steps, batch, _ = x.shape
        projected = self.project(x)
        outputs = np.empty((steps, batch, self.units), np.float32) if self.return_sequences else None
        for t in range(steps):
            new = self.step(projected[t], states)
            if active is not None and not active[t].all():
                # A row whose chunk has ended keeps its state (Keras masking, padding at the end).
                keep = ~active[t, :, None]
                new = [np.where(keep, old, fresh) for old, fresh in zip(states, new, strict=True)]
            states = new
            if outputs is not None:
                outputs[t] = states[0]
        return (outputs if outputs is not None else states[0]), states

    def project(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def step(self, projected: np.ndarray, states: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError


class _Gates:
    """An LSTM step's gate arithmetic on one buffer per call, its views made once: `z` holds the gates'
    pre-activations in `_LSTM`'s order and scale (i, f, o, c; see there), and `step` updates the cell
    state `c` and writes the new `h` in place. Run inside `np.errstate(over="ignore")`: exp overflows
    to inf for saturated gates, which gives the right limit (1 / inf = 0)."""

    def __init__(self, batch: int, units: int) -> None:
        self.z = z = np.empty((batch, 4 * units), np.float32)
        self._i, self._f, self._o, self._g = z[:, :units], z[:, units:2 * units], z[:, 2 * units:3 * units], \
            z[:, 3 * units:]
        self._numerators = _numerators(units)

    def step(self, c: np.ndarray, h: np.ndarray) -> None:
        # exp is twice as fast as tanh per element here (neither is SIMD in this NumPy build), and one
        # exp over all four gates needs no separate sigmoid and tanh calls.
        np.exp(self.z, out=self.z)
        self.z += 1.0
        np.divide(self._numerators, self.z, out=self.z)
        self._g -= 1.0  # tanh(x) = 2 / (1 + exp(-2x)) - 1
        c *= self._f
        self._g *= self._i
        c += self._g
        np.tanh(c, out=h)
        h *= self._o


@functools.cache
def _numerators(units: int) -> np.ndarray:
    """1 / (1 + exp(-x)) for the sigmoid gates, 2 / (1 + exp(-2x)) (then - 1) for the cell gate: made
    once, not per call (np.r_ costs more than a small step)."""
    numerators = np.r_[np.ones(3 * units, np.float32), np.full(units, 2.0, np.float32)]
    numerators.flags.writeable = False
    return numerators


class _LSTM(_Recurrent):
    def __init__(self, layer: keras.layers.LSTM) -> None:
        cell = layer.cell
        if activation_name(cell.recurrent_activation) != "sigmoid" or activation_name(cell.activation) != "tanh":
            raise Unsupported(f"layer {layer.name!r} has activations other than tanh and sigmoid")
        units = self.units = int(cell.units)
        self.state_sizes = (units, units)
        self.return_sequences = bool(layer.return_sequences)
        kernel, recurrent = weights(cell.kernel, cell.recurrent_kernel)
        bias = weights(cell.bias)[0] if cell.use_bias else np.zeros(4 * units, np.float32)
        # Keras' gate order is i, f, c, o; reordered to i, f, o, c so the three sigmoid gates are one
        # slice, and the columns scaled (exact in binary) by -1 (sigmoid gates) and -2 (cell gate), so
        # that one exp over the product gives every gate (_Gates).
        order = np.r_[0:2 * units, 3 * units:4 * units, 2 * units:3 * units]
        scale = np.r_[np.full(3 * units, -1.0, np.float32), np.full(units, -2.0, np.float32)]
        self.kernel = np.ascontiguousarray(kernel[:, order] * scale)
        self.recurrent = np.ascontiguousarray(recurrent[:, order] * scale)
        self.bias = bias[order] * scale

    def project(self, x: np.ndarray) -> np.ndarray:
        return _project(x, self.kernel, self.bias)

    def run(self, x: np.ndarray, states: list[np.ndarray], active: np.ndarray | None
            ) -> tuple[np.ndarray, list[np.ndarray]]:
        """As `_Recurrent.run`, on buffers made once per call: each step's new `h` is written straight
        into the time-major outputs, and the next step's product reads it there."""
        steps, batch, _ = x.shape
        projected = self.project(x)
        h, c = states[0], np.array(states[1])  # h is only read; c is updated in place: a copy
        # Each step's h goes to the outputs or, without them, to one of two buffers in turn.
        outputs = np.empty((steps, batch, self.units), np.float32) if self.return_sequences else \
            np.empty((min(steps, 2), batch, self.units), np.float32)
        gates = _Gates(batch, self.units)
        for t in range(steps):
            np.matmul(h, self.recurrent, out=gates.z)
            gates.z += projected[t]
            new_h = outputs[t if self.return_sequences else t % 2]
            keep = None
            if active is not None and not active[t].all():
                # A row whose chunk has ended keeps its state (Keras masking, padding at the end).
                keep, old_c = ~active[t, :, None], c.copy()
            gates.step(c, new_h)
            if keep is not None:
                np.copyto(new_h, h, where=keep)
                np.copyto(c, old_c, where=keep)
            h = new_h
        return (outputs if self.return_sequences else h), [h, c]


def _project(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """x [..., features] @ kernel + bias as one 2-D product (a 3-D matmul is a product per leading row)."""
    y = np.matmul(x.reshape(-1, x.shape[-1]), kernel)
    y += bias
    return y.reshape(*x.shape[:-1], kernel.shape[1])


class _LSTMPair:
    """Two stacked LSTM layers (the first returning sequences) stepped as one: iteration s runs the first
    layer's step s and the second layer's step s - 1, which both need only the states of iteration s - 1.
    So one product [h1 | h2] @ [[R1, K2], [0, R2]] and one set of gate operations serve both layers, and
    a chunk of T steps takes T + 1 iterations instead of 2 T. Since each layer alone steps on buffers made
    once per call (`_LSTM.run`), that pays only for one chunk, where NumPy's per-call cost is the whole
    bound: 1.05x at T=8, 1.10x at T=20; at 4 and 8 rows the product's zero block costs more than it saves
    (0.82-0.97x).

    Gate columns are laid out gate by gate, each gate's first layer's units then the second's:
    i1 i2 f1 f2 o1 o2 c1 c2 (the order and scaled columns of `_LSTM`). Inputs and outputs are time-major.
    """

    # Where it is used (`python -m bench.model_paths`, column "pair gain"): one chunk, from 8 steps (at 4,
    # 5 iterations instead of 8 do not pay for the setup: 0.98x).
    MAX_ROWS = 1
    MIN_STEPS = 8

    def __init__(self, first: _LSTM, second: _LSTM) -> None:
        self.first, self.second = first, second
        u1, u2 = first.units, second.units
        width = u1 + u2
        self.weights = np.zeros((width, 4 * width), np.float32)
        for gate in range(4):
            left, right = gate * width, gate * width + u1  # this gate's first-layer and second-layer columns
            self.weights[:u1, left:right] = first.recurrent[:, gate * u1:(gate + 1) * u1]
            self.weights[:u1, right:right + u2] = second.kernel[:, gate * u2:(gate + 1) * u2]
            self.weights[u1:, right:right + u2] = second.recurrent[:, gate * u2:(gate + 1) * u2]

    def run(self, x: np.ndarray, states: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        steps, batch, _ = x.shape
        u1, u2 = self.first.units, self.second.units
        width = u1 + u2
        projected = self.first.project(x)  # the first layer's inputs, all steps in one product
        # What each iteration adds to the product: the first layer's projected step s (none at s = T) and
        # the second layer's bias.
        added = np.zeros((steps + 1, batch, 4 * width), np.float32)
        for gate in range(4):
            added[:steps, :, gate * width:gate * width + u1] = projected[:, :, gate * u1:(gate + 1) * u1]
            added[:, :, gate * width + u1:(gate + 1) * width] = self.second.bias[gate * u2:(gate + 1) * u2]
        h = np.concatenate([states[0], states[2]], axis=1)
        c = np.concatenate([states[1], states[3]], axis=1)
        outputs = np.empty((steps, batch, u2), np.float32) if self.second.return_sequences else None
        gates = _Gates(batch, width)
        new_h = np.empty_like(h)
        for s in range(steps + 1):
            if s == 0:
                kept = h[:, u1:].copy(), c[:, u1:].copy()  # the second layer has no step -1
            elif s == steps:
                kept = h[:, :u1].copy(), c[:, :u1].copy()  # the first layer has no step T
            np.matmul(h, self.weights, out=gates.z)
            gates.z += added[s]
            gates.step(c, new_h)
            h, new_h = new_h, h
            if s == 0:
                h[:, u1:], c[:, u1:] = kept
            elif s == steps:
                h[:, :u1], c[:, :u1] = kept
            if s > 0 and outputs is not None:
                outputs[s - 1] = h[:, u1:]
        h2 = h[:, u1:]
        return (outputs if outputs is not None else h2), [h[:, :u1], c[:, :u1], h2, c[:, u1:]]


class _GRU(_Recurrent):
    def __init__(self, layer: keras.layers.GRU) -> None:
        cell = layer.cell
        self.activation = activation(cell, "activation")
        self.recurrent_activation = activation(cell, "recurrent_activation")
        units = self.units = int(cell.units)
        self.state_sizes = (units,)
        self.return_sequences = bool(layer.return_sequences)
        self.reset_after = bool(cell.reset_after)
        self.kernel, self.recurrent = weights(cell.kernel, cell.recurrent_kernel)
        if not cell.use_bias:
            bias = np.zeros((2, 3 * units) if self.reset_after else (3 * units,), np.float32)
        else:
            bias = weights(cell.bias)[0]
        self.input_bias, self.recurrent_bias = (bias[0], bias[1]) if self.reset_after else (bias, None)

    def project(self, x: np.ndarray) -> np.ndarray:
        return _project(x, self.kernel, self.input_bias)

    def step(self, projected: np.ndarray, states: list[np.ndarray]) -> list[np.ndarray]:
        (h,) = states
        units = self.units
        if self.reset_after:
            inner = np.matmul(h, self.recurrent)
            inner += self.recurrent_bias
        else:
            inner = np.matmul(h, self.recurrent[:, : 2 * units])
        z = self.recurrent_activation(projected[:, :units] + inner[:, :units])
        r = self.recurrent_activation(projected[:, units:2 * units] + inner[:, units:2 * units])
        recurrent_h = (r * inner[:, 2 * units:] if self.reset_after
                       else np.matmul(r * h, self.recurrent[:, 2 * units:]))
        hh = self.activation(projected[:, 2 * units:] + recurrent_h)
        # z * h + (1 - z) * hh, as hh + z * (h - hh)
        new = h - hh
        new *= z
        new += hh
        return [new]


class _SimpleRNN(_Recurrent):
    def __init__(self, layer: keras.layers.SimpleRNN) -> None:
        cell = layer.cell
        self.activation = activation(cell, "activation")
        units = self.units = int(cell.units)
        self.state_sizes = (units,)
        self.return_sequences = bool(layer.return_sequences)
        self.kernel, self.recurrent = weights(cell.kernel, cell.recurrent_kernel)
        self.bias = weights(cell.bias)[0] if cell.use_bias else np.zeros(units, np.float32)

    def project(self, x: np.ndarray) -> np.ndarray:
        return _project(x, self.kernel, self.bias)

    def step(self, projected: np.ndarray, states: list[np.ndarray]) -> list[np.ndarray]:
        (h,) = states
        z = np.matmul(h, self.recurrent)
        z += projected
        return [self.activation(z)]


class _Dense:
    def __init__(self, layer: keras.layers.Dense) -> None:
        self.activation = activation(layer, "activation")
        self.kernel = weights(layer.kernel)[0]
        self.bias = weights(layer.bias)[0] if layer.use_bias else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        # Every timestep in one 2-D product.
        y = np.matmul(x.reshape(-1, x.shape[-1]), self.kernel).reshape(*x.shape[:-1], self.kernel.shape[1])
        if self.bias is not None:
            y += self.bias
        return self.activation(y)


class _Activation:
    def __init__(self, layer: keras.layers.Activation) -> None:
        self.activation = activation(layer, "activation")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.activation(np.array(x))  # a copy: the activations work in place


_RECURRENT: dict[type, type[_Recurrent]] = {
    keras.layers.LSTM: _LSTM, keras.layers.GRU: _GRU, keras.layers.SimpleRNN: _SimpleRNN,
}


class NumpyTwin:
    """The model's layers in NumPy; `run` has the runner's signature (chunks of B streams, their states)."""

    def __init__(self, model: keras.Model) -> None:
        self._layers: list[_Recurrent | Callable[[np.ndarray], np.ndarray]] = []
        for layer in model.layers:
            if isinstance(layer, (keras.layers.InputLayer, *_INFERENCE_IDENTITY)):
                continue
            if getattr(layer, "dtype_policy", None) is not None and layer.dtype_policy.name != "float32":
                raise Unsupported(f"layer {layer.name!r} computes in {layer.dtype_policy.name}")
            kind = type(layer)
            if kind in _RECURRENT:
                self._layers.append(_RECURRENT[kind](layer))
            elif kind is keras.layers.Dense:
                self._layers.append(_Dense(layer))
            elif kind is keras.layers.Activation:
                self._layers.append(_Activation(layer))
            else:
                raise Unsupported(f"layer {layer.name!r} is a {kind.__name__}")
        self._split = np.cumsum([size for layer in self._layers if isinstance(layer, _Recurrent)
                                 for size in layer.state_sizes])[:-1]
        # Stacked LSTM pairs that may run as one (_LSTMPair), by the index of their first layer.
        self._pairs = {
            n: _LSTMPair(first, second)
            for n, (first, second) in enumerate(zip(self._layers, self._layers[1:], strict=False))
            if isinstance(first, _LSTM) and isinstance(second, _LSTM) and first.return_sequences
        }

    def run(self, inputs: list[np.ndarray], states: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        lengths = [chunk.shape[0] for chunk in inputs]
        longest = max(lengths)
        # The layers run time-major ([T, B, features]): each step's rows are one contiguous block.
        if min(lengths) == longest:
            h = np.stack(inputs, axis=1)
            active = None
        else:
            h, active = padded(inputs, len(inputs))
            h, active = np.ascontiguousarray(h.swapaxes(0, 1)), np.ascontiguousarray(active.T)
        slices = np.split(states, self._split, axis=1)
        new_states: list[np.ndarray] = []
        fuse = active is None and len(inputs) <= _LSTMPair.MAX_ROWS and longest >= _LSTMPair.MIN_STEPS
        with np.errstate(over="ignore"):  # exp of saturated gates (_Gates)
            h = self._layers_run(h, slices, active, fuse, new_states)
        if h.ndim == 3:
            y = np.ascontiguousarray(h.swapaxes(0, 1))
            outputs = [y[row, :length] for row, length in enumerate(lengths)]
        else:  # the model answers with its last step: one row per chunk, shaped as the TensorFlow path's
            outputs = [h[row, None] for row in range(len(inputs))]
        return outputs, np.concatenate(new_states, axis=1)

    def _layers_run(self, h: np.ndarray, slices: list[np.ndarray], active: np.ndarray | None, fuse: bool,
                    new_states: list[np.ndarray]) -> np.ndarray:
        used = 0
        n = 0
        while n < len(self._layers):
            layer = self._layers[n]
            n += 1
            if not isinstance(layer, _Recurrent):
                h = layer(h)
                continue
            pair = self._pairs.get(n - 1) if fuse and h.ndim == 3 else None
            if pair is not None:
                h, layer_states = pair.run(h, slices[used:used + 4])
                used += 4
                n += 1  # the pair's second layer ran too
            else:
                count = len(layer.state_sizes)
                h, layer_states = layer.run(h, slices[used:used + count], active if h.ndim == 3 else None)
                used += count
            new_states.extend(layer_states)
        return h
