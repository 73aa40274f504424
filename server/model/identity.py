"""A stand-in for the model runner that skips the model: the benchmark's no-model ceiling.

Same interface, same slot size and the same Redis work as the real runner it stands in for, but
`run` copies inputs to outputs and states through, so a benchmark can measure everything except the
model call. Its fingerprint differs from the real model's, so its slots are never fed to the model.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np

from server.types import ModelDescription


class IdentityRunner:
    def __init__(self, real: ModelDescription, max_chunk_timesteps: int) -> None:
        fingerprint = hashlib.sha256(f"identity:{real.fingerprint}".encode()).hexdigest()[:16]
        self.description = replace(real, name=f"identity({real.name})", fingerprint=fingerprint)
        self.state_size = real.state_size
        self.max_chunk_timesteps = max_chunk_timesteps
        self._output_size = real.output_size

    def zero_states(self, batch: int) -> np.ndarray:
        return np.zeros((batch, self.state_size), dtype=np.float32)

    def run(self, inputs: list[np.ndarray], states: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        outputs = []
        for chunk in inputs:
            rows = chunk if self.description.per_timestep_outputs else chunk[-1:]
            out = np.zeros((rows.shape[0], self._output_size), np.float32)
            width = min(self._output_size, rows.shape[1])
            out[:, :width] = rows[:, :width]
            outputs.append(out)
        return outputs, states.copy()

    def warm_up(self, timesteps: tuple[int, ...] = ()) -> None:
        """Nothing to compile."""

    def close(self) -> None:
        """Nothing to release."""
