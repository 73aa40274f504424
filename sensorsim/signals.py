"""Seeded synthetic single-channel sensor signals.

Each seed describes one simulated sensor. Its signal, in normalized units, is

    x[t] = offset + sum_k amp_k * sin(2*pi*t / period_k + phase_k)   (1 or 2 components, periods 15-200)
           + drift[t]                                                (mean-reverting random walk)
           + noise[t]                                                (white gaussian)
           with occasional faults applied on top:
             spike        a 1-2 sample jump of +-1..2.5,
             stuck-at     the value freezes for 5-40 samples,
             level shift  the signal is offset by +-0.5..1.5 for 10-80 samples,
    and finally clipped to [-4, 4].

The drift is an Ornstein-Uhlenbeck process (a random walk pulled back towards zero, with a correlation
time of hundreds to thousands of steps), so over a window of a few hundred steps it looks like a slow
wander or trend, yet an endless stream stays bounded. Every parameter above is drawn per seed.

The stream is produced in fixed blocks of ``BLOCK_SIZE`` samples; block ``b`` draws its randomness from its
own generator seeded by ``(seed, b)``, and the only state carried between blocks (drift value, faults that
run past a block's end) is computed in block order. So the samples do not depend on how the reads are
split: ``SensorSignal(s).next(30)`` equals ``next(10)`` followed by ``next(20)`` on another instance.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np

__all__ = ["BLOCK_SIZE", "VALUE_LIMIT", "SensorSignal", "SignalParams", "generate"]

BLOCK_SIZE = 512
"""Samples generated per block (the unit of randomness; reads of any size are carved out of blocks)."""

VALUE_LIMIT = 4.0
"""Every sample lies in ``[-VALUE_LIMIT, VALUE_LIMIT]``."""

# Domain tags for the seed sequences, so parameter and block generators never share a stream.
_PARAM_STREAM = 0x5E45_0001
_BLOCK_STREAM = 0x5E45_0002

_SPIKE, _STUCK, _SHIFT = 0, 1, 2
_FAULT_MIX = (0.5, 0.25, 0.25)  # probabilities of spike, stuck-at, level shift


@dataclass(frozen=True)
class SignalParams:
    """The parameters one seed draws for its sensor."""

    offset: float
    periods: tuple[float, ...]
    amplitudes: tuple[float, ...]
    phases: tuple[float, ...]
    drift_std: float  # stationary standard deviation of the drift
    drift_tau: float  # drift correlation time, in steps
    noise_std: float
    fault_rate: float  # expected faults per sample (0 for a fault-free sensor)

    @classmethod
    def draw(cls, rng: np.random.Generator) -> SignalParams:
        n_components = int(rng.integers(1, 3))
        # Log-uniform periods in [15, 200]: short and long cycles equally likely.
        periods = tuple(float(p) for p in np.exp(rng.uniform(math.log(15.0), math.log(200.0), n_components)))
        secondary = rng.uniform(0.1, 0.7, n_components - 1)
        amplitudes = (float(rng.uniform(0.5, 1.5)), *(float(a) for a in secondary))
        phases = tuple(float(p) for p in rng.uniform(0.0, 2.0 * math.pi, n_components))
        fault_free = rng.random() < 0.2
        fault_rate = 0.0 if fault_free else float(rng.uniform(1 / 2000, 1 / 300))
        return cls(
            offset=float(rng.uniform(-0.5, 0.5)),
            periods=periods,
            amplitudes=amplitudes,
            phases=phases,
            drift_std=float(rng.uniform(0.05, 0.5)),
            drift_tau=float(rng.uniform(200.0, 2000.0)),
            noise_std=float(rng.uniform(0.02, 0.15)),
            fault_rate=fault_rate,
        )


@dataclass
class _Fault:
    """A fault still in progress at a block boundary."""

    kind: int
    remaining: int
    value: float  # additive offset (spike, shift) or held value (stuck-at)


def _seed_key(seed: int) -> int:
    if isinstance(seed, bool):
        raise TypeError("seed must be an int, not bool")
    seed = operator.index(seed)
    # SeedSequence wants a non-negative entropy; map negatives one-to-one above the int64 range.
    return seed % (1 << 64) if seed < 0 else seed


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(entropy))))


class SensorSignal:
    """One simulated sensor's endless signal; ``next(n)`` continues where the previous call stopped."""

    def __init__(self, seed: int) -> None:
        self.seed = operator.index(seed)
        self._key = _seed_key(seed)
        self.params = SignalParams.draw(_rng(self._key, _PARAM_STREAM))
        p = self.params
        self._decay = math.exp(-1.0 / p.drift_tau)
        self._drift_sigma = p.drift_std * math.sqrt(1.0 - self._decay**2)
        # decay ** (k + 1) for k in a block: lets the drift recursion be evaluated with a cumsum.
        self._decay_powers = self._decay ** np.arange(1, BLOCK_SIZE + 1, dtype=np.float64)
        self._omegas = 2.0 * math.pi / np.asarray(p.periods, dtype=np.float64)
        self._amplitudes = np.asarray(p.amplitudes, dtype=np.float64)
        self._phases = np.asarray(p.phases, dtype=np.float64)
        # Drift starts from its stationary distribution (drawn from the parameter stream's sibling).
        init_rng = _rng(self._key, _PARAM_STREAM, 1)
        self._drift = float(init_rng.normal(0.0, p.drift_std))
        self._pending: list[_Fault] = []
        self._next_block = 0
        self._buffer = np.empty(0, dtype=np.float64)
        self._position = 0

    @property
    def position(self) -> int:
        """Number of samples returned so far."""
        return self._position

    def next(self, n: int) -> np.ndarray:
        """Return the next ``n`` samples as float32 of shape ``(n, 1)``."""
        n = operator.index(n)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        missing = n - self._buffer.size
        if missing > 0:
            n_blocks = -(-missing // BLOCK_SIZE)
            self._buffer = np.concatenate([self._buffer, *(self._make_block() for _ in range(n_blocks))])
        out = self._buffer[:n]
        self._buffer = self._buffer[n:].copy()
        self._position += n
        return out.astype(np.float32).reshape(n, 1)

    def _make_block(self) -> np.ndarray:
        p = self.params
        b = self._next_block
        self._next_block += 1
        rng = _rng(self._key, _BLOCK_STREAM, b)

        t = np.arange(b * BLOCK_SIZE, (b + 1) * BLOCK_SIZE, dtype=np.float64)
        x = p.offset + (self._amplitudes * np.sin(np.outer(t, self._omegas) + self._phases)).sum(axis=1)

        # Drift: d[k] = decay * d[k-1] + e[k],
        # i.e. d[k] = decay^(k+1) * (d[-1] + sum_{j<=k} e[j] / decay^(j+1)).
        steps = rng.normal(0.0, self._drift_sigma, BLOCK_SIZE)
        drift = self._decay_powers * (self._drift + np.cumsum(steps / self._decay_powers))
        self._drift = float(drift[-1])
        x += drift
        x += rng.normal(0.0, p.noise_std, BLOCK_SIZE)

        # Faults still running from the previous block, then the ones starting in this block.
        carried, self._pending = self._pending, []
        for fault in carried:
            self._apply(x, 0, fault.kind, fault.remaining, fault.value)
        n_faults = int(rng.poisson(p.fault_rate * BLOCK_SIZE))
        starts = np.sort(rng.integers(0, BLOCK_SIZE, n_faults))
        kinds = rng.choice(3, size=n_faults, p=_FAULT_MIX)
        signs = rng.choice((-1.0, 1.0), size=n_faults)
        spike_len = rng.integers(1, 3, n_faults)
        spike_amp = rng.uniform(1.0, 2.5, n_faults)
        stuck_len = rng.integers(5, 41, n_faults)
        shift_len = rng.integers(10, 81, n_faults)
        shift_amp = rng.uniform(0.5, 1.5, n_faults)
        for i in range(n_faults):
            start, kind = int(starts[i]), int(kinds[i])
            if kind == _SPIKE:
                length, value = int(spike_len[i]), float(signs[i] * spike_amp[i])
            elif kind == _STUCK:
                length, value = int(stuck_len[i]), float(x[start])
            else:
                length, value = int(shift_len[i]), float(signs[i] * shift_amp[i])
            self._apply(x, start, kind, length, value)

        np.clip(x, -VALUE_LIMIT, VALUE_LIMIT, out=x)
        return x

    def _apply(self, x: np.ndarray, start: int, kind: int, length: int, value: float) -> None:
        end = start + length
        if kind == _STUCK:
            x[start:end] = value
        else:
            x[start:end] += value
        if end > BLOCK_SIZE:
            self._pending.append(_Fault(kind, end - BLOCK_SIZE, value))


def generate(seed: int, length: int) -> np.ndarray:
    """The first ``length`` samples of sensor ``seed``, float32 of shape ``(length, 1)``."""
    return SensorSignal(seed).next(length)
