"""Triton's own load generator, `perf_analyzer`, runs against this server as it does against Triton.

No `-x` (model version): perf_analyzer then finds the version whose statistics moved during its
measurement, which needs ModelStatistics with queue counts and a numeric version string. Unary and
`--streaming`, sequences with `--sequence-length` and `--sequence-id-range`, and the server-side
statistics it prints ("Server:" lines); over gRPC and over the HTTP/REST port (`-i http`, KServe v2 with
Triton's binary tensors: perf_analyzer reads the same statistics there). A few seconds per run: this checks
correctness, not speed.

perf_analyzer is a C++ binary that CI machines may not have. It is found through the environment
variable PERF_ANALYZER (a command, split on spaces), in the layout the Triton peer's setup script
builds under /tmp/triton (../shared/peers/triton/setup.sh: the PyPI wheel run through a newer glibc
loader), or on PATH; otherwise these tests are skipped, saying so.
"""

from __future__ import annotations

import subprocess

import pytest

from devkit.peers import perf_analyzer_command, triton_messages
from devkit.processes import ServerProcess

PERF_ANALYZER = perf_analyzer_command()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        PERF_ANALYZER is None,
        reason="perf_analyzer is not installed: set PERF_ANALYZER, put it on PATH, or build /tmp/triton "
        "with ../shared/peers/triton/setup.sh",
    ),
]


def model_name(server: ServerProcess) -> str:
    """The Keras model's name, as ModelMetadata reports it (what a perf_analyzer user would pass to -m)."""
    messages, stubs = triton_messages()
    stub = stubs.GRPCInferenceServiceStub(server.channel)
    return stub.ModelMetadata(messages.ModelMetadataRequest(name="default"), timeout=10).name


def endpoint(server: ServerProcess, protocol: str) -> list[str]:
    """perf_analyzer's -i and -u for the server's gRPC port or its HTTP/REST port (host:port, no scheme)."""
    if protocol == "http":
        return ["-i", "http", "-u", server.http_url.removeprefix("http://")]
    return ["-i", "grpc", "-u", server.address]


@pytest.mark.parametrize(("protocol", "mode"), [("grpc", []), ("grpc", ["--streaming"]), ("http", [])],
                         ids=["unary", "streaming", "http"])
def test_perf_analyzer_runs_without_a_model_version(default_server: ServerProcess, protocol: str,
                                                    mode: list[str]) -> None:
    assert PERF_ANALYZER is not None
    command = [
        *PERF_ANALYZER, "-m", model_name(default_server), *endpoint(default_server, protocol),
        "--shape", "INPUT:5,1", "--sequence-length", "4", "--sequence-id-range", "1000:1100",
        "--concurrency-range", "2:2", *mode,
        # Three windows of 0.5 s, accepted whatever their spread: a short correctness run on a busy machine.
        "-p", "500", "-r", "3", "-s", "1000",
    ]
    try:
        run = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"perf_analyzer did not finish within 60 s; its output so far:\n{exc.stdout}")
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "Server:" in output, output
    # The stages perf_analyzer reads from ModelStatistics, and a nonzero count of requests it saw answered.
    assert "Successful request count:" in output and "compute infer" in output, output
    counts = [line for line in output.splitlines() if "Successful request count:" in line]
    assert int(counts[-1].split(":")[1]) > 0, output
