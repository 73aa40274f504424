"""The model runner: a Keras recurrent model turned into one compiled call with states in and out.

For a batch of B streams the call takes each chunk (float32 [T_i, features]) and the streams' states
(float32 [B, state_size]) and returns each chunk's outputs and the new states: what a slot is and how
the layer stack is rebuilt to take it is server/model/layers.py. Loading checks every layer, traces the
generic calls, proves on random data that chunked calls reproduce Keras on the whole sequence
(server/model/selfcheck.py) and, with --xla, starts compiling the batch shapes (server/model/shapes.py).
Small batches run on the NumPy twin (server/model/numpy_twin.py), the others in TensorFlow.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from lstm_stream.fingerprint import fingerprint
from server import metrics
from server.model.layers import RECURRENT_KINDS, ModelLoadError, ServingStack
from server.model.numpy_ops import Unsupported, padded
from server.model.numpy_twin import NumpyTwin
from server.model.selfcheck import self_check
from server.model.shapes import XlaShapes
from server.types import ModelDescription, RecurrentLayerInfo

__all__ = ["ModelLoadError", "ModelRunner", "fingerprint_model"]

log = logging.getLogger(__name__)


class _DeliberateRetracing(logging.Filter):
    """TensorFlow warns when a tf.function traces often; the XLA calls trace once per shape on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


logging.getLogger("tensorflow").addFilter(_DeliberateRetracing())


def load_keras_model(model_path: str | Path) -> keras.Model:
    path = Path(model_path)
    if not path.is_file():
        raise ModelLoadError(f"model file {str(path)!r} does not exist")
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types for a bad file; all mean the same here.
        raise ModelLoadError(f"could not load {str(path)!r} as a Keras model: {exc}") from exc


def fingerprint_model(model: keras.Model) -> str:
    """A digest of the architecture and every weight: slots written by another model are refused."""
    return fingerprint(model)  # one definition, shared with the load tester's --verify


def _numpy_twin(model: keras.Model) -> NumpyTwin | None:
    try:
        return NumpyTwin(model)
    except Unsupported as exc:
        log.info("no NumPy twin: every batch runs in TensorFlow", extra={"fields": {"reason": str(exc)}})
        return None


class ModelRunner:
    """Runs a batch of chunks of different streams in one compiled call, states in and out."""

    def __init__(
        self, model_path: str | Path, max_chunk_timesteps: int, *, xla: bool, max_batch: int,
        numpy_max_batch_timesteps: int,
    ) -> None:
        """Load the model file, check and rebuild its layers, trace and self-check the calls, and with
        `xla` start compiling their shapes; ModelLoadError says why a model cannot be served."""
        model = load_keras_model(model_path)
        self.max_chunk_timesteps = max_chunk_timesteps
        self._stack = ServingStack(model)
        self.features, self.state_size = self._stack.features, self._stack.state_size
        signature = [tf.TensorSpec([None, None, self.features], tf.float32),
                     tf.TensorSpec([None, self.state_size], tf.float32)]
        self._call = tf.function(self._stack.forward, input_signature=signature)
        self._call_masked = tf.function(self._stack.forward,
                                        input_signature=[*signature, tf.TensorSpec([None, None], tf.bool)])
        self._xla: XlaShapes | None = None
        self.per_timestep_outputs, self.output_size = self._probe_outputs()
        self.description = self._describe(model)
        self._numpy_max_batch_timesteps = numpy_max_batch_timesteps
        twin = _numpy_twin(model) if numpy_max_batch_timesteps > 0 else None
        self._twin = self_check(model, self._stack, self._run_tensorflow, twin, self.per_timestep_outputs)
        # XLA is 1.3 to 2.5 times faster per call here, but compiles once per concrete shape: see XlaShapes.
        if xla:
            # Batches the twin serves never reach XLA: their shapes are not compiled.
            twin_serves = self._numpy_max_batch_timesteps if self._twin is not None else 0
            self._xla = XlaShapes(self._stack.forward, self.features, self.state_size, max_batch, twin_serves)

    def _probe_outputs(self) -> tuple[bool, int]:
        """Whether the model answers every timestep or only the last, and its output width."""
        probe = self._call(tf.zeros([1, 3, self.features]), tf.zeros([1, self.state_size]))[0]
        if probe.shape.rank not in (2, 3):
            raise ModelLoadError(f"the model's output has shape {probe.shape}; expected [batch, (time,) units]")
        return probe.shape.rank == 3 and probe.shape[1] == 3, int(probe.shape[-1])

    def _describe(self, model: keras.Model) -> ModelDescription:
        return ModelDescription(
            name=model.name,
            fingerprint=fingerprint_model(model),
            input_features=self.features,
            output_size=self.output_size,
            per_timestep_outputs=self.per_timestep_outputs,
            state_size=self.state_size,
            recurrent_layers=tuple(
                RecurrentLayerInfo(s.layer.name, RECURRENT_KINDS[type(s.layer)], int(s.layer.units))
                for s in self._stack.recurrent
            ),
        )

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
