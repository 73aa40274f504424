"""Which layers a served model may have, which are recurrent, and their states (shapes in server/model/runner.py).

Keras keeps `stateful=True` states in layer variables, one row per batch position. Serving many
streams needs the opposite: the state row must follow the stream. So the model's layer stack is
rebuilt with every recurrent layer made stateless (`stateful=False, return_state=True`, same weights)
and called with explicit `initial_state`. For an LSTM layer of u units its part of a slot is
[h (u), c (u)]; for GRU and SimpleRNN it is [h (u)]; a slot is every recurrent layer's part, in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import tensorflow as tf

from server.errors import StartupError

RECURRENT_KINDS = {keras.layers.LSTM: "LSTM", keras.layers.GRU: "GRU", keras.layers.SimpleRNN: "SimpleRNN"}


class ModelLoadError(StartupError):
    """The file is not a model this server can host; the message says why."""

    headline = "cannot serve this model"


def _layer_types(*names: str) -> tuple[type, ...]:
    return tuple(kind for name in names if isinstance(kind := getattr(keras.layers, name, None), type))


# Layers that cannot be served chunk by chunk, and why (the start-up error names the layer and this).
_NEEDS_FUTURE = (
    "reads the sequence backwards as well as forwards: its output at a timestep depends on later timesteps, "
    "which a stream has not received yet"
)
_MIXES_TIMESTEPS = (
    "mixes timesteps within a chunk: its output at a timestep depends on neighbouring timesteps, so the outputs "
    "would depend on where the chunk boundaries fall. Only the recurrent layers (LSTM, GRU, SimpleRNN) may "
    "carry information across timesteps; the others must work on each timestep alone (Dense, Dropout, "
    "normalization, activations, TimeDistributed)"
)
_BIDIRECTIONAL = _layer_types("Bidirectional")
_TIME_MIXING = _layer_types(
    "Conv1D", "Conv1DTranspose", "SeparableConv1D", "DepthwiseConv1D", "MaxPooling1D", "AveragePooling1D",
    "GlobalMaxPooling1D", "GlobalAveragePooling1D", "Attention", "AdditiveAttention", "MultiHeadAttention",
    "GroupQueryAttention", "ZeroPadding1D", "Cropping1D", "UpSampling1D", "Flatten", "Reshape", "Permute",
)
# Known to work on each timestep alone; any other non-recurrent layer is named when the self-check fails.
PER_TIMESTEP = _layer_types(
    "Dense", "EinsumDense", "Dropout", "GaussianNoise", "GaussianDropout", "AlphaDropout", "Activation", "ReLU",
    "LeakyReLU", "PReLU", "ELU", "Softmax", "LayerNormalization", "BatchNormalization", "Normalization",
    "TimeDistributed", "Masking", "Rescaling", "Identity", "InputLayer",
)


@dataclass(frozen=True)
class Step:
    layer: keras.layers.Layer
    state_sizes: tuple[int, ...]  # empty for a non-recurrent layer


def _state_sizes(layer: keras.layers.Layer) -> tuple[int, ...]:
    size = layer.cell.state_size
    sizes = tuple(size) if isinstance(size, list | tuple) else (size,)
    return tuple(int(s) for s in sizes)


def _stateless_copy(layer: keras.layers.Layer, input_shape: tuple) -> keras.layers.Layer:
    """The same recurrent layer, same weights, but taking and returning its states explicitly."""
    config = layer.get_config()
    if config.get("go_backwards"):
        raise ModelLoadError(
            f"layer {layer.name!r} ({type(layer).__name__}, go_backwards=True) runs backwards in time: its output "
            "at a timestep depends on later timesteps, which a stream has not received yet"
        )
    config.update(stateful=False, return_state=True)
    copy = type(layer).from_config(config)
    copy.build(input_shape)
    copy.set_weights(layer.get_weights())
    return copy


def input_features(model: keras.Model) -> int:
    shape = model.input_shape
    if isinstance(shape, list):
        if len(shape) != 1:
            raise ModelLoadError(f"the model has {len(shape)} inputs; expected one [batch, time, features]")
        shape = shape[0]
    if len(shape) != 3 or shape[-1] is None:
        raise ModelLoadError(f"the model's input shape is {shape}; expected [batch, time, features]")
    return int(shape[-1])


def _servable_step(layer: keras.layers.Layer, shape: tuple) -> tuple[Step, tuple]:
    """The layer as served, and the shape of its output; ModelLoadError for a layer that cannot be."""
    if isinstance(layer, _BIDIRECTIONAL):
        raise ModelLoadError(f"layer {layer.name!r} ({type(layer).__name__}) {_NEEDS_FUTURE}")
    if isinstance(layer, _TIME_MIXING):
        raise ModelLoadError(f"layer {layer.name!r} ({type(layer).__name__}) {_MIXES_TIMESTEPS}")
    if not isinstance(layer, keras.layers.RNN):
        return Step(layer, ()), tuple(layer.compute_output_shape(shape))
    if type(layer) not in RECURRENT_KINDS:
        raise ModelLoadError(
            f"layer {layer.name!r} is a {type(layer).__name__}; supported recurrent layers are LSTM, GRU and SimpleRNN"
        )
    units = int(layer.units)
    out_shape = (None, None, units) if layer.return_sequences else (None, units)
    return Step(_stateless_copy(layer, shape), _state_sizes(layer)), out_shape


class ServingStack:
    """The model's layers with every recurrent one stateless: `forward` takes and returns the states.

        inputs  x      float32 [B, T, features]   (shorter chunks padded and masked)
        states  s      float32 [B, state_size]    every recurrent layer's states, concatenated
        outputs y      float32 [B, T, output_size] (or [B, 1, output_size] for a last-step model)
        states  s'     float32 [B, state_size]
    """

    def __init__(self, model: keras.Model) -> None:
        self.features = input_features(model)
        self.steps: list[Step] = []
        shape: tuple = (None, None, self.features)
        for layer in model.layers:
            if not isinstance(layer, keras.layers.InputLayer):
                step, shape = _servable_step(layer, shape)
                self.steps.append(step)
        self._split = [size for step in self.steps for size in step.state_sizes]
        self.state_size = sum(self._split)
        if self.state_size == 0:
            raise ModelLoadError("the model has no recurrent layer (LSTM, GRU or SimpleRNN): nothing to stream")

    @property
    def recurrent(self) -> list[Step]:
        return [step for step in self.steps if step.state_sizes]

    def forward(self, x: tf.Tensor, states: tf.Tensor, mask: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        slices = tf.split(states, self._split, axis=1)
        new_states: list[tf.Tensor] = []
        h = x
        used = 0
        for step in self.steps:
            if not step.state_sizes:
                h = step.layer(h)
                continue
            count = len(step.state_sizes)
            initial = slices[used : used + count]
            used += count
            # A layer that returns only its last step ends the time axis: later layers see no mask.
            result = step.layer(h, initial_state=initial, mask=mask if h.shape.rank == 3 else None)
            h, layer_states = result[0], result[1:]
            new_states.extend(layer_states)
        if h.shape.rank == 2:
            h = h[:, None, :]
        return h, tf.concat(new_states, axis=1)
