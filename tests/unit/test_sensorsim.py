"""Tests for the synthetic sensor-signal generator (pure numpy, no TensorFlow)."""

from __future__ import annotations

import numpy as np
import pytest

from sensorsim import BLOCK_SIZE, VALUE_LIMIT, SensorSignal, generate


@pytest.mark.parametrize("seed", [0, 1, 42, 2**40])
def test_generate_is_deterministic_per_seed(seed: int) -> None:
    np.testing.assert_array_equal(generate(seed, 1500), generate(seed, 1500))


def test_generate_equals_sensor_signal_next() -> None:
    np.testing.assert_array_equal(generate(7, 800), SensorSignal(7).next(800))


def test_shorter_read_is_prefix_of_longer() -> None:
    np.testing.assert_array_equal(generate(11, 100), generate(11, 3000)[:100])


@pytest.mark.parametrize(
    "splits",
    [
        (10, 20),
        (1,) * 50,
        (0, 5, 0, BLOCK_SIZE - 5, 1, BLOCK_SIZE, 3 * BLOCK_SIZE + 7),
        (BLOCK_SIZE - 1, 2, 2 * BLOCK_SIZE - 1, 1000),
    ],
)
def test_next_is_split_invariant(splits: tuple[int, ...]) -> None:
    total = sum(splits)
    whole = SensorSignal(5).next(total)
    chunked = SensorSignal(5)
    parts = [chunked.next(n) for n in splits]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert chunked.position == total


def test_next_continues_the_stream() -> None:
    sensor = SensorSignal(3)
    first, second = sensor.next(64), sensor.next(64)
    np.testing.assert_array_equal(np.concatenate([first, second]), generate(3, 128))


@pytest.mark.parametrize("n", [0, 1, 37, BLOCK_SIZE, 2500])
def test_shape_and_dtype(n: int) -> None:
    out = SensorSignal(9).next(n)
    assert out.shape == (n, 1)
    assert out.dtype == np.float32
    out = generate(9, n)
    assert out.shape == (n, 1)
    assert out.dtype == np.float32


def test_negative_length_rejected() -> None:
    with pytest.raises(ValueError):
        SensorSignal(0).next(-1)


@pytest.mark.parametrize("seed", range(40))
def test_values_finite_and_bounded(seed: int) -> None:
    x = generate(seed, 4000)
    assert np.all(np.isfinite(x))
    assert np.all(np.abs(x) <= VALUE_LIMIT)
    # Not degenerate: a real signal that moves, not a constant or pure noise around zero.
    assert float(x.std()) > 0.1


def test_different_seeds_differ() -> None:
    signals = [generate(seed, 500) for seed in range(20)]
    for i in range(len(signals)):
        for j in range(i + 1, len(signals)):
            assert not np.allclose(signals[i], signals[j])


def test_signal_is_predictable_but_noisy() -> None:
    # Successive samples are strongly correlated (periodic + drift), yet not identical (noise).
    x = generate(123, 5000)[:, 0].astype(np.float64)
    corr = np.corrcoef(x[:-1], x[1:])[0, 1]
    assert 0.5 < corr < 0.9999
    assert np.any(np.diff(x) != 0.0)


def test_long_streams_stay_bounded() -> None:
    x = SensorSignal(17).next(200_000)
    assert np.all(np.abs(x) <= VALUE_LIMIT)
    assert float(np.abs(x).mean()) < 3.0
