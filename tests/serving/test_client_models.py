"""The client library on a model repository (invariant 14, docs/invariants.md; docs/models.md): handles and
gateways name their model and version, answers say which version answered, `models()`, `load_model()` and
`unload_model()` manage versions, and a stream the server moves off a retired version (`--on-retired-version
reset`) continues exactly from the answer's offset, on `send`, `pipe` and a gateway's pipe. Real servers,
real Redis, real Keras models."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from devkit.processes import wait_until
from devkit.references import TOLERANCE, keras_whole_sequence
from devkit.repositories import install
from devkit.small_models import build_last_step, build_lstm
from lstm_stream.client import Client, Migration, RequestRejected

pytestmark = pytest.mark.timeout(240)


def assert_close(expected: np.ndarray, got: np.ndarray, what: str) -> None:
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    assert float(np.max(np.abs(got - expected))) <= TOLERANCE, what


def states(client: Client) -> dict[tuple[str, int], str]:
    return {(row.name, row.version): row.state for row in client.models()}


def test_handles_on_two_models_answer_with_their_own_model_and_versions_load_and_unload(
        start_server, tmp_path: Path) -> None:
    repository = tmp_path / "models"
    alpha_file = build_lstm(tmp_path / "alpha.keras", seed=1)  # one feature, an output per timestep
    beta_file = build_last_step(tmp_path / "beta.keras")  # two features, the last step's output only
    install(repository, "alpha", 1, alpha_file)
    install(repository, "beta", 3, beta_file)
    server = start_server("--model-repository", str(repository), "--version-drain-s", "0.5", "--xla", "false")
    rng = np.random.default_rng(21)
    xa, xb = rng.normal(size=(33, 1)).astype(np.float32), rng.normal(size=(33, 2)).astype(np.float32)
    stream_id = f"both-{uuid.uuid4().hex[:6]}"  # one id, two streams: one per model
    with Client(server.address) as client:
        assert client.model("beta").input_features == 2 and client.model("beta").version == 3
        alpha, beta = client.stream(stream_id, model="alpha"), client.stream(stream_id, model="beta", version=3)
        got_alpha = [alpha.send(xa[:10]), *alpha.pipe([xa[10:21], xa[21:]], window=2)]
        assert alpha.model_version == 1 and alpha.migration is None
        got_beta = [beta.send(xb[:10]), *beta.pipe([xb[10:21], xb[21:]], window=2)]
        assert beta.model_version == 3
        assert_close(keras_whole_sequence(alpha_file, xa), np.concatenate(got_alpha), "alpha")
        assert_close(keras_whole_sequence(beta_file, xb), got_beta[-1], "beta, last step")
        info = beta.info()
        assert (info.model, info.model_version, info.offset) == ("beta", 3, 33)
        assert client.stream_info(stream_id, model="alpha").offset == 33

        # A gateway on one model: every stream of it is that model's.
        gateway = client.gateway(model="beta")
        ids = [f"gw-{n}-{uuid.uuid4().hex[:4]}" for n in range(3)]
        results = list(gateway.pipe([{i: xb[:12] for i in ids}, {i: xb[12:] for i in ids}], window=2))
        for stream in ids:
            assert_close(keras_whole_sequence(beta_file, xb), results[-1][stream], f"gateway {stream}")
            assert results[-1].versions[stream] == 3 and not results[-1].migrations
        assert client.reset_stream(ids[0], model="beta") and not client.reset_stream(ids[0], model="alpha")

        # The repository's rows; a version unloaded drains, then is dropped; loading the model brings it back.
        assert states(client) == {("alpha", 1): "READY", ("beta", 3): "READY"}
        client.unload_model("beta", 3)
        assert states(client)[("beta", 3)] == "DRAINING"
        wait_until(lambda: states(client)[("beta", 3)] == "UNAVAILABLE", 30, "beta 3 to be dropped")
        with pytest.raises(RequestRejected) as refused:
            client.stream(f"late-{uuid.uuid4().hex[:6]}", model="beta").send(xb[:4])
        assert "beta" in refused.value.message
        client.load_model("beta")
        assert states(client) == {("alpha", 1): "READY", ("beta", 3): "READY"}
        fresh = client.stream(f"again-{uuid.uuid4().hex[:6]}", model="beta")
        assert_close(keras_whole_sequence(beta_file, xb[:9]), fresh.send(xb[:9]), "beta after its load")
        with pytest.raises(RequestRejected) as unknown:
            client.load_model("gamma")
        assert unknown.value.code.name == "NOT_FOUND" and "'alpha'" in unknown.value.message


def test_a_stream_moved_off_a_retired_version_continues_from_the_answers_offset(start_server, tmp_path: Path) -> None:
    repository = tmp_path / "models"
    v1_file, v2_file = build_lstm(tmp_path / "v1.keras", seed=1), build_lstm(tmp_path / "v2.keras", seed=2)
    install(repository, "m", 1, v1_file)
    install(repository, "m", 2, v2_file)
    (repository / "m" / "version_policy").write_text("all\n")
    server = start_server("--model-repository", str(repository), "--on-retired-version", "reset",
                          "--version-drain-s", "0.5", "--xla", "false")
    x = np.random.default_rng(8).normal(size=(60, 1)).astype(np.float32)
    tag = uuid.uuid4().hex[:6]
    with Client(server.address) as client:
        # Three streams pinned to v1 (send, pipe, a gateway's pipe), each 20 timesteps into a sequence.
        unary, piped = client.stream(f"u-{tag}", model="m", version=1), client.stream(f"p-{tag}", model="m", version=1)
        gateway, gated = client.gateway(model="m", version=1), f"g-{tag}"
        for handle in (unary, piped):
            assert_close(keras_whole_sequence(v1_file, x[:20]), handle.send(x[:20]), "on v1")
            assert handle.model_version == 1
        assert gateway.send({gated: x[:20]}).versions == {gated: 1}

        client.unload_model("m", 1)
        wait_until(lambda: states(client)[("m", 1)] == "UNAVAILABLE", 30, "v1 to be dropped")

        # The next chunk starts a new sequence on v2 from zero state: the answer says so, the handle follows
        # its offset (10, not 30), and the chunks after it continue that sequence exactly.
        moved = unary.send(x[20:30])
        assert unary.migration == Migration(1, "reset") and unary.model_version == 2 and unary.offset == 10
        rest = unary.send(x[30:45])
        assert unary.migration is None and unary.offset == 25
        assert_close(keras_whole_sequence(v2_file, x[20:45]), np.concatenate([moved, rest]), "send after the move")
        assert unary.info().offset == 25 and unary.info().model_version == 2

        # In a pipe, the chunks in flight behind the moved one were planned from the old offsets: they are
        # planned again from the answer's and resent; every output arrives once, in order.
        chunks = [x[20:27], x[27:35], x[35:41], x[41:50], x[50:60]]
        got = list(piped.pipe(chunks, window=4))
        assert len(got) == len(chunks) and piped.offset == 40 and piped.model_version == 2
        assert_close(keras_whole_sequence(v2_file, x[20:60]), np.concatenate(got), "pipe after the move")

        ticks = [{gated: chunk} for chunk in chunks]
        results = list(gateway.pipe(ticks, window=3))
        assert results[0].migrations == {gated: Migration(1, "reset")}
        assert all(not r.migrations and r.versions == {gated: 2} for r in results[1:])
        assert_close(keras_whole_sequence(v2_file, x[20:60]), np.concatenate([r[gated] for r in results]),
                     "gateway pipe after the move")
        assert gateway.offset(gated) == 40 == client.stream_info(gated, model="m").offset
