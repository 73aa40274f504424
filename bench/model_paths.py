"""The model call alone on each path: TensorFlow (XLA, compiled for every shape first) and the NumPy twin.

    python -m bench.model_paths            # the default model, one to two minutes
    python -m bench.model_paths --gateways # the batches gateways make: 32 to 512 chunks of 1 and 20 timesteps

For each batch (chunks x timesteps) it prints milliseconds of wall and CPU per call on each path, the
twin's gain in each, the largest difference between the two paths' outputs and states, and the twin's wall time
with its stacked LSTM layers run one after the other instead of as one pair (numpy_twin._LSTMPair, used
up to its MAX_ROWS chunks) with the pair's gain. The default of
--numpy-max-batch-timesteps comes from where the gain crosses 1 on this machine (README, "Small
batches run in NumPy").
"""

from __future__ import annotations

import argparse
import time

# Before NumPy: it must load with the server's one BLAS thread (server/__init__.py), or the twin is
# measured with threads the server never gives it.
import server  # noqa: F401

# isort: split
import numpy as np

from devkit.processes import wait_until
from server.config import DEFAULT_MODEL
from server.model.runner import ModelRunner, _numpy_twin, load_keras_model

TIMESTEPS = (1, 2, 4, 8, 20, 50)
BATCHES = (1, 4, 8, 16, 32, 64)
# Many sensors per message (PredictBatch) make larger batches: what --max-batch allows.
GATEWAY_TIMESTEPS = (1, 20)
GATEWAY_BATCHES = (32, 64, 128, 256, 512)


def per_call(run, chunks: list[np.ndarray], states: np.ndarray, calls: int) -> tuple[float, float]:
    """Milliseconds of wall and of process CPU per call."""
    for _ in range(3):
        run(chunks, states)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        run(chunks, states)
    return (time.perf_counter() - wall) / calls * 1e3, (time.process_time() - cpu) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--gateways", action="store_true", help="the batch sizes gateways make (32 to 512)")
    args = parser.parse_args()
    timesteps, batches = (GATEWAY_TIMESTEPS, GATEWAY_BATCHES) if args.gateways else (TIMESTEPS, BATCHES)
    runner = ModelRunner(args.model, max(timesteps), xla=True, max_batch=max(batches), numpy_max_batch_timesteps=0)
    model = load_keras_model(args.model)
    twin, unpaired = _numpy_twin(model), _numpy_twin(model)
    if twin is None or unpaired is None:
        raise SystemExit("this model has no NumPy twin (the log line above says why)")
    unpaired._pairs = {}  # every layer on its own
    runner.warm_up(timesteps)
    xla = runner._xla
    shapes = {(False, batch, steps) for batch in batches for steps in timesteps}
    wait_until(lambda: shapes <= xla._ready, 600, "XLA shapes for every batch measured")  # type: ignore[union-attr]
    rng = np.random.default_rng(0)
    print(f"{'chunks x T':>11} | {'TF wall':>8} {'cpu':>7} | {'NumPy wall':>10} {'cpu':>7} | {'gain':>5} {'cpu':>5}"
          f" | max diff | {'unpaired':>8} {'pair gain':>9}")
    for steps in timesteps:
        for batch in batches:
            chunks = list(rng.normal(size=(batch, steps, runner.features)).astype(np.float32))
            states = rng.normal(0, 0.3, size=(batch, runner.state_size)).astype(np.float32)
            calls = 200 if steps * batch <= 64 else 50 if steps * batch <= 1280 else 10
            tf_wall, tf_cpu = per_call(runner.run, chunks, states, calls)
            np_wall, np_cpu = per_call(twin.run, chunks, states, calls)
            unpaired_wall, _ = per_call(unpaired.run, chunks, states, calls)
            (tf_y, tf_s), (np_y, np_s) = runner.run(chunks, states), twin.run(chunks, states)
            diff = max(max(float(np.max(np.abs(a - b))) for a, b in zip(tf_y, np_y, strict=True)),
                       float(np.max(np.abs(tf_s - np_s))))
            print(f"{batch:>4} x {steps:<4} | {tf_wall:8.3f} {tf_cpu:7.3f} | {np_wall:10.3f} {np_cpu:7.3f} | "
                  f"{tf_wall / np_wall:4.2f}x {tf_cpu / np_cpu:4.2f}x | {diff:.1e} | "
                  f"{unpaired_wall:8.3f} {unpaired_wall / np_wall:8.2f}x",
                  flush=True)
    runner.close()


if __name__ == "__main__":
    main()
