"""`lstm-stream`, the client's command line, against a real server: a CSV file round-trips and equals
Keras; --resume continues a stream; bad files, bad ids and an unreachable server get clear messages
and the documented exit codes (see lstm_stream/client/cli.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from devkit import ROOT
from devkit.processes import free_port
from devkit.references import TOLERANCE, keras_whole_sequence
from lstm_stream.client.cli import EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE
from server.config import DEFAULT_MODEL

pytestmark = pytest.mark.timeout(180)


def cli(*args: str, target: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'clients' / 'python'}"}
    return subprocess.run([sys.executable, "-m", "lstm_stream.client.cli", "--target", target, *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)


def read_csv(text: str) -> np.ndarray:
    return np.array([[float(v) for v in line.split(",")] for line in text.splitlines() if line], dtype=np.float32)


def test_predict_round_trips_a_csv_file_and_resumes(default_server, tmp_path: Path) -> None:
    target = default_server.address
    x = np.random.default_rng(11).normal(size=(75, 1)).astype(np.float32)
    head, tail = tmp_path / "head.csv", tmp_path / "tail.npy"
    head.write_text("value\n" + "".join(f"{v:.9g}\n" for v in x[:50, 0]))  # with a header line
    np.save(tail, x[50:])
    stream_id = f"cli-{uuid.uuid4().hex[:6]}"

    first = cli("predict", stream_id, str(head), "--chunk", "7", target=target)
    assert first.returncode == EXIT_OK, first.stderr
    out = tmp_path / "tail.csv"
    second = cli("predict", stream_id, str(tail), "--chunk", "9", "--resume", "--out", str(out), target=target)
    assert second.returncode == EXIT_OK, second.stderr
    assert "from offset 50" in second.stderr and "at offset 75" in second.stderr
    got = np.concatenate([read_csv(first.stdout), read_csv(out.read_text())])
    assert float(np.max(np.abs(got - keras_whole_sequence(DEFAULT_MODEL, x)))) <= TOLERANCE

    info = cli("info", stream_id, target=target)
    assert info.returncode == EXIT_OK and json.loads(info.stdout)["offset"] == 75
    # Without --resume the file starts a new sequence: the same answers as the first time.
    again = cli("predict", stream_id, str(head), "--chunk", "50", target=target)
    assert again.returncode == EXIT_OK and np.allclose(read_csv(again.stdout), read_csv(first.stdout), atol=TOLERANCE)
    assert cli("reset", stream_id, target=target).returncode == EXIT_OK
    assert json.loads(cli("info", stream_id, target=target).stdout)["exists"] is False
    model = cli("model", target=target)
    assert model.returncode == EXIT_OK and json.loads(model.stdout)["name"] == "sensor_forecaster"
    health = cli("health", target=target)
    assert health.returncode == EXIT_OK and health.stdout.strip() == "SERVING"


def test_bad_files_ids_and_servers_get_clear_errors(default_server, tmp_path: Path) -> None:
    target = default_server.address
    stream_id = f"cli-bad-{uuid.uuid4().hex[:6]}"
    cases = {
        "missing.csv": (None, "cannot read"),
        "words.csv": ("1.0\n2.0\nthree\n", "line 3"),
        "ragged.csv": ("1,2\n3\n", "columns"),
        "nan.csv": ("1.0\nnan\n", "row 2, column 1 is not a finite number"),
        "empty.csv": ("", "no rows"),
        "two-features.csv": ("1,2\n3,4\n", "values: expected an array [timesteps, 1]"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_text(content)
        result = cli("predict", stream_id, str(path), target=target)
        assert result.returncode == EXIT_USAGE, (name, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (name, result.stderr)
    # Nothing above reached the stream.
    assert json.loads(cli("info", stream_id, target=target).stdout)["exists"] is False

    good = tmp_path / "good.csv"
    good.write_text("0.5\n0.25\n")
    bad_id = cli("predict", "no\u0007bell", str(good), target=target)
    assert bad_id.returncode == EXIT_USAGE and "stream_id" in bad_id.stderr, bad_id.stderr
    assert cli("info", "x" * 500, target=target).returncode == EXIT_USAGE

    assert cli("predict", stream_id, str(good), target=target).returncode == EXIT_OK
    usage = cli("predict", stream_id, str(good), "--chunk", "0", target=target)
    assert usage.returncode == EXIT_USAGE and "--chunk" in usage.stderr

    nowhere = cli("--deadline", "1", "--attempt-timeout", "0.5", "model", target=f"127.0.0.1:{free_port()}")
    assert nowhere.returncode == EXIT_UNREACHABLE and "UNAVAILABLE" in nowhere.stderr, nowhere.stderr


def test_help_shows_examples_and_exit_codes() -> None:
    result = cli("--help", target="127.0.0.1:1")
    assert result.returncode == 0
    assert "lstm-stream predict sensor-42 samples.csv" in result.stdout and "exit codes" in result.stdout
