"""lstm-loadtest: short real runs against real servers and Redis.

Verification passes on a healthy server, fails (exit 1, naming the streams) when the server's Redis is
flushed or a stream is reset behind the tool's back, and survives a stalled Redis by retrying chunks
that the server then applies only once. The JSON report has the fields docs/loadtest.md names and the
plot is a PNG. Figures themselves are not asserted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from devkit import ROOT
from devkit.processes import RedisServer, ServerProcess, free_port, wait_until
from loadtest import EXIT_FAILED_CHUNKS, EXIT_OK, EXIT_USAGE, EXIT_VERIFY_FAILED, ConfigError, LoadConfig, run_load
from lstm_stream.v1 import stream_pb2 as pb
from server.api.validation import MAX_STREAM_ID_BYTES
from server.config import DEFAULT_MODEL

RUN_TIMEOUT_S = 120
LATENCY_FIELDS = {"p50", "p90", "p99", "p99.9", "max"}
# The report fields docs/loadtest.md documents (test_the_load_test_page_names_every_report_field keeps them in step).
REPORT_FIELDS = {
    "chunks_per_s", "timesteps_per_s", "latency_ms", "errors", "errors_total", "retries", "replays",
    "failed_chunks", "broken_streams", "chunks", "timesteps", "duration_s", "warmup_s", "streams",
    "chunk_timesteps", "api", "mode", "open_loop", "totals", "timeline", "latency_histogram", "server",
    "config", "verify", "exit_code", "started_at", "wall_s", "tool", "report_version",
}
VERIFY_FIELDS = {
    "passed", "tolerance", "max_abs_diff", "streams", "sequences", "timesteps", "rows_compared", "mismatches",
    "state_lost", "model_fingerprint_matches", "seconds", "verifier", "whole",
}


def loadtest_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "loadtest", "--no-progress", *args]


def start_cli(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(loadtest_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=env)


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        raise AssertionError(f"lstm-loadtest did not finish in {RUN_TIMEOUT_S} s:\n{out}\n{err}") from None
    return process.returncode, out, err


def offset_of(server: ServerProcess, stream_id: str) -> int:
    return server.stub.GetStream(pb.GetStreamRequest(stream_id=stream_id), timeout=5).offset


@pytest.mark.parametrize(
    ("api", "rate", "processes"), [("unary", None, 1), ("stream", 40.0, 1), ("stream", None, 2)],
    ids=["unary-closed-loop", "stream-open-loop", "stream-two-processes"]
)
def test_verify_passes_on_a_healthy_server(default_server: ServerProcess, api: str, rate: float | None,
                                           processes: int) -> None:
    config = LoadConfig(target=default_server.address, streams=6, chunk_timesteps=5, api=api, rate=rate,
                        duration_s=1.5, warmup_s=0.5, channels=2, processes=processes, verify=True,
                        model_path=str(DEFAULT_MODEL))
    report = run_load(config)
    assert report["exit_code"] == EXIT_OK
    assert report["verify"]["passed"], report["verify"]
    assert report["verify"]["streams"] == 6
    assert report["verify"]["model_fingerprint_matches"] is True
    assert set(report["verify"]) >= VERIFY_FIELDS
    assert report["chunks"] > 0 and not report["errors"] and not report["broken_streams"]
    assert (report["open_loop"] is not None) == (rate is not None)
    # What was compared is what was sent: every answered chunk's rows (the live check, every stream's)...
    assert report["verify"]["rows_compared"] == report["totals"]["timesteps"]
    # ... and the default sample of 4 streams again, whole from zero state after the run.
    whole = report["verify"]["whole"]
    assert whole["streams"] == 4 and not whole["mismatches"]
    assert 0 < whole["rows_compared"] < report["totals"]["timesteps"]
    assert report["verify"]["verifier"]["held_bytes_max"] > 0


@pytest.mark.parametrize("model", ["last_step", "gru_stateful"], ids=["last-step-2-features",
                                                                       "stateful-gru-3-features"])
def test_verify_handles_several_features_and_last_step_models(request: pytest.FixtureRequest, small_models,
                                                             model: str) -> None:
    server, model_path = request.getfixturevalue(f"{model}_server"), small_models[model]
    config = LoadConfig(target=server.address, streams=4, chunk_timesteps=7, api="stream", total_chunks=120,
                        warmup_s=0.0, verify=True, model_path=str(model_path))
    report = run_load(config)
    assert report["exit_code"] == EXIT_OK, report["verify"]
    assert report["verify"]["passed"]
    assert report["totals"]["chunks"] == 120
    rows_per_chunk = 1 if model == "last_step" else 7
    assert report["verify"]["rows_compared"] == 120 * rows_per_chunk


def test_cli_writes_the_json_report_and_the_plot(default_server: ServerProcess, tmp_path: Path) -> None:
    json_path, plot_path = tmp_path / "report.json", tmp_path / "plot.png"
    code, out, err = finish(start_cli(
        "--target", default_server.address, "--streams", "4", "--chunk", "3", "--duration", "1.5", "--warmup", "0.5",
        "--processes", "2", "--channels", "2", "--json", str(json_path), "--plot", str(plot_path),
    ))
    assert code == EXIT_OK, err
    assert "chunks/s" in out and "latency p99.9 (ms)" in out
    report = json.loads(json_path.read_text())
    assert set(report) >= REPORT_FIELDS
    assert set(report["latency_ms"]) >= LATENCY_FIELDS
    assert report["config"]["processes"] == 2
    # The server's model as GetModel describes it: these fields and no others (docs/loadtest.md, "The JSON report").
    assert list(report["server"]["model"]) == ["name", "fingerprint", "input_features", "output_size",
                                               "per_timestep_outputs", "max_chunk_timesteps"]
    assert report["chunks"] > 0 and report["totals"]["chunks"] >= report["chunks"]
    assert len(report["timeline"]["t_s"]) == len(report["timeline"]["chunks_per_s"]) > 0
    assert sum(report["latency_histogram"]["counts"]) == report["chunks"]
    png = plot_path.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(plot_path).shape
    assert width > 600 and height > 400


def test_verify_fails_when_the_servers_redis_is_flushed_mid_run(default_server: ServerProcess,
                                                                redis_server: RedisServer, tmp_path: Path) -> None:
    # The shared Redis, flushed of this run's keys alone: the other tests' streams live there too.
    prefix = f"lt-flush-{os.getpid()}"
    json_path = tmp_path / "report.json"
    # 3 s of closed-loop load: the flush comes once 20 timesteps are in, every stream's next chunk meets it.
    process = start_cli("--target", default_server.address, "--streams", "4", "--duration", "3", "--warmup", "0",
                        "--stream-prefix", prefix, "--verify", "--json", str(json_path))
    wait_until(lambda: process.poll() is not None or offset_of(default_server, f"{prefix}-0") >= 20, 60,
               "the load to get going")
    client = redis_server.client()
    flushed = client.delete(*client.scan_iter(match=f"*{prefix}-*", count=1000))
    code, out, err = finish(process)
    assert flushed >= 4
    assert code == EXIT_VERIFY_FAILED, out + err
    assert "verify: FAILED" in out
    report = json.loads(json_path.read_text())
    lost = report["verify"]["state_lost"]
    assert {item["stream_id"] for item in lost} == {f"{prefix}-{n}" for n in range(4)}
    for item in lost:
        assert item["code"] == "FAILED_PRECONDITION" and item["timestep"] >= 1 and item["server_offset"] == 0
        assert f"stream {item['stream_id']} (sequence 0): the server lost its state at timestep {item['timestep']}" \
            in " ".join(out.split())


def test_verify_fails_when_a_stream_is_reset_behind_its_back(default_server: ServerProcess, tmp_path: Path) -> None:
    # Without start_offset the server cannot refuse the chunks after the reset: only the outputs show it.
    prefix = f"lt-reset-{os.getpid()}"
    json_path = tmp_path / "report.json"
    process = start_cli("--target", default_server.address, "--streams", "3", "--chunk", "2", "--duration", "3",
                        "--warmup", "0", "--no-offsets", "--stream-prefix", prefix, "--verify", "--verify-sample",
                        "all", "--json", str(json_path))
    victim = f"{prefix}-1"
    wait_until(lambda: process.poll() is not None or offset_of(default_server, victim) >= 20, 60,
               "the load to get going")
    default_server.stub.ResetStream(pb.ResetStreamRequest(stream_id=victim), timeout=5)
    code, out, err = finish(process)
    assert code == EXIT_VERIFY_FAILED, out + err
    report = json.loads(json_path.read_text())
    mismatches = report["verify"]["mismatches"]
    assert [m["stream_id"] for m in mismatches] == [victim]  # the other streams are untouched
    mismatch = mismatches[0]
    assert mismatch["timestep"] >= 20 and mismatch["max_abs_diff"] > report["verify"]["tolerance"]
    assert mismatch["offset_drift"] is not None
    # The live check (states carried in the verifier's own rounds) and the whole-sequence check agree.
    whole = report["verify"]["whole"]
    assert whole["streams"] == 3
    assert [(m["stream_id"], m["segment"], m["timestep"], m["rows_over_tolerance"], m["rows"])
            for m in whole["mismatches"]] == [(victim, 0, mismatch["timestep"], mismatch["rows_over_tolerance"],
                                                mismatch["rows"])]
    assert f"stream {victim} (sequence 0): first mismatch at timestep {mismatch['timestep']}" in " ".join(out.split())


def test_a_warm_verifier_finds_a_stream_reset_behind_its_back(default_server: ServerProcess) -> None:
    # The suite keeps each worker's verifier warm (tests/conftest.py): a run on a verifier, and a reference,
    # that an earlier run left must still fail on a wrong answer, and name that stream alone.
    from loadtest import live_verify

    def config(prefix: str) -> LoadConfig:
        return LoadConfig(target=default_server.address, streams=3, chunk_timesteps=2, duration_s=3, warmup_s=0,
                          use_offsets=False, stream_prefix=prefix, verify=True, verify_sample=3,
                          model_path=str(DEFAULT_MODEL))

    assert run_load(config(f"lt-warm-ok-{os.getpid()}"))["exit_code"] == EXIT_OK
    (warm,) = [entry[0] for entry in live_verify._idle]
    prefix = f"lt-warm-{os.getpid()}"
    victim = f"{prefix}-1"

    def reset() -> None:
        wait_until(lambda: offset_of(default_server, victim) >= 20, 60, "the load to get going")
        default_server.stub.ResetStream(pb.ResetStreamRequest(stream_id=victim), timeout=5)

    saboteur = threading.Thread(target=reset, daemon=True)
    saboteur.start()
    report = run_load(config(prefix))
    saboteur.join(30)
    assert [entry[0] for entry in live_verify._idle] == [warm], "the second run did not use the warm verifier"
    assert report["exit_code"] == EXIT_VERIFY_FAILED, report["verify"]
    assert [m["stream_id"] for m in report["verify"]["mismatches"]] == [victim]
    assert [m["stream_id"] for m in report["verify"]["whole"]["mismatches"]] == [victim]


def test_retries_through_a_stalled_redis_apply_each_chunk_once(default_server: ServerProcess,
                                                               redis_server: RedisServer) -> None:
    # A stopped Redis stalls the server's saves: chunks time out at the client and are resent with the
    # same start_offset; whatever the server applied late must not be applied again (verify proves it).
    # The shared server and its Redis (stopping one costs no process): Redis is resumed in any case, and
    # the test ends once the server's health (which follows Redis) is SERVING again, for the tests after it.
    server, redis = default_server, redis_server
    try:
        prefix = f"lt-stall-{uuid.uuid4().hex[:6]}"
        config = LoadConfig(target=server.address, streams=3, chunk_timesteps=4, duration_s=4, warmup_s=0,
                            timeout_s=0.3, max_retries=20, stream_prefix=prefix, verify=True,
                            model_path=str(DEFAULT_MODEL))
        def stall() -> None:
            wait_until(lambda: offset_of(server, f"{prefix}-0") >= 20, 60, "the load to get going")
            assert redis.process is not None
            redis.process.send_signal(signal.SIGSTOP)
            try:
                threading.Event().wait(1.5)
            finally:
                redis.process.send_signal(signal.SIGCONT)

        saboteur = threading.Thread(target=stall, daemon=True)
        saboteur.start()
        report = run_load(config)
        saboteur.join(30)
    finally:
        redis.process.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        wait_until(server._serving, 30, "the shared server's health to follow Redis back to SERVING")
    assert report["exit_code"] == EXIT_OK, report["verify"]
    assert report["retries"] > 0
    assert report["errors"].keys() <= {"DEADLINE_EXCEEDED", "UNAVAILABLE"}
    assert not report["broken_streams"]


def test_exit_code_2_for_usage_and_connection_errors() -> None:
    script = Path(sys.executable).parent / "lstm-loadtest"
    command = [str(script)] if script.exists() else loadtest_command()
    usage = subprocess.run([*command, "--rate", "5", "--in-flight", "2"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == EXIT_USAGE
    nobody = subprocess.run([*command, "--target", f"127.0.0.1:{free_port()}", "--connect-timeout", "0.5",
                             "--duration", "1"], capture_output=True, text=True, timeout=60)
    assert nobody.returncode == EXIT_USAGE
    assert "cannot connect" in nobody.stderr


def test_sensors_are_the_seeded_training_signals() -> None:
    from loadtest.sensors import Sensor, sequence
    from sensorsim import generate

    one = Sensor(5, 1)
    np.testing.assert_array_equal(np.concatenate([one.next(3), one.next(7)]), generate(5, 10))
    stacked = sequence(5, 3, 10)
    assert stacked.shape == (10, 3) and stacked.dtype == np.float32
    np.testing.assert_array_equal(stacked[:, 1], generate(5 * 3 + 1, 10)[:, 0])


def test_a_chunk_budget_is_split_over_the_streams() -> None:
    config = LoadConfig(streams=4, total_chunks=10, duration_s=None)
    assert [config.chunk_budget(i) for i in range(4)] == [3, 3, 2, 2]


def test_stream_ids_must_fit_the_servers_limit() -> None:
    # Checked before connecting: the last stream's id, prefix + "-<index>", in UTF-8 bytes.
    fits = "p" * (MAX_STREAM_ID_BYTES - len("-9"))
    LoadConfig(streams=10, stream_prefix=fits).check()
    with pytest.raises(ConfigError, match=f"longer than {MAX_STREAM_ID_BYTES} bytes"):
        LoadConfig(streams=11, stream_prefix=fits).check()


def test_the_load_test_page_names_every_report_field() -> None:
    page = (ROOT / "docs" / "loadtest.md").read_text()
    missing = sorted(f for f in REPORT_FIELDS | VERIFY_FIELDS | LATENCY_FIELDS if f"`{f}`" not in page)
    assert not missing, f"docs/loadtest.md's JSON report table does not name: {missing}"


@pytest.mark.parametrize(("flags", "expected"), [((), EXIT_FAILED_CHUNKS), (("--no-fail-on-errors",), EXIT_OK)],
                         ids=["fail-on-errors", "no-fail-on-errors"])
def test_a_broken_sequence_fails_the_run_by_default(default_server: ServerProcess, tmp_path: Path, flags,
                                                    expected: int) -> None:
    # A stream reset behind the tool's back: with offsets the server refuses its next chunk
    # (FAILED_PRECONDITION), the sequence breaks, and a CI run must not read that as a pass.
    prefix = f"lt-exit-{os.getpid()}-{len(flags)}"
    json_path = tmp_path / "report.json"
    process = start_cli("--target", default_server.address, "--streams", "2", "--chunk", "2", "--duration", "3",
                        "--warmup", "0", "--max-restarts", "0", "--stream-prefix", prefix, "--json", str(json_path),
                        *flags)
    victim = f"{prefix}-1"
    wait_until(lambda: process.poll() is not None or offset_of(default_server, victim) >= 20, 60,
               "the load to get going")
    default_server.stub.ResetStream(pb.ResetStreamRequest(stream_id=victim), timeout=5)
    code, out, err = finish(process)
    assert code == expected, out + err
    report = json.loads(json_path.read_text())
    assert report["exit_code"] == expected
    assert [(b["stream_id"], b["code"]) for b in report["broken_streams"]] == [(victim, "FAILED_PRECONDITION")]
