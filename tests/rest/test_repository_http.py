"""Triton's repository extension over HTTP (docs/triton.md), as `tritonclient.http` calls it: the index (all, or
ready only), loading a model and unloading it or one version, answered by the same servicer methods as the
gRPC RPCs (tests/serving/test_model_repository.py tests what loading and unloading do to sequences). One
server on a two-version repository for the module; the default server for the one-model case."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from devkit.processes import RedisServer, ServerProcess
from devkit.repositories import install
from server.config import DEFAULT_MODEL

pytestmark = pytest.mark.timeout(180)

TIMEOUT_S = 30


@pytest.fixture(scope="module")
def repository_server(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
                      ) -> Iterator[ServerProcess]:
    # The shipped model as both versions: what is tested is the bookkeeping, and no Keras build in this process.
    repository = tmp_path_factory.mktemp("http-repository") / "models"
    for version in (1, 2):
        install(repository, "m", version, DEFAULT_MODEL)
    (repository / "m" / "version_policy").write_text("all\n")
    server = ServerProcess(redis_server.url, DEFAULT_MODEL, "--model-repository", str(repository),
                           "--version-drain-s", "1", "--xla", "false")
    yield server
    server.stop()


def states(client: triton_http.InferenceServerClient) -> dict[str, str]:
    return {row["version"]: row["state"] for row in client.get_model_repository_index() if row["name"] == "m"}


def test_index_load_and_unload_as_triton_serves_them(repository_server: ServerProcess) -> None:
    client = triton_http.InferenceServerClient(repository_server.http_url.removeprefix("http://"),
                                               connection_timeout=TIMEOUT_S, network_timeout=TIMEOUT_S)
    url = f"{repository_server.http_url}/v2/repository"
    try:
        assert states(client) == {"1": "READY", "2": "READY"}
        # One version, by Triton's parameter: it drains, so the ready-only index leaves it out.
        answer = requests.post(f"{url}/models/m/unload", json={"parameters": {"version": 1}}, timeout=TIMEOUT_S)
        assert answer.status_code == 200 and answer.content == b"", answer.text
        assert states(client)["1"] == "DRAINING"
        ready = requests.post(f"{url}/index", json={"ready": True}, timeout=TIMEOUT_S).json()
        assert [(row["name"], row["version"], row["state"]) for row in ready] == [("m", "2", "READY")]
        # Loading reads the folder again and serves what its policy says; then every version unloaded at once.
        client.load_model("m")
        assert states(client) == {"1": "READY", "2": "READY"}
        client.unload_model("m")
        assert set(states(client).values()) <= {"DRAINING", "UNAVAILABLE"}
        client.load_model("m")
        assert states(client) == {"1": "READY", "2": "READY"}

        with pytest.raises(InferenceServerException) as unknown:
            client.load_model("nope")
        assert unknown.value.status() == "404" and "'m'" in unknown.value.message(), unknown.value
        for body, field in (({"parameters": {"version": "1"}}, "parameters.version"),
                            ({"parameters": {"version": 1.5}}, "parameters.version")):
            refused = requests.post(f"{url}/models/m/unload", json=body, timeout=TIMEOUT_S)
            assert refused.status_code == 400 and field in refused.json()["error"], refused.text
        refused = requests.post(f"{url}/index", json={"ready": "yes"}, timeout=TIMEOUT_S)
        assert refused.status_code == 400 and refused.json()["error"].startswith("ready"), refused.text
        assert states(client) == {"1": "READY", "2": "READY"}  # nothing a refusal changed
    finally:
        client.close()


def test_a_one_model_server_refuses_loading_as_over_grpc(default_server: ServerProcess) -> None:
    url = f"{default_server.http_url}/v2/repository"
    index = requests.post(f"{url}/index", timeout=TIMEOUT_S)
    assert index.status_code == 200 and [row["state"] for row in index.json()] == ["READY"], index.text
    for action in ("load", "unload"):
        refused = requests.post(f"{url}/models/default/{action}", timeout=TIMEOUT_S)
        assert refused.status_code == 409, refused.text
        assert refused.json()["code"] == "FAILED_PRECONDITION" and "--model-repository" in refused.json()["error"]
