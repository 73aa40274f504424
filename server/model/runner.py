"""The model runner: a Keras recurrent model turned into one compiled call with states in and out.

Keras keeps `stateful=True` states in layer variables, one row per batch position. Serving many
streams needs the opposite: the state row must follow the stream, and any set of streams must share
one forward pass. So the runner rebuilds the model's layer stack with every recurrent layer made
stateless (`stateful=False, return_state=True`, same weights) and calls it with explicit
`initial_state`. For a batch of B streams:

    inputs  x      float32 [B, T, features]   (shorter chunks padded and masked)
    states  s      float32 [B, state_size]    every recurrent layer's states, concatenated
    outputs y      float32 [B, T, output_size] (or [B, 1, output_size] for a last-step model)
    states  s'     float32 [B, state_size]

For an LSTM layer of u units its part of a slot is [h (u), c (u)]; for GRU and SimpleRNN it is [h (u)].
At load time a self-check proves, on random data, that chunked calls reproduce Keras on the whole
sequence; a model for which that fails (a layer that mixes timesteps, say) is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from server import metrics
from server.model.numpy_twin import NumpyTwin, Unsupported, padded
from server.types import ModelDescription, RecurrentLayerInfo

log = logging.getLogger(__name__)


class _DeliberateRetracing(logging.Filter):
    """TensorFlow warns when a tf.function traces often; the XLA calls trace once per shape on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


logging.getLogger("tensorflow").addFilter(_DeliberateRetracing())

RECURRENT_KINDS = {keras.layers.LSTM: "LSTM", keras.layers.GRU: "GRU", keras.layers.SimpleRNN: "SimpleRNN"}


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
_PER_TIMESTEP = _layer_types(
    "Dense", "EinsumDense", "Dropout", "GaussianNoise", "GaussianDropout", "AlphaDropout", "Activation", "ReLU",
    "LeakyReLU", "PReLU", "ELU", "Softmax", "LayerNormalization", "BatchNormalization", "Normalization",
    "TimeDistributed", "Masking", "Rescaling", "Identity", "InputLayer",
)
SELF_CHECK_TOLERANCE = 1e-4


class ModelLoadError(Exception):
    """The file is not a model this server can host; the message says why."""


@dataclass(frozen=True)
class _Step:
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


def fingerprint_model(model: keras.Model) -> str:
    """A digest of the architecture and every weight: slots written by another model are refused."""
    digest = hashlib.sha256()
    digest.update(json.dumps(model.get_config(), sort_keys=True, default=str).encode())
    for weight in model.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight), dtype=np.float32)
        digest.update(weight.path.encode())
        digest.update(str(value.shape).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()[:16]


class ModelRunner:
    """Runs a batch of chunks of different streams in one compiled call, states in and out."""

    def __init__(
        self, model_path: str | Path, max_chunk_timesteps: int, *, xla: bool, max_batch: int,
        numpy_max_batch_timesteps: int,
    ) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise ModelLoadError(f"model file {str(path)!r} does not exist")
        try:
            model = keras.models.load_model(path, compile=False)
        except Exception as exc:  # Keras raises many types for a bad file; all mean the same here.
            raise ModelLoadError(f"could not load {str(path)!r} as a Keras model: {exc}") from exc
        self._source = model
        self.max_chunk_timesteps = max_chunk_timesteps
        self.features = self._input_features(model)
        self._steps = self._rebuild_stack(model)
        self.state_size = sum(sum(step.state_sizes) for step in self._steps)
        if self.state_size == 0:
            raise ModelLoadError("the model has no recurrent layer (LSTM, GRU or SimpleRNN): nothing to stream")
        self._split = [size for step in self._steps for size in step.state_sizes]
        signature = [
            tf.TensorSpec([None, None, self.features], tf.float32),
            tf.TensorSpec([None, self.state_size], tf.float32),
        ]
        self._call = tf.function(self._forward, input_signature=signature)
        self._call_masked = tf.function(
            self._forward, input_signature=[*signature, tf.TensorSpec([None, None], tf.bool)]
        )
        self._xla: _XlaShapes | None = None
        probe = self._call(tf.zeros([1, 3, self.features]), tf.zeros([1, self.state_size]))[0]
        self.per_timestep_outputs = probe.shape.rank == 3 and probe.shape[1] == 3
        if probe.shape.rank not in (2, 3):
            raise ModelLoadError(f"the model's output has shape {probe.shape}; expected [batch, (time,) units]")
        self.output_size = int(probe.shape[-1])
        self.description = ModelDescription(
            name=model.name,
            fingerprint=fingerprint_model(model),
            input_features=self.features,
            output_size=self.output_size,
            per_timestep_outputs=self.per_timestep_outputs,
            state_size=self.state_size,
            recurrent_layers=tuple(
                RecurrentLayerInfo(s.layer.name, RECURRENT_KINDS[type(s.layer)], int(s.layer.units))
                for s in self._steps
                if s.state_sizes
            ),
        )
        self._numpy_max_batch_timesteps = numpy_max_batch_timesteps
        self._twin = self._numpy_twin(model) if numpy_max_batch_timesteps > 0 else None
        self._self_check()
        # XLA is 1.3 to 2.5 times faster per call here, but compiles once per concrete shape: see _XlaShapes.
        if xla:
            # Batches the twin serves never reach XLA: their shapes are not compiled.
            twin_serves = self._numpy_max_batch_timesteps if self._twin is not None else 0
            self._xla = _XlaShapes(self._forward, self.features, self.state_size, max_batch, twin_serves)

    @staticmethod
    def _input_features(model: keras.Model) -> int:
        shape = model.input_shape
        if isinstance(shape, list):
            if len(shape) != 1:
                raise ModelLoadError(f"the model has {len(shape)} inputs; expected one [batch, time, features]")
            shape = shape[0]
        if len(shape) != 3 or shape[-1] is None:
            raise ModelLoadError(f"the model's input shape is {shape}; expected [batch, time, features]")
        return int(shape[-1])

    def _rebuild_stack(self, model: keras.Model) -> list[_Step]:
        steps: list[_Step] = []
        shape: tuple = (None, None, self.features)
        for layer in model.layers:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            if isinstance(layer, _BIDIRECTIONAL):
                raise ModelLoadError(f"layer {layer.name!r} ({type(layer).__name__}) {_NEEDS_FUTURE}")
            if isinstance(layer, _TIME_MIXING):
                raise ModelLoadError(f"layer {layer.name!r} ({type(layer).__name__}) {_MIXES_TIMESTEPS}")
            if isinstance(layer, keras.layers.RNN):
                if type(layer) not in RECURRENT_KINDS:
                    raise ModelLoadError(
                        f"layer {layer.name!r} is a {type(layer).__name__}; supported recurrent layers are "
                        "LSTM, GRU and SimpleRNN"
                    )
                copy = _stateless_copy(layer, shape)
                steps.append(_Step(copy, _state_sizes(layer)))
                units = int(layer.units)
                shape = (None, None, units) if layer.return_sequences else (None, units)
            else:
                steps.append(_Step(layer, ()))
                shape = tuple(layer.compute_output_shape(shape))
        return steps

    def _forward(self, x: tf.Tensor, states: tf.Tensor, mask: tf.Tensor | None = None):
        slices = tf.split(states, self._split, axis=1)
        new_states: list[tf.Tensor] = []
        h = x
        used = 0
        for step in self._steps:
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

    def zero_states(self, batch: int) -> np.ndarray:
        return np.zeros((batch, self.state_size), dtype=np.float32)

    def run(self, inputs: list[np.ndarray], states: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """Run chunks of B streams (each float32 [T_i, features]) from their states [B, state_size].

        Returns each chunk's outputs ([T_i or 1, output_size]) and the new states [B, state_size].
        Small batches (chunks x longest chunk <= --numpy-max-batch-timesteps) run on the NumPy twin,
        the others in TensorFlow.
        """
        if self._twin is not None and \
                len(inputs) * max(chunk.shape[0] for chunk in inputs) <= self._numpy_max_batch_timesteps:
            metrics.MODEL_CALLS_NUMPY.inc()
            return self._twin.run(inputs, states)
        metrics.MODEL_CALLS_TENSORFLOW.inc()
        return self._run_tensorflow(inputs, states)

    def _run_tensorflow(self, inputs: list[np.ndarray], states: np.ndarray
                        ) -> tuple[list[np.ndarray], np.ndarray]:
        """Chunks of different lengths are padded to the longest and masked, so one call serves all."""
        lengths = [chunk.shape[0] for chunk in inputs]
        longest = max(lengths)
        masked = min(lengths) != longest
        bucket = self._xla.lookup(masked, len(inputs), longest) if self._xla else None
        rows = bucket or len(inputs)  # XLA shapes are bucketed: pad with idle rows
        if masked:
            args: tuple[np.ndarray, ...] = padded(inputs, rows)
        else:
            x = np.stack(inputs)
            if rows > len(inputs):
                x = np.concatenate([x, np.zeros((rows - len(inputs), *x.shape[1:]), np.float32)])
            args = (x,)
        if rows > len(inputs):
            states = np.concatenate([states, self.zero_states(rows - len(inputs))])
        if bucket:
            y, new_states = self._xla.function(args[0], states, *args[1:])  # type: ignore[union-attr]
        else:
            y, new_states = (self._call_masked if masked else self._call)(args[0], states, *args[1:])
        y = y.numpy()
        if self.per_timestep_outputs:
            outputs = [y[row, :length] for row, length in enumerate(lengths)]
        else:
            outputs = [y[row] for row in range(len(inputs))]
        return outputs, new_states.numpy()[: len(inputs)]

    def _numpy_twin(self, model: keras.Model) -> NumpyTwin | None:
        try:
            return NumpyTwin(model)
        except Unsupported as exc:
            log.info("no NumPy twin: every batch runs in TensorFlow", extra={"fields": {"reason": str(exc)}})
            return None

    def _self_check(self) -> None:
        """Prove that chunked calls equal Keras on the whole sequence, on random data: the TensorFlow path,
        and the NumPy twin (which is dropped, with a warning, if it disagrees)."""
        rng = np.random.default_rng(0)
        batch = 3
        if self._source.layers and any(getattr(layer, "stateful", False) for layer in self._source.layers):
            batch = self._source.inputs[0].shape[0] or batch
        x = rng.normal(size=(batch, 24, self.features)).astype(np.float32)
        with_keras = self._keras_reference(x)
        expected = with_keras if self.per_timestep_outputs else with_keras.reshape(batch, 1, -1)
        diff = self._chunked_diff(self._run_tensorflow, x, expected)
        self._check_chunked(diff)
        if self._twin is not None:
            twin_diff = max(self._chunked_diff(self._twin.run, x, expected), self._twin_masked_diff(rng))
            if not twin_diff <= SELF_CHECK_TOLERANCE:  # a bug of ours, not the model's: serve without it
                log.warning("NumPy twin differs from Keras: every batch runs in TensorFlow",
                            extra={"fields": {"max_abs_diff": twin_diff}})
                self._twin = None
        log.info("model self-check passed", extra={"fields": {
            "max_abs_diff": diff, "numpy_twin": self._twin is not None}})

    def _chunked_diff(self, run, x: np.ndarray, expected: np.ndarray) -> float:
        outputs, states = [], self.zero_states(x.shape[0])
        for start, stop in ((0, 5), (5, 6), (6, 19), (19, 24)):
            y, states = run(list(x[:, start:stop]), states)
            outputs.append(np.stack(y))
        chunked = np.concatenate(outputs, axis=1) if self.per_timestep_outputs else outputs[-1]
        return float(np.max(np.abs(chunked - expected)))

    def _twin_masked_diff(self, rng: np.random.Generator) -> float:
        """The twin against TensorFlow on one batch of chunks of different lengths (masked), from random
        states: outputs and new states."""
        inputs = [rng.normal(size=(length, self.features)).astype(np.float32) for length in (1, 4, 2, 7)]
        states = rng.normal(size=(len(inputs), self.state_size)).astype(np.float32) * 0.5
        y_tf, states_tf = self._run_tensorflow(inputs, states)
        y_np, states_np = self._twin.run(inputs, states)  # type: ignore[union-attr]
        diffs = [np.max(np.abs(a - b)) for a, b in zip(y_tf, y_np, strict=True)]
        return float(max(*diffs, np.max(np.abs(states_tf - states_np))))

    def _check_chunked(self, diff: float) -> None:
        if not diff <= SELF_CHECK_TOLERANCE:
            suspects = [f"{s.layer.name!r} ({type(s.layer).__name__})" for s in self._steps
                        if not s.state_sizes and not isinstance(s.layer, _PER_TIMESTEP)]
            which = (f"; the layers not known to work on each timestep alone: {', '.join(suspects)}" if suspects
                     else "")
            raise ModelLoadError(
                f"chunked calls differ from Keras on the whole sequence by {diff:.3g}: a layer mixes timesteps "
                f"within a chunk, so the model cannot be served one chunk at a time{which}"
            )

    def _keras_reference(self, x: np.ndarray) -> np.ndarray:
        model = self._source
        for layer in model.layers:
            if getattr(layer, "stateful", False):
                layer.reset_state()
        y = keras.ops.convert_to_numpy(model(x, training=False))
        for layer in model.layers:
            if getattr(layer, "stateful", False):
                layer.reset_state()
        return y

    def warm_up(self, timesteps: tuple[int, ...] = ()) -> None:
        """Trace the generic calls before serving, so no request ever waits for tracing; then start
        compiling XLA shapes for these chunk lengths in the background."""
        x, states = np.zeros((2, 2, self.features), np.float32), self.zero_states(2)
        self._call(x, states)
        self._call_masked(x, states, np.ones((2, 2), bool))
        if self._xla:
            self._xla.prepare(timesteps)

    def close(self) -> None:
        if self._xla:
            self._xla.close()


class _XlaShapes:
    """XLA-compiled calls, one per (masked, batch bucket, timesteps), compiled in the background.

    XLA recompiles for every concrete shape (0.3 to 0.8 s each on 2 cores), so a request never waits
    for it: a shape seen for the first time runs on the generic traced call while a background thread
    compiles it; later batches of that shape use XLA. Chunk lengths are not padded (padding costs more
    than it saves); batch sizes are, to buckets, so a few executables cover every batch:

    - powers of two, compiled at start-up for the --warmup-timesteps lengths, except the shapes whose
      batches all run on the NumPy twin (bucket x timesteps <= --numpy-max-batch-timesteps: with the
      defaults, none for one-timestep chunks and 32 and 64 rows for 20);
    - for those lengths, above 16, four buckets per doubling (20, 24, 28, 32, 40, 48, 56, 64, ...), so
      padding adds at most a quarter: with powers of two alone a batch of 33 ran as 64 rows, 3.0 ms
      against 1.9 for 40 (T=20, 2 cores), and under 64 streams half the batches were over 32. They are
      compiled on first use, meanwhile their batches run on the compiled power of two, so start-up
      compiles no more. Other lengths keep powers of two: up to four times fewer compiles while serving.
    """

    MAX_TIMESTEPS = 64  # longer chunks gain little from XLA and would multiply the shapes to compile
    MAX_SHAPES = 96
    FINE_ABOVE = 16  # batch buckets above this are a quarter of a doubling apart

    def __init__(self, forward, features: int, state_size: int, max_batch: int, twin_serves: int) -> None:
        # Calling the tf.function (not a concrete function) measured faster: 0.55 against 1.25 ms.
        self.function = tf.function(forward, jit_compile=True)
        self._features = features
        self._state_size = state_size
        self._max_batch = 1 << max(0, (max_batch - 1).bit_length())
        self._ready: set[tuple[bool, int, int]] = set()
        self._queued: set[tuple[bool, int, int]] = set()
        self._lock = threading.Lock()
        self._compiler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xla-compile")
        self._warm_up: set[tuple[bool, int, int]] = set()  # shapes asked for at start-up
        self._fine_lengths: set[int] = set()  # chunk lengths that get the finer buckets
        self._twin_serves = twin_serves  # batches of at most this many chunks x timesteps never come here

    @staticmethod
    def power_bucket(batch: int) -> int:
        return 1 << (batch - 1).bit_length()

    @classmethod
    def bucket(cls, batch: int) -> int:
        """The batch size a batch of `batch` chunks is padded to, once that shape is compiled."""
        power = cls.power_bucket(batch)
        if power <= cls.FINE_ABOVE:
            return power
        step = power // 8  # four buckets per doubling
        return -(-batch // step) * step

    def lookup(self, masked: bool, batch: int, timesteps: int) -> int | None:
        """The batch bucket to pad to: the batch's own when compiled, else its power of two when that is
        compiled (the batch's own is compiled meanwhile); None (run uncompiled) when neither is."""
        if timesteps > self.MAX_TIMESTEPS or batch > self._max_batch:
            return None
        power = self.power_bucket(batch)
        bucket = self.bucket(batch) if timesteps in self._fine_lengths else power
        if (masked, bucket, timesteps) in self._ready:
            return bucket
        self._schedule((masked, bucket, timesteps))
        if power != bucket and (masked, power, timesteps) in self._ready:
            return power
        return None

    def prepare(self, timesteps: tuple[int, ...]) -> None:
        for steps in timesteps:
            self._fine_lengths.add(steps)
            bucket = 1
            while bucket <= self._max_batch and steps <= self.MAX_TIMESTEPS:
                # A batch reaches XLA only when its chunks x steps is over the twin's limit, and a batch
                # padded to this bucket has at most `bucket` chunks: within the limit, never used.
                if bucket * steps > self._twin_serves:
                    self._warm_up.add((False, bucket, steps))
                    self._schedule((False, bucket, steps))
                bucket *= 2

    def _schedule(self, key: tuple[bool, int, int]) -> None:
        with self._lock:
            if key in self._queued or len(self._queued) >= self.MAX_SHAPES:
                return
            self._queued.add(key)
        self._compiler.submit(self._compile, key)

    def _compile(self, key: tuple[bool, int, int]) -> None:
        masked, batch, timesteps = key
        args = [tf.zeros([batch, timesteps, self._features]), tf.zeros([batch, self._state_size])]
        if masked:
            args.append(tf.ones([batch, timesteps], tf.bool))
        started = time.perf_counter()
        self.function(*args)  # the first call of a shape traces and compiles it
        seconds = time.perf_counter() - started
        self._ready.add(key)
        labels = (str(masked).lower(), str(batch), str(timesteps))
        metrics.COMPILES.labels(*labels).inc()
        metrics.COMPILE_SECONDS.labels(*labels).inc(seconds)
        # One line per compile: a run that is slow at first and fast the second time shows why here. A
        # chunk length compiled while serving belongs in --warmup-timesteps (README, "Compiled shapes").
        log.info("compiled", extra={"fields": {
            "masked": masked, "batch": batch, "timesteps": timesteps, "seconds": round(seconds, 3),
            "cause": self._cause(key), "compiled_shapes": len(self._ready)}})

    def _cause(self, key: tuple[bool, int, int]) -> str:
        """warm-up; batch size (a finer bucket of a shape already served compiled); traffic (a new shape)."""
        if key in self._warm_up:
            return "warm-up"
        masked, batch, timesteps = key
        if batch != self.power_bucket(batch) and (masked, self.power_bucket(batch), timesteps) in self._ready:
            return "batch size"
        return "traffic"

    def close(self) -> None:
        # Queued shapes are dropped; a compile already running cannot be interrupted, and the interpreter
        # would wait for its thread at exit anyway: wait here, so the server's last log line stays last.
        self._compiler.shutdown(wait=True, cancel_futures=True)
