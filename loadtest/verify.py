"""The whole-sequence check: recompute sequences with Keras from zero state, in one pass each, and compare
with what the server answered. --verify runs it, after the load, on the sample of streams the live
verifier kept whole (loadtest/live_verify.py; every stream with --verify-sample all): the check that
shares no chunking with the server or with the live verifier.

For every sequence a stream sent (from its reset to its end, or to the error that broke it) the
expected outputs are Keras' on the whole sequence from zero state, computed here from the model file.
To get an output at every timestep in one pass, even for a last-step model, the model is cloned with
every recurrent layer returning sequences (same weights, stateless, any batch size); a self-check
proves the clone equals the original before it is trusted. Sequences run in padded batches: the
models the server accepts are causal, so padding after a sequence cannot change its outputs.
A last-step model answers one row per chunk: it is compared with Keras at the chunk's last timestep.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.recorder import StreamLog
from lstm_stream.client.types import ModelInfo
from lstm_stream.fingerprint import fingerprint

# Largest padded batch, in timesteps x sequences, for one Keras call (bounds the memory it needs).
BATCH_TIMESTEPS = 200_000
MAX_BATCH = 64
CLONE_TOLERANCE = 1e-5
SHOWN_VALUES = 4


class VerifyError(RuntimeError):
    """The outputs cannot be recomputed (the model file cannot be loaded or cloned); exit code 2."""


@dataclass
class _Sequence:
    stream_id: str
    segment: int
    x: np.ndarray  # [length, features]
    got: np.ndarray  # [rows, output_size]
    rows_at: np.ndarray  # the timestep of each row of `got`
    chunk_ends: np.ndarray  # timesteps after each chunk (what the server's offsets should say)
    server_offsets: np.ndarray


def _sequences(logs: list[StreamLog], per_timestep: bool) -> list[_Sequence]:
    sequences = []
    for log in logs:
        for number, segment in enumerate(log.segments):
            if not segment.inputs:
                continue
            x = np.concatenate(segment.inputs)
            got = np.concatenate(segment.outputs)
            ends = np.cumsum([chunk.shape[0] for chunk in segment.inputs])
            rows_at = np.arange(x.shape[0]) if per_timestep else ends - 1
            sequences.append(_Sequence(log.stream_id, number, x, got, rows_at, ends,
                                       np.asarray(segment.server_offsets, dtype=np.int64)))
    return sequences


def every_timestep_copy(model: Any, inputs: Any, stateful: bool) -> Any:
    """`model` rebuilt on `inputs` (a keras.Input) with every recurrent layer returning sequences, stateful
    or not, with the same weights."""
    import keras

    def copy_layer(layer: Any) -> Any:
        config = layer.get_config()
        if isinstance(layer, keras.layers.RNN):
            config.update(return_sequences=True, stateful=stateful)
        return type(layer).from_config(config)

    copy = keras.models.clone_model(model, input_tensors=inputs, clone_function=copy_layer)
    copy.set_weights(model.get_weights())
    return copy


class KerasReference:
    """The model file as Keras runs it, giving outputs at every timestep of whole sequences."""

    def __init__(self, model_path: Path, features: int) -> None:
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import keras
        import tensorflow as tf

        self._keras = keras
        try:
            self.model = keras.models.load_model(model_path, compile=False)
        except Exception as exc:  # Keras raises many types for a bad file; all mean the same here
            raise VerifyError(f"cannot load {str(model_path)!r} with Keras: {exc}") from exc
        self.features = features
        self.sequence_model = self._clone()
        self._call = tf.function(lambda x: self.sequence_model(x, training=False),
                                 input_signature=[tf.TensorSpec([None, None, features], tf.float32)])
        self._self_check()

    def _clone(self) -> Any:
        try:
            return every_timestep_copy(self.model, self._keras.Input(shape=(None, self.features)), stateful=False)
        except Exception as exc:
            raise VerifyError(f"cannot rebuild the model to give outputs at every timestep: {exc}") from exc

    def original(self, x: np.ndarray) -> np.ndarray:
        """The unmodified model on whole sequences from zero state (a fixed-batch model gets padded rows)."""
        keras = self._keras
        batch = self.model.inputs[0].shape[0]
        inputs = x
        if batch is not None and batch != x.shape[0]:
            inputs = np.zeros((batch, *x.shape[1:]), dtype=np.float32)
            inputs[: x.shape[0]] = x
        for layer in self.model.layers:
            if getattr(layer, "stateful", False):
                layer.reset_state()
        y = keras.ops.convert_to_numpy(self.model(inputs, training=False))[: x.shape[0]]
        for layer in self.model.layers:
            if getattr(layer, "stateful", False):
                layer.reset_state()
        return y

    def _self_check(self) -> None:
        rng = np.random.default_rng(0)
        batch = min(self.model.inputs[0].shape[0] or 2, 2)
        x = rng.normal(size=(batch, 29, self.features)).astype(np.float32)
        expected = self.original(x)
        got = self(x)
        if expected.ndim == 2:
            got = got[:, -1]  # a last-step model: its output is the clone's last timestep
        if got.shape != expected.shape or not float(np.max(np.abs(got - expected))) <= CLONE_TOLERANCE:
            raise VerifyError("the model rebuilt to give every timestep's output does not reproduce the original; "
                              "this model's outputs cannot be verified")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """float32 [batch, time, features] -> [batch, time, output_size]."""
        return self._call(x).numpy()


def _batches(sequences: list[_Sequence]) -> list[list[_Sequence]]:
    ordered = sorted(sequences, key=lambda s: s.x.shape[0], reverse=True)
    batches: list[list[_Sequence]] = []
    for sequence in ordered:
        # Longest first: the first member of a batch sets its padded length.
        if batches and len(batches[-1]) < MAX_BATCH and \
                (len(batches[-1]) + 1) * batches[-1][0].x.shape[0] <= BATCH_TIMESTEPS:
            batches[-1].append(sequence)
        else:
            batches.append([sequence])
    return batches


def _offset_note(sequence: _Sequence) -> dict[str, int] | None:
    count = min(sequence.server_offsets.size, sequence.chunk_ends.size)
    wrong = np.nonzero(sequence.server_offsets[:count] != sequence.chunk_ends[:count])[0]
    if not wrong.size:
        return None
    k = int(wrong[0])
    return {"after_timestep": int(sequence.chunk_ends[k]) - 1, "server_offset": int(sequence.server_offsets[k]),
            "expected_offset": int(sequence.chunk_ends[k])}


def verify_streams(model_path: Path, model: ModelInfo, logs: list[StreamLog], broken: list[dict[str, Any]],
                   tolerance: float, reference: KerasReference | None = None) -> dict[str, Any]:
    """Compare every recorded answer with Keras (`reference`, or the model file loaded here)."""
    started = time.monotonic()
    if reference is None:
        reference = KerasReference(model_path, model.input_features)
    matches = fingerprint_matches(reference.model, model.fingerprint)
    sequences = _sequences(logs, model.per_timestep_outputs)
    worst = 0.0
    rows = 0
    mismatches: list[dict[str, Any]] = []
    for batch in _batches(sequences):
        length = batch[0].x.shape[0]
        x = np.zeros((len(batch), length, model.input_features), dtype=np.float32)
        for row, sequence in enumerate(batch):
            x[row, : sequence.x.shape[0]] = sequence.x
        y = reference(x)
        for row, sequence in enumerate(batch):
            expected = y[row, sequence.rows_at]
            diff = row_differences(sequence.stream_id, sequence.got, expected)
            rows += diff.size
            stream_worst = float(diff.max())
            worst = max(worst, stream_worst)
            bad = diff > tolerance
            if bad.any():
                mismatches.append({
                    "stream_id": sequence.stream_id,
                    "segment": sequence.segment,
                    **first_mismatch(sequence.rows_at, diff, bad, sequence.got, expected),
                    "max_abs_diff": stream_worst,
                    "rows_over_tolerance": int(bad.sum()),
                    "rows": int(diff.size),
                    "offset_drift": _offset_note(sequence),
                })
    mismatches.sort(key=lambda m: (m["stream_id"], m["segment"]))
    state_lost = [item for item in broken if item.get("state_lost")]
    return {
        "passed": not mismatches and not state_lost,
        "tolerance": tolerance,
        "max_abs_diff": worst,
        "streams": len(logs),
        "sequences": len(sequences),
        "timesteps": int(sum(s.x.shape[0] for s in sequences)),
        "rows_compared": rows,
        "mismatches": mismatches,
        "state_lost": state_lost,
        "model_file": str(model_path),
        "model_fingerprint_matches": matches,
        "seconds": round(time.monotonic() - started, 3),
    }


def row_differences(stream_id: str, got: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Each answered row's largest absolute difference from Keras' (a NaN counts as infinitely far)."""
    if expected.shape != got.shape:
        raise VerifyError(f"stream {stream_id}: the server's outputs have shape {got.shape}, Keras gives "
                          f"{expected.shape}")
    diff = np.max(np.abs(got - expected), axis=1)
    return np.where(np.isnan(diff), np.inf, diff)


def first_mismatch(times: np.ndarray, diff: np.ndarray, bad: np.ndarray, got: np.ndarray,
                   expected: np.ndarray) -> dict[str, Any]:
    """Where the first row over the tolerance is (`times`: each row's timestep), and its first values."""
    first = int(np.argmax(bad))
    return {"timestep": int(times[first]), "abs_diff": float(diff[first]),
            "expected": [float(v) for v in expected[first][:SHOWN_VALUES]],
            "got": [float(v) for v in got[first][:SHOWN_VALUES]]}


def fingerprint_matches(keras_model: Any, server_fingerprint: str) -> bool:
    """Whether the local file is the server's model (same architecture and weights)."""
    return fingerprint(keras_model) == server_fingerprint
