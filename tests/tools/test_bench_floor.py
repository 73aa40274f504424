"""bench/peers/grpc_floor.py, the benchmark's front-end floor, shows perf_analyzer the server's own face.

`python -m bench.perf_analyzer` reads the floor's figures as "what this server's Triton-protocol front end
costs with nothing behind it", so the floor must serve the same model description and configuration,
check requests with the same code, answer in the same shapes, and count its answers in ModelStatistics
(perf_analyzer's server-side statistics and the benchmark's CPU per inference read them). Driven with the
real `tritonclient`, next to the real server on the default model.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from devkit import ROOT
from devkit.processes import ServerProcess, free_port, wait_until

pytestmark = pytest.mark.timeout(120)

MODEL = "default"


@pytest.fixture(scope="module")
def floor() -> Iterator[triton.InferenceServerClient]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "bench.peers.grpc_floor", "--port", str(port)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client = triton.InferenceServerClient(url=f"127.0.0.1:{port}")

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"the floor exited: {process.stderr.read() if process.stderr else ''}")
        try:
            return bool(client.is_model_ready(MODEL, client_timeout=5))
        except InferenceServerException:
            return False

    try:
        wait_until(ready, 90, "the floor to serve", interval_s=0.5)
        yield client
    finally:
        client.close()
        process.terminate()
        process.wait(30)


@pytest.fixture(scope="module")
def server(default_server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    with triton.InferenceServerClient(url=default_server.address) as client:
        yield client


def request(sequence_id: int, steps: int, name: str = "INPUT") -> list[triton.InferInput]:
    values = np.random.default_rng(sequence_id).normal(size=(steps, 1)).astype(np.float32)
    tensor = triton.InferInput(name, list(values.shape), "FP32")
    tensor.set_data_from_numpy(values)
    return [tensor]


def test_same_model_description_and_configuration(floor: triton.InferenceServerClient,
                                                   server: triton.InferenceServerClient) -> None:
    assert floor.get_model_metadata(MODEL, as_json=True) == server.get_model_metadata(MODEL, as_json=True)
    assert floor.get_model_config(MODEL, as_json=True) == server.get_model_config(MODEL, as_json=True)


def test_answers_in_the_servers_shapes_and_counts_them(floor: triton.InferenceServerClient,
                                                       server: triton.InferenceServerClient) -> None:
    before = int(floor.get_inference_statistics(MODEL, as_json=True)["model_stats"][0].get("inference_count", 0))
    ours = server.infer(MODEL, request(7001, 20), sequence_id=7001, sequence_start=True)
    floors = [floor.infer(MODEL, request(7001, steps), sequence_id=7001, sequence_start=steps == 20)
              for steps in (20, 3)]
    assert floors[0].get_response(as_json=True)["outputs"] == ours.get_response(as_json=True)["outputs"]
    assert floors[0].as_numpy("OUTPUT").shape == ours.as_numpy("OUTPUT").shape == (20, 1)
    assert floors[1].as_numpy("OUTPUT").shape == (3, 1)
    assert not floors[0].as_numpy("OUTPUT").any()  # the floor runs no model: zeros, said in its docstring
    after = int(floor.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]["inference_count"])
    assert after - before == 2


def test_checks_requests_with_the_servers_code(floor: triton.InferenceServerClient,
                                               server: triton.InferenceServerClient) -> None:
    errors = []
    for client in (floor, server):
        with pytest.raises(InferenceServerException) as caught:
            client.infer(MODEL, request(7002, 5, name="WRONG"), sequence_id=7002, sequence_start=True)
        errors.append((caught.value.status(), caught.value.message()))
    assert errors[0] == errors[1]
    assert "WRONG" in errors[0][1]
