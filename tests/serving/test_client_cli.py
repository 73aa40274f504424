"""`lstm-stream`, the client's command line, against a real server: a CSV file round-trips and equals
Keras; --resume continues a stream; bad files, bad ids and an unreachable server get clear messages
and the documented exit codes (see lstm_stream/client/cli.py); on a model repository, `models`, `models
load`, `models unload --version` and `predict --model --model-version`."""

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


def test_models_load_unload_and_predict_on_a_named_model(start_server, tmp_path: Path) -> None:
    from devkit.repositories import install
    from devkit.small_models import build_lstm

    repository = tmp_path / "models"
    v1_file, v2_file = build_lstm(tmp_path / "v1.keras", seed=1), build_lstm(tmp_path / "v2.keras", seed=2)
    install(repository, "pump", 1, v1_file)
    install(repository, "pump", 2, v2_file)
    (repository / "pump" / "version_policy").write_text("all\n")
    install(repository, "fan", 1, DEFAULT_MODEL)
    server = start_server("--model-repository", str(repository), "--version-drain-s", "30", "--xla", "false")
    target = server.address

    def table(text: str) -> list[list[str]]:
        return [line.split(None, 3) for line in text.splitlines()]

    listing = cli("models", target=target)
    assert listing.returncode == EXIT_OK, listing.stderr
    assert table(listing.stdout) == [["NAME", "VERSION", "STATE", "REASON"], ["fan", "1", "READY"],
                                     ["pump", "1", "READY"], ["pump", "2", "READY"]]

    x = np.random.default_rng(3).normal(size=(25, 1)).astype(np.float32)
    samples = tmp_path / "x.npy"
    np.save(samples, x)
    stream_id = f"cli-m-{uuid.uuid4().hex[:6]}"
    on_v1 = cli("predict", stream_id, str(samples), "--chunk", "6", "--model", "pump", "--model-version", "1",
                target=target)
    assert on_v1.returncode == EXIT_OK, on_v1.stderr
    assert "(model 'pump' version 1)" in on_v1.stderr
    assert float(np.max(np.abs(read_csv(on_v1.stdout) - keras_whole_sequence(v1_file, x)))) <= TOLERANCE
    newest = cli("predict", stream_id, str(samples), "--model", "pump", target=target)  # a new sequence: the newest
    assert newest.returncode == EXIT_OK and "version 2" in newest.stderr, newest.stderr
    assert float(np.max(np.abs(read_csv(newest.stdout) - keras_whole_sequence(v2_file, x)))) <= TOLERANCE
    info = json.loads(cli("info", stream_id, "--model", "pump", target=target).stdout)
    assert (info["model"], info["model_version"], info["offset"]) == ("pump", 2, 25)
    described = json.loads(cli("model", "--model", "pump", "--model-version", "1", target=target).stdout)
    assert described["version"] == 1

    unloaded = cli("models", "unload", "pump", "--version", "1", target=target)
    assert unloaded.returncode == EXIT_OK, unloaded.stderr
    assert table(unloaded.stdout)[1:3] == [["pump", "1", "DRAINING", "unloaded on request"], ["pump", "2", "READY"]]
    loaded = cli("models", "load", "pump", target=target)
    assert loaded.returncode == EXIT_OK and table(loaded.stdout)[1:] == [["pump", "1", "READY"], ["pump", "2", "READY"]]
    unknown = cli("models", "load", "nope", target=target)
    assert unknown.returncode == 1 and "'fan', 'pump'" in unknown.stderr, unknown.stderr
