"""Simulated sensors: the seeded signal family the default model was trained on (:mod:`sensorsim`)."""

from __future__ import annotations

import numpy as np

from sensorsim import SensorSignal


def feature_seeds(stream_seed: int, features: int) -> list[int]:
    """Seeds of a stream's features: the stream seed itself for one feature, so a one-feature stream
    with seed s sends exactly ``sensorsim.generate(s, n)``; distinct seeds for more features."""
    return [stream_seed * features + f for f in range(features)]


class Sensor:
    """One stream's input: ``features`` seeded signals side by side, read chunk by chunk."""

    def __init__(self, stream_seed: int, features: int) -> None:
        self.seed = stream_seed
        self._signals = [SensorSignal(s) for s in feature_seeds(stream_seed, features)]

    def next(self, timesteps: int) -> np.ndarray:
        """The next chunk, float32 [timesteps, features], C-contiguous."""
        if len(self._signals) == 1:
            return self._signals[0].next(timesteps)
        return np.ascontiguousarray(np.hstack([signal.next(timesteps) for signal in self._signals]))


def sequence(stream_seed: int, features: int, length: int) -> np.ndarray:
    """The first ``length`` timesteps a sensor sends, float32 [length, features]."""
    return Sensor(stream_seed, features).next(length)
