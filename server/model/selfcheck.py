"""The self-check at load: chunked calls must reproduce Keras on the whole sequence, or the model is refused.

On random data, the TensorFlow path run chunk by chunk (states carried between chunks) must equal the
Keras model run on the whole sequence; a model for which that fails (a layer that mixes timesteps, say)
is refused with ModelLoadError naming the suspect layers. The NumPy twin is checked the same way and
against TensorFlow on a masked batch; a twin that disagrees is a bug of ours, not the model's: it is
dropped with a warning and every batch runs in TensorFlow.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import keras
import numpy as np

from server.model.layers import PER_TIMESTEP, ModelLoadError, ServingStack
from server.model.numpy_twin import NumpyTwin

log = logging.getLogger(__name__)

SELF_CHECK_TOLERANCE = 1e-4

# The runner's call: chunks of B streams and their states in, outputs and new states out.
Run = Callable[[list[np.ndarray], np.ndarray], tuple[list[np.ndarray], np.ndarray]]


def self_check(model: keras.Model, stack: ServingStack, run_tensorflow: Run, twin: NumpyTwin | None,
               per_timestep_outputs: bool) -> NumpyTwin | None:
    """Raise ModelLoadError when chunked calls differ from Keras; return the twin when it agrees, else None."""
    rng = np.random.default_rng(0)
    batch = 3
    if model.layers and any(getattr(layer, "stateful", False) for layer in model.layers):
        batch = model.inputs[0].shape[0] or batch
    x = rng.normal(size=(batch, 24, stack.features)).astype(np.float32)
    with_keras = _keras_reference(model, x)
    expected = with_keras if per_timestep_outputs else with_keras.reshape(batch, 1, -1)
    diff = _chunked_diff(run_tensorflow, x, expected, stack.state_size, per_timestep_outputs)
    _refuse_if_chunks_differ(diff, stack)
    if twin is not None:
        twin_diff = max(_chunked_diff(twin.run, x, expected, stack.state_size, per_timestep_outputs),
                        _twin_masked_diff(run_tensorflow, twin, stack, rng))
        if not twin_diff <= SELF_CHECK_TOLERANCE:  # a bug of ours, not the model's: serve without it
            log.warning("NumPy twin differs from Keras: every batch runs in TensorFlow",
                        extra={"fields": {"max_abs_diff": twin_diff}})
            twin = None
    log.info("model self-check passed", extra={"fields": {"max_abs_diff": diff, "numpy_twin": twin is not None}})
    return twin


def _chunked_diff(run: Run, x: np.ndarray, expected: np.ndarray, state_size: int, per_timestep_outputs: bool
                  ) -> float:
    outputs, states = [], np.zeros((x.shape[0], state_size), np.float32)
    for start, stop in ((0, 5), (5, 6), (6, 19), (19, 24)):
        y, states = run(list(x[:, start:stop]), states)
        outputs.append(np.stack(y))
    chunked = np.concatenate(outputs, axis=1) if per_timestep_outputs else outputs[-1]
    return float(np.max(np.abs(chunked - expected)))


def _twin_masked_diff(run_tensorflow: Run, twin: NumpyTwin, stack: ServingStack, rng: np.random.Generator) -> float:
    """The twin against TensorFlow on one batch of chunks of different lengths (masked), from random
    states: outputs and new states."""
    inputs = [rng.normal(size=(length, stack.features)).astype(np.float32) for length in (1, 4, 2, 7)]
    states = rng.normal(size=(len(inputs), stack.state_size)).astype(np.float32) * 0.5
    y_tf, states_tf = run_tensorflow(inputs, states)
    y_np, states_np = twin.run(inputs, states)
    diffs = [np.max(np.abs(a - b)) for a, b in zip(y_tf, y_np, strict=True)]
    return float(max(*diffs, np.max(np.abs(states_tf - states_np))))


def _refuse_if_chunks_differ(diff: float, stack: ServingStack) -> None:
    if not diff <= SELF_CHECK_TOLERANCE:
        suspects = [f"{s.layer.name!r} ({type(s.layer).__name__})" for s in stack.steps
                    if not s.state_sizes and not isinstance(s.layer, PER_TIMESTEP)]
        which = f"; the layers not known to work on each timestep alone: {', '.join(suspects)}" if suspects else ""
        raise ModelLoadError(
            f"chunked calls differ from Keras on the whole sequence by {diff:.3g}: a layer mixes timesteps "
            f"within a chunk, so the model cannot be served one chunk at a time{which}"
        )


def _keras_reference(model: keras.Model, x: np.ndarray) -> np.ndarray:
    for layer in model.layers:
        if getattr(layer, "stateful", False):
            layer.reset_state()
    y = keras.ops.convert_to_numpy(model(x, training=False))
    for layer in model.layers:
        if getattr(layer, "stateful", False):
            layer.reset_state()
    return y
