"""Train the shipped default model, a next-step forecaster for one normalized sensor channel.

The model reads a sensor signal x[0..T) and, at every timestep t, predicts x[t+1]. It is trained on
windows cut from many simulated sensors (:mod:`sensorsim`) and saved to ``models/default.keras``, with
its metrics in ``models/default.json``. Run from the repository root:

    .venv/bin/python training/train_default_model.py [--out models/default.keras] [--epochs 5] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent

# Sensor seeds for validation start here, far above any training seed, so the two sets never share a sensor.
VALIDATION_SEED_BASE = 1_000_000
# Long-sequence check: this many validation sensors, one sequence of this many steps each.
LONG_SENSORS = 20
LONG_LENGTH = 2000


def build_model() -> Any:
    """The default architecture (binding: benchmarks compare against a 2-layer 64-unit LSTM)."""
    import keras
    from keras import layers

    return keras.Sequential(
        [
            keras.Input(shape=(None, 1)),
            layers.LSTM(64, return_sequences=True, name="lstm_1"),
            layers.LSTM(64, return_sequences=True, name="lstm_2"),
            layers.Dense(1, name="forecast"),
        ],
        name="sensor_forecaster",
    )


def make_windows(
    sensor_seeds: np.ndarray, windows_per_sensor: int, length: int, max_start: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Cut ``windows_per_sensor`` windows of ``length + 1`` samples from each sensor at random starts.

    Returns ``(x, y)``, both float32 of shape ``(n_windows, length, 1)``, with ``y[:, t] = x[:, t + 1]``
    in signal terms (the next sample).
    """
    from sensorsim import generate

    xs, ys = [], []
    for sensor_seed in sensor_seeds:
        signal = generate(int(sensor_seed), max_start + length + 1)
        for start in rng.integers(0, max_start + 1, windows_per_sensor):
            window = signal[start : start + length + 1]
            xs.append(window[:-1])
            ys.append(window[1:])
    return np.stack(xs), np.stack(ys)


def architecture_summary(model: Any) -> str:
    parts = [f"Input(shape={tuple(model.input_shape[1:])})"]
    for layer in model.layers:
        config = layer.get_config()
        if "units" in config:
            extra = ", return_sequences=True" if config.get("return_sequences") else ""
            parts.append(f"{type(layer).__name__}({config['units']}{extra}, name={layer.name!r})")
        else:
            parts.append(f"{type(layer).__name__}(name={layer.name!r})")
    return f"{model.name}: " + " -> ".join(parts) + f"; {model.count_params():,} parameters"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models/default.keras"), help="where to save the model")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0, help="seed for sensor choice, window cuts and weights")
    parser.add_argument("--train-sensors", type=int, default=500)
    parser.add_argument("--val-sensors", type=int, default=100)
    parser.add_argument("--windows-per-sensor", type=int, default=4)
    parser.add_argument("--window-length", type=int, default=160, help="timesteps per training window")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    args = parser.parse_args(argv)
    if args.out.suffix != ".keras":
        parser.error("--out must end in .keras")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if str(REPO_ROOT) not in sys.path:  # so `python training/train_default_model.py` finds sensorsim
        sys.path.insert(0, str(REPO_ROOT))

    import keras

    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    t0 = time.perf_counter()
    # Sensors drawn from a large range so different --seed values see different fleets.
    train_seeds = rng.choice(VALIDATION_SEED_BASE, size=args.train_sensors, replace=False)
    val_seeds = VALIDATION_SEED_BASE + rng.choice(VALIDATION_SEED_BASE, size=args.val_sensors, replace=False)
    max_start = 4000
    x_train, y_train = make_windows(train_seeds, args.windows_per_sensor, args.window_length, max_start, rng)
    x_val, y_val = make_windows(val_seeds, args.windows_per_sensor, args.window_length, max_start, rng)
    print(
        f"data: {len(x_train)} train / {len(x_val)} val windows of {args.window_length} steps "
        f"({time.perf_counter() - t0:.1f}s)"
    )

    model = build_model()
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=args.learning_rate), loss="mse")
    summary = architecture_summary(model)
    print(summary)

    t_fit = time.perf_counter()
    history = model.fit(
        x_train,
        y_train,
        batch_size=args.batch_size,
        epochs=args.epochs,
        validation_data=(x_val, y_val),
        shuffle=True,
        verbose=2,
    )
    fit_seconds = time.perf_counter() - t_fit

    train_mse = float(model.evaluate(x_train, y_train, batch_size=256, verbose=0))
    val_mse = float(model.evaluate(x_val, y_val, batch_size=256, verbose=0))
    # Naive baseline: predict that the next sample equals the current one.
    naive_val_mse = float(np.mean((x_val - y_val) ** 2))
    naive_train_mse = float(np.mean((x_train - y_train) ** 2))

    # The server runs endless streams with the state carried along, far past the training windows:
    # check the forecast stays good over long sequences from held-out sensors.
    x_long, y_long = make_windows(val_seeds[:LONG_SENSORS], 1, LONG_LENGTH, 0, rng)
    long_mse = float(np.mean((model.predict(x_long, verbose=0) - y_long) ** 2))
    naive_long_mse = float(np.mean((x_long - y_long) ** 2))

    print(f"train MSE            {train_mse:.5f}   (naive repeat-last {naive_train_mse:.5f})")
    print(f"validation MSE       {val_mse:.5f}")
    print(f"naive validation MSE {naive_val_mse:.5f}   (model / naive = {val_mse / naive_val_mse:.3f})")
    print(
        f"long-stream MSE      {long_mse:.5f}   ({LONG_SENSORS} held-out sensors x {LONG_LENGTH} steps; "
        f"naive {naive_long_mse:.5f})"
    )
    print(f"training time        {fit_seconds:.1f}s for {args.epochs} epochs")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    model.save(args.out)
    metrics: dict[str, Any] = {
        "task": "next-step forecast of one normalized sensor channel; output at every timestep",
        "train_mse": round(train_mse, 6),
        "val_mse": round(val_mse, 6),
        "naive_val_mse": round(naive_val_mse, 6),
        "naive_train_mse": round(naive_train_mse, 6),
        "val_mse_over_naive": round(val_mse / naive_val_mse, 4),
        "long_stream_mse": round(long_mse, 6),
        "naive_long_stream_mse": round(naive_long_mse, 6),
        "long_stream": f"{LONG_SENSORS} validation sensors x {LONG_LENGTH} steps, one sequence each",
        "epochs": args.epochs,
        "seed": args.seed,
        "train_samples": len(x_train),
        "val_samples": len(x_val),
        "window_length": args.window_length,
        "train_sensors": args.train_sensors,
        "val_sensors": args.val_sensors,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "epoch_val_mse": [round(float(v), 6) for v in history.history["val_loss"]],
        "train_seconds": round(fit_seconds, 1),
        "architecture": summary,
        "keras_version": keras.__version__,
        "data": "sensorsim.generate (synthetic sensors: periodic + drift + noise + faults)",
    }
    metrics_path = args.out.with_suffix(".json")
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"saved {args.out} and {metrics_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
