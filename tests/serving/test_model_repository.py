"""Invariant 14 (docs/invariants.md): a model repository, several models, versions, and sequences pinned to the
version that started them (docs/models.md). Real server processes, real Redis, real Keras models."""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest

from devkit.metrics import scrape
from devkit.native_calls import outputs, predict, status_of
from devkit.peers import triton_messages
from devkit.processes import serve_until_exit, wait_until
from devkit.references import TOLERANCE, keras_whole_sequence
from devkit.repositories import install
from devkit.small_models import build_last_step, build_lstm
from lstm_stream.v1 import stream_pb2 as pb

pytestmark = pytest.mark.timeout(300)
# Triton's messages as this process may hold them (tritonclient's, or the server's own: one fits protobuf's pool).
tpb, tpb_grpc = triton_messages()


@pytest.fixture(scope="module")
def model_files(tmp_path_factory) -> dict[str, Path]:
    """The module's Keras models, built once: v1 and v2 of one shape (one feature, an output per timestep; other
    weights), and "last_step" of other shapes (two features, the last step's output only)."""
    folder = tmp_path_factory.mktemp("model-files")
    return {"v1": build_lstm(folder / "v1.keras", seed=1), "v2": build_lstm(folder / "v2.keras", seed=2),
            "last_step": build_last_step(folder / "last_step.keras")}


def listed(stub) -> dict[tuple[str, int], pb.ModelVersionStatus]:
    return {(row.name, row.version): row for row in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}


def state_of(stub, model: str, version: int) -> str:
    row = listed(stub).get((model, version))
    return row.state if row is not None else ""


def live_streams(server) -> dict[int, float]:
    """lstm_serve_live_streams of model "m", by version."""
    samples = scrape(server).get("lstm_serve_live_streams", {})
    return {int(labels["version"]): count for key, count in samples.items()
            if (labels := dict(key))["model"] == "m"}


def triton_infer(stub, model: str, sequence_id: str, x: np.ndarray, *, start: bool, version: str = ""):
    request = tpb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="INPUT", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    request.parameters["sequence_id"].string_param = sequence_id
    request.parameters["sequence_start"].bool_param = start
    return stub.ModelInfer(request, timeout=30)


def triton_outputs(response) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(list(response.outputs[0].shape))


def test_two_models_in_one_server_each_stream_equals_its_own_model(start_server, tmp_path, model_files) -> None:
    repository = tmp_path / "models"
    alpha_file = model_files["v1"]  # one feature, an output per timestep
    beta_file = model_files["last_step"]  # two features, the last step's output only
    install(repository, "alpha", 1, alpha_file)
    install(repository, "beta", 3, beta_file)
    server = start_server("--model-repository", str(repository), "--xla", "false")
    triton = tpb_grpc.GRPCInferenceServiceStub(server.channel)
    assert {key: row.state for key, row in listed(server.stub).items()} == {("alpha", 1): "READY",
                                                                            ("beta", 3): "READY"}

    rng = np.random.default_rng(5)
    xa, xb = rng.normal(size=(30, 1)).astype(np.float32), rng.normal(size=(30, 2)).astype(np.float32)
    stream = f"sensor-{uuid.uuid4().hex[:6]}"  # the same id on both models: two streams, one per model
    got_alpha, got_beta = [], []
    for number, (lo, hi) in enumerate([(0, 7), (7, 19), (19, 30)]):
        # Each model alternates between the native API and the Triton protocol, chunk by chunk.
        if number % 2 == 0:
            reply = predict(server.stub, stream, xa[lo:hi], start_offset=lo, model="alpha")
            assert reply.model_version == 1 and reply.offset == hi
            got_alpha.append(outputs(reply))
            response = triton_infer(triton, "beta", stream, xb[lo:hi], start=lo == 0)
            assert response.model_name == "beta" and response.model_version == "3"
            got_beta.append(triton_outputs(response).reshape(1, -1))
        else:
            response = triton_infer(triton, "alpha", stream, xa[lo:hi], start=False, version="1")
            assert response.model_version == "1"
            got_alpha.append(triton_outputs(response))
            reply = predict(server.stub, stream, xb[lo:hi], start_offset=lo, model="beta")
            assert reply.model_version == 3
            got_beta.append(outputs(reply))
        expected_beta = keras_whole_sequence(beta_file, xb[:hi])
        assert np.max(np.abs(got_beta[-1] - expected_beta)) <= TOLERANCE
    assert np.max(np.abs(np.concatenate(got_alpha) - keras_whole_sequence(alpha_file, xa))) <= TOLERANCE
    for model, version in (("alpha", 1), ("beta", 3)):
        info = server.stub.GetStream(pb.GetStreamRequest(stream_id=stream, model=model))
        assert (info.offset, info.model, info.model_version) == (30, model, version)

    # Describing models and versions, and naming what exists when a request names what does not.
    beta = server.stub.GetModel(pb.GetModelRequest(name="beta"))
    assert (beta.input_features, beta.version, beta.per_timestep_outputs) == (2, 3, False)
    code, message, _ = status_of(server.stub.GetModel, pb.GetModelRequest(name="beta", version=1))
    assert code == grpc.StatusCode.NOT_FOUND and "ready: 3" in message
    for name in ("", "gamma"):
        code, message, _ = status_of(predict, server.stub, "s", xa[:2], model=name)
        assert code == grpc.StatusCode.NOT_FOUND and "'alpha', 'beta'" in message, message
    assert triton.ModelReady(tpb.ModelReadyRequest(name="beta", version="3")).ready
    assert not triton.ModelReady(tpb.ModelReadyRequest(name="beta", version="1")).ready
    assert not triton.ModelReady(tpb.ModelReadyRequest(name="beta", version="³")).ready  # a digit, not a number
    with pytest.raises(grpc.RpcError) as unknown:
        triton_infer(triton, "beta", stream, xb[:1], start=False, version="³")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert list(triton.ModelMetadata(tpb.ModelMetadataRequest(name="beta")).versions) == ["3"]
    index = triton.RepositoryIndex(tpb.RepositoryIndexRequest())
    assert {(m.name, m.version, m.state) for m in index.models} == {("alpha", "1", "READY"), ("beta", "3", "READY")}


def test_a_new_version_takes_new_sequences_while_old_ones_finish_on_theirs(start_server, tmp_path,
                                                                          model_files) -> None:
    repository = tmp_path / "models"
    v1_file, v2_file, other_shape = model_files["v1"], model_files["v2"], model_files["last_step"]
    install(repository, "m", 1, v1_file)
    # Its own key prefix: the live streams counted per version are those of the whole Redis under it.
    server = start_server("--model-repository", str(repository), "--repository-poll-s", "0.2",
                          "--version-drain-s", "1.5", "--on-retired-version", "reset", "--xla", "false",
                          "--live-streams-interval-s", "0.2", "--key-prefix", f"lv-{uuid.uuid4().hex[:8]}")
    x = np.random.default_rng(9).normal(size=(40, 1)).astype(np.float32)
    old, new = f"old-{uuid.uuid4().hex[:6]}", f"new-{uuid.uuid4().hex[:6]}"
    assert predict(server.stub, old, x[:10], start_offset=0).model_version == 1

    # A version copied slowly in place: half a file, left as it is, never serves; v1 keeps serving.
    version_3 = repository / "m" / "3"
    version_3.mkdir()
    whole = v2_file.read_bytes()
    (version_3 / "model.keras").write_bytes(whole[: len(whole) // 2])
    wait_until(lambda: state_of(server.stub, "m", 3) == "UNAVAILABLE", 60, "the half-copied version to be refused")
    assert "model version not loaded" in server.log()
    assert predict(server.stub, old, x[10:20], start_offset=10).model_version == 1

    # v2 renamed in: new sequences start on it, the running one stays on v1.
    install(repository, "m", 2, v2_file)
    wait_until(lambda: state_of(server.stub, "m", 2) == "READY", 60, "v2 to load")
    assert state_of(server.stub, "m", 1) == "DRAINING"
    reply = predict(server.stub, old, x[20:30], start_offset=20)
    assert reply.model_version == 1
    first = [outputs(predict(server.stub, new, x[:15], start_offset=0))]
    assert np.max(np.abs(first[0] - keras_whole_sequence(v2_file, x[:15]))) <= TOLERANCE
    assert server.stub.GetStream(pb.GetStreamRequest(stream_id=old)).model_version == 1
    assert server.stub.GetStream(pb.GetStreamRequest(stream_id=new)).model_version == 2
    wait_until(lambda: live_streams(server) == {1: 1, 2: 1}, 30, "one live stream on each version")

    # The copy of v3 finishes with a model of other shapes: refused with the reason, v2 stays the newest.
    (version_3 / "model.keras").write_bytes(other_shape.read_bytes())
    wait_until(lambda: "shapes" in listed(server.stub)[("m", 3)].reason, 60, "v3's other shapes to be refused")
    assert server.stub.GetModel(pb.GetModelRequest()).version == 2

    # v1 unused for --version-drain-s: dropped. The old stream's next chunk starts again on v2, and says so.
    wait_until(lambda: state_of(server.stub, "m", 1) == "UNAVAILABLE", 60, "v1 to drain")
    moved = predict(server.stub, old, x[30:40], start_offset=30)
    assert (moved.model_version, moved.migration.from_version, moved.migration.policy) == (2, 1, "reset")
    assert moved.offset == 10
    assert np.max(np.abs(outputs(moved) - keras_whole_sequence(v2_file, x[30:40]))) <= TOLERANCE
    # Both streams now live on v2; a reset forgets one.
    wait_until(lambda: live_streams(server) == {1: 0, 2: 2}, 30, "the moved stream counted on v2")
    server.stub.ResetStream(pb.ResetStreamRequest(stream_id=new), timeout=10)
    wait_until(lambda: live_streams(server) == {1: 0, 2: 1}, 30, "the reset stream no longer counted")


def test_an_unloaded_version_drains_then_its_sequences_are_refused(start_server, tmp_path, model_files) -> None:
    repository = tmp_path / "models"
    v1_file, v2_file = model_files["v1"], model_files["v2"]
    install(repository, "m", 1, v1_file)
    install(repository, "m", 2, v2_file)
    (repository / "m" / "version_policy").write_text("all\n")
    server = start_server("--model-repository", str(repository), "--version-drain-s", "1", "--xla", "false")
    triton = tpb_grpc.GRPCInferenceServiceStub(server.channel)
    x = np.random.default_rng(4).normal(size=(30, 1)).astype(np.float32)
    pinned, fresh = f"p-{uuid.uuid4().hex[:6]}", f"f-{uuid.uuid4().hex[:6]}"
    assert predict(server.stub, pinned, x[:10], start_offset=0, model_version=1).model_version == 1
    assert predict(server.stub, fresh, x[:10], start_offset=0).model_version == 2  # the newest

    # A chunk may not move its sequence to another version.
    code, message, _ = status_of(predict, server.stub, pinned, x[10:12], start_offset=10, model_version=2)
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "version 1, not version 2" in message

    request = tpb.RepositoryModelUnloadRequest(model_name="m")
    request.parameters["version"].int64_param = 1
    triton.RepositoryModelUnload(request)
    assert state_of(server.stub, "m", 1) == "DRAINING"
    # Draining: the pinned sequence goes on, exactly; no new sequence starts on it.
    reply = predict(server.stub, pinned, x[10:20], start_offset=10)
    expected = keras_whole_sequence(v1_file, x[:20])[10:]
    assert reply.model_version == 1 and np.max(np.abs(outputs(reply) - expected)) <= TOLERANCE
    code, message, _ = status_of(predict, server.stub, "another", x[:2], model_version=1)
    assert code == grpc.StatusCode.NOT_FOUND and "ready: 2" in message

    wait_until(lambda: state_of(server.stub, "m", 1) == "UNAVAILABLE", 30, "v1 to be dropped")
    code, message, _ = status_of(predict, server.stub, pinned, x[20:30], start_offset=20)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "version 1, which was retired" in message and "--on-retired-version reset" in message
    assert server.stub.GetStream(pb.GetStreamRequest(stream_id=pinned)).offset == 20  # nothing changed
    # A reset starts it again on the newest.
    restarted = predict(server.stub, pinned, x[:5], reset=True)
    assert restarted.model_version == 2 and not restarted.HasField("migration")

    # Loading the model again on request brings v1 back; an unknown model is NOT_FOUND naming the ones there.
    triton.RepositoryModelLoad(tpb.RepositoryModelLoadRequest(model_name="m"))
    assert state_of(server.stub, "m", 1) == "READY"
    with pytest.raises(grpc.RpcError) as error:
        triton.RepositoryModelLoad(tpb.RepositoryModelLoadRequest(model_name="nope"))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and "'m'" in error.value.details()


def test_replay_rebuilds_a_retired_sequence_on_the_newest_version_from_its_kept_inputs(start_server, tmp_path,
                                                                                       model_files) -> None:
    repository = tmp_path / "models"
    v1_file, v2_file = model_files["v1"], model_files["v2"]
    install(repository, "m", 1, v1_file)
    server = start_server("--model-repository", str(repository), "--repository-poll-s", "0.2",
                          "--version-drain-s", "0.5", "--on-retired-version", "replay", "--history-timesteps", "24",
                          "--xla", "false")
    triton = tpb_grpc.GRPCInferenceServiceStub(server.channel)
    x = np.random.default_rng(2).normal(size=(40, 1)).astype(np.float32)
    whole, window = f"whole-{uuid.uuid4().hex[:6]}", f"window-{uuid.uuid4().hex[:6]}"
    for lo, hi in ((0, 8), (8, 20)):
        predict(server.stub, whole, x[lo:hi], start_offset=lo)
    for lo, hi in ((0, 15), (15, 30)):
        predict(server.stub, window, x[lo:hi], start_offset=lo)

    install(repository, "m", 2, v2_file)
    wait_until(lambda: state_of(server.stub, "m", 2) == "READY", 60, "v2 to load")
    triton.RepositoryModelUnload(tpb.RepositoryModelUnloadRequest(model_name="m"))  # every version...
    triton.RepositoryModelLoad(tpb.RepositoryModelLoadRequest(model_name="m"))  # ...then the policy's again: v2
    wait_until(lambda: state_of(server.stub, "m", 1) == "UNAVAILABLE", 30, "v1 to be dropped")

    # 20 inputs kept of 20: the state rebuilt on v2 is v2's own, so the sequence continues exactly as v2's.
    moved = predict(server.stub, whole, x[20:30], start_offset=20)
    assert (moved.model_version, moved.migration.policy, moved.migration.from_version) == (2, "replay", 1)
    assert moved.migration.history_start == 0 and moved.offset == 30
    expected = keras_whole_sequence(v2_file, x[:30])[20:]
    assert np.max(np.abs(outputs(moved) - expected)) <= TOLERANCE
    following = predict(server.stub, whole, x[30:40], start_offset=30)  # and on from there, on v2, no migration
    assert following.model_version == 2 and not following.HasField("migration")
    assert np.max(np.abs(outputs(following) - keras_whole_sequence(v2_file, x[:40])[30:])) <= TOLERANCE

    # 24 inputs kept of 30: rebuilt from offset 6 on, an approximation the answer owns up to.
    approximate = predict(server.stub, window, x[30:40], start_offset=30)
    assert (approximate.migration.policy, approximate.migration.history_start, approximate.offset) == ("replay", 6, 40)


def test_a_replica_loads_the_version_a_stream_is_pinned_to(start_server, tmp_path, model_files) -> None:
    repository = tmp_path / "models"
    v1_file, v2_file = model_files["v1"], model_files["v2"]
    install(repository, "m", 1, v1_file)
    first = start_server("--model-repository", str(repository), "--xla", "false")
    x = np.random.default_rng(6).normal(size=(20, 1)).astype(np.float32)
    pinned = f"pinned-{uuid.uuid4().hex[:6]}"
    assert predict(first.stub, pinned, x[:10], start_offset=0).model_version == 1

    # A replica started once v2 arrived loads v2 alone (latest:1); the stream started on v1 reaches it.
    install(repository, "m", 2, v2_file)
    second = start_server("--model-repository", str(repository), "--xla", "false")
    assert set(listed(second.stub)) == {("m", 2)}
    code, message, metadata = status_of(predict, second.stub, pinned, x[10:20], start_offset=10)
    assert code == grpc.StatusCode.UNAVAILABLE and "loading" in message and metadata["x-chunk-outcome"] == "not-applied"
    reply = wait_until(lambda: _answered(second.stub, pinned, x[10:20], 10), 60, "v1 to load for the pinned stream")
    assert reply.model_version == 1
    assert np.max(np.abs(outputs(reply) - keras_whole_sequence(v1_file, x[:20])[10:])) <= TOLERANCE
    assert state_of(second.stub, "m", 1) == "DRAINING" and state_of(second.stub, "m", 2) == "READY"
    assert predict(second.stub, f"new-{uuid.uuid4().hex[:6]}", x[:3]).model_version == 2


def _answered(stub, stream: str, x: np.ndarray, start: int) -> pb.PredictResponse | None:
    try:
        return predict(stub, stream, x, start_offset=start)
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.UNAVAILABLE:
            raise
        return None


def test_a_repository_with_nothing_to_serve_is_refused_at_start_up_saying_why(tmp_path, redis_server) -> None:
    repository = tmp_path / "models"
    (repository / "m" / "1").mkdir(parents=True)
    (repository / "m" / "1" / "model.keras").write_bytes(b"half a zip file")
    (repository / "m" / "latest").mkdir()  # not a version: skipped with a warning
    result = serve_until_exit("--model-repository", str(repository), "--redis-url", redis_server.url,
                              "--redis-autostart", "false")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "no model version could be loaded" in result.stderr and "m version 1" in result.stderr
    assert "a version folder's name is a positive integer" in result.stderr
