"""Invariant 15 (docs/invariants.md): state out, state in.

GetStreamState reads a stream's recurrent state as named tensors (Keras `layer.states` of one stream) and
SetStreamState writes one: the state read from stream A, set onto stream B, makes B continue exactly as A;
a state computed offline by a stateful Keras model and set at offset k continues exactly as Keras on the
whole sequence. A refused state changes nothing; tenants keep their own namespaces; a set is seen by the
next chunk on the same process (the slot memory) and moves the stream's offset.
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
import uuid
from pathlib import Path

import grpc
import keras  # tests/conftest.py chose its backend
import numpy as np
import pytest

from devkit.native_calls import outputs, predict, status_of
from devkit.references import TOLERANCE, keras_whole_sequence, load_model
from lstm_stream.client import AsyncClient, Client, RequestRejected, StreamState
from lstm_stream.client.cli import EXIT_OK, EXIT_USAGE, main
from lstm_stream.v1 import stream_pb2 as pb
from server.config import DEFAULT_MODEL

pytestmark = pytest.mark.timeout(120)


def new_id(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def sequence(seed: int, length: int, features: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1.5, size=(length, features)).astype(np.float32)


def get_state(stub, stream_id: str, **kwargs) -> pb.StreamState:
    return stub.GetStreamState(pb.GetStreamStateRequest(stream_id=stream_id), timeout=30, **kwargs)


def as_arrays(state: pb.StreamState) -> dict[str, np.ndarray]:
    return {t.name: np.asarray(t.values, np.float32).reshape(tuple(t.shape)) for t in state.tensors}


def tensors(arrays: dict[str, np.ndarray]) -> list[pb.StateTensor]:
    return [pb.StateTensor(name=name, shape=list(a.shape), values=a.reshape(-1).tolist()) for name, a in arrays.items()]


def test_the_state_of_a_set_onto_b_continues_exactly_as_a(default_server) -> None:
    stub = default_server.stub
    a, b = new_id("state-a"), new_id("state-b")
    x = sequence(1, 70)
    predict(stub, a, x[:30], reset=True)
    predict(stub, b, sequence(2, 12), reset=True)  # B has a state of its own: the set replaces it whole
    state = get_state(stub, a)
    layers = stub.GetModel(pb.GetModelRequest()).recurrent_layers
    assert state.offset == 30 and state.model == "sensor_forecaster" and state.model_version == 1
    # LSTM: h then c, named after the layer, one stream's shape [units].
    assert [(t.name, list(t.shape)) for t in state.tensors] == [
        (f"{layer.name}/{i}", [layer.units]) for layer in layers for i in range(2)]

    reply = stub.SetStreamState(pb.StreamState(stream_id=b, offset=state.offset, tensors=state.tensors), timeout=30)
    assert (reply.offset, reply.model_version) == (30, 1)
    assert stub.GetStream(pb.GetStreamRequest(stream_id=b)).offset == 30
    for start, end in ((30, 45), (45, 70)):
        from_a = outputs(predict(stub, a, x[start:end], start_offset=start))
        from_b = outputs(predict(stub, b, x[start:end], start_offset=start))
        np.testing.assert_array_equal(from_b, from_a)
    # And both are Keras on the whole sequence.
    assert float(np.max(np.abs(from_b - keras_whole_sequence(DEFAULT_MODEL, x)[45:]))) <= TOLERANCE


def stateful_copy(path: Path):
    """The served model rebuilt as Keras `stateful=True` with batch size 1, same weights: the offline way."""
    model = load_model(str(path))
    features = model.inputs[0].shape[-1]
    x = inputs = keras.Input(batch_shape=(1, None, features))
    for layer in model.layers:
        config = layer.get_config()
        if isinstance(layer, keras.layers.RNN):
            config["stateful"] = True
        copy = type(layer).from_config(config)
        x = copy(x)
        copy.set_weights(layer.get_weights())
    return keras.Model(inputs, x)


def keras_states(model, x: np.ndarray) -> dict[str, np.ndarray]:
    """Feed x [T, F] to a stateful batch-1 model; its recurrent layers' `layer.states`, named as the server
    names them, one stream's shape."""
    for layer in model.layers:
        if getattr(layer, "stateful", False):
            layer.reset_state()
    model.predict_on_batch(x[None])
    return {f"{layer.name}/{i}": keras.ops.convert_to_numpy(state)[0]
            for layer in model.layers if isinstance(layer, keras.layers.RNN) for i, state in enumerate(layer.states)}


def test_a_state_computed_offline_by_keras_continues_exactly(last_step_server, small_models) -> None:
    """LSTM then GRU (a last-step model: one answer row per chunk): states from a stateful Keras model fed
    x[:k], set at offset k, then x[k:] streamed, answer as Keras on the whole sequence."""
    stub, path = last_step_server.stub, small_models["last_step"]
    offline = stateful_copy(path)
    x = sequence(3, 60, features=2)
    k = 23
    computed = keras_states(offline, x[:k])
    assert [name.split("/")[1] for name in computed] == ["0", "1", "0"]  # LSTM h, c; GRU h

    stream = new_id("offline")
    # In another order than the model's: the names say which is which.
    reply = stub.SetStreamState(pb.StreamState(stream_id=stream, offset=k, tensors=tensors(computed)[::-1]),
                                timeout=30)
    assert reply.offset == k
    for start, end in ((k, 40), (40, 60)):
        got = outputs(predict(stub, stream, x[start:end], start_offset=start))
        expected = keras_whole_sequence(path, x[:end])
        assert float(np.max(np.abs(got - expected))) <= TOLERANCE, (start, end)

    # Out again: a stream fed x[:k] live holds Keras' states.
    live = new_id("live")
    predict(stub, live, x[:k], reset=True)
    read = as_arrays(get_state(stub, live))
    assert list(read) == list(computed)
    for name, state in computed.items():
        assert float(np.max(np.abs(read[name] - state))) <= TOLERANCE, name


def bad_states(state: pb.StreamState) -> list[tuple[str, pb.StreamState, grpc.StatusCode, str]]:
    """(what, request, expected code, what the message must name) for states that must be refused."""
    h, c, *rest = state.tensors
    units = len(h.values)
    cases: list[tuple[str, pb.StreamState, grpc.StatusCode, str]] = []
    invalid, missing = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND

    def case(what: str, code: grpc.StatusCode, field: str, first=None, **fields) -> None:
        """The state with its first tensors replaced by `first` (the others as they are)."""
        ts = [h, c] if first is None else first
        fields = {"stream_id": state.stream_id, "offset": state.offset + 5, "tensors": [*ts, *rest], **fields}
        message = pb.StreamState(**fields)
        cases.append((what, message, code, field))

    def tensor(like: pb.StateTensor, **changes) -> pb.StateTensor:
        fields = {"name": like.name, "shape": like.shape, "values": like.values, **changes}
        return pb.StateTensor(**fields)

    case("wrong shape", invalid, "tensors[1].shape", [h, tensor(c, shape=[units + 1], values=[*c.values, 0.0])])
    case("batch axis", invalid, "tensors[0].shape", [tensor(h, shape=[1, units]), c])
    case("missing tensor", invalid, f"tensors: {c.name} missing", [h])
    case("extra tensor", invalid, "tensors[2].name", [h, c, pb.StateTensor(name="extra/0", shape=[1], values=[1.0])])
    case("misnamed tensor", invalid, "tensors[0].name", [tensor(h, name=h.name[:-1] + "7"), c])
    case("twice", invalid, "tensors[1].name", [h, h])
    case("value count", invalid, "tensors[0].values", [tensor(h, values=list(h.values)[:-1]), c])
    for number, bad in enumerate((float("nan"), float("inf"), float("-inf"))):
        values = list(c.values)
        values[number] = bad
        case(f"{bad} value", invalid, "tensors[1].values", [h, tensor(c, values=values)])
    case("unknown model", missing, "model 'nope' is not served here; served: 'sensor_forecaster'", model="nope")
    case("unknown version", missing, "has no version 2", model_version=2)
    case("huge offset", invalid, "offset", offset=2**63)
    cases.append(("empty stream id", pb.StreamState(stream_id="", tensors=state.tensors), invalid, "stream_id"))
    return cases


def test_bad_states_are_refused_naming_the_field_and_change_nothing(default_server) -> None:
    stub = default_server.stub
    stream = new_id("bad-state")
    predict(stub, stream, sequence(4, 25), reset=True)
    before = get_state(stub, stream)
    for what, message, code, field in bad_states(before):
        got, text, _ = status_of(stub.SetStreamState, message, timeout=30)
        assert got == code and field in text, (what, got, text)
        assert get_state(stub, stream) == before, what
    # The control: the same state with the model named in full is taken, and the stream moves.
    named = pb.StreamState(stream_id=stream, model="sensor_forecaster", model_version=1, offset=before.offset + 5,
                           tensors=list(before.tensors)[::-1])
    assert stub.SetStreamState(named, timeout=30).offset == before.offset + 5
    after = get_state(stub, stream)
    assert after.offset == before.offset + 5 and list(after.tensors) == list(before.tensors)

    # Reading: no state is NOT_FOUND, whatever the reason; an unknown model too.
    ended, reset = new_id("ended"), new_id("reset")
    predict(stub, ended, sequence(5, 3), reset=True, end=True)
    predict(stub, reset, sequence(6, 3), reset=True)
    stub.ResetStream(pb.ResetStreamRequest(stream_id=reset))
    for gone in (new_id("never"), ended, reset):
        code, text, _ = status_of(get_state, stub, gone)
        assert code == grpc.StatusCode.NOT_FOUND and repr(gone) in text, text
    code, text, _ = status_of(stub.GetStreamState, pb.GetStreamStateRequest(stream_id=stream, model="nope"))
    assert code == grpc.StatusCode.NOT_FOUND and "sensor_forecaster" in text
    code, text, _ = status_of(stub.GetStreamState, pb.GetStreamStateRequest(stream_id="bell\u0007"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "stream_id" in text


def test_a_set_moves_the_stream_and_the_next_chunk_on_the_same_process_sees_it(default_server) -> None:
    """The server keeps the slots it saved last in memory (server/state/cache.py): after a set, the next chunk
    must start from the set state and offset, not from the remembered one, and no chunk from before the set
    is taken for a retry."""
    stub = default_server.stub
    source, stream = new_id("source"), new_id("target")
    y = sequence(7, 60)
    predict(stub, source, y[:40], reset=True)
    x = sequence(8, 20)
    predict(stub, stream, x[:10], reset=True)
    predict(stub, stream, x[10:], start_offset=10)  # the slot this process remembers: offset 20
    state = get_state(stub, source)
    stub.SetStreamState(pb.StreamState(stream_id=stream, offset=40, tensors=state.tensors), timeout=30)

    code, _, trailers = status_of(predict, stub, stream, x[10:], start_offset=10)  # the last chunk's retry
    assert code == grpc.StatusCode.FAILED_PRECONDITION and trailers["x-stream-offset"] == "40"
    code, _, trailers = status_of(predict, stub, stream, y[40:45], start_offset=20)  # the old offset
    assert code == grpc.StatusCode.FAILED_PRECONDITION and trailers["x-stream-offset"] == "40"
    got = outputs(predict(stub, stream, y[40:60], start_offset=40))
    np.testing.assert_array_equal(got, outputs(predict(stub, source, y[40:60], start_offset=40)))
    # A chunk appended without an offset continues from the set state too.
    again = new_id("append")
    stub.SetStreamState(pb.StreamState(stream_id=again, offset=40, tensors=state.tensors), timeout=30)
    assert predict(stub, again, y[40:60]).offset == 60


KEYS = {tenant: f"{tenant}-{secrets.token_hex(16)}" for tenant in ("alpha", "beta", "gamma")}


def bearer(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEYS[tenant]}"),)


def test_tenants_read_and_set_only_their_own_streams(start_server) -> None:
    keys = Path(tempfile.mkdtemp(prefix="lstm-state-keys-")) / "api-keys"
    keys.write_text(f"alpha {KEYS['alpha']}\nbeta {KEYS['beta']}\ngamma {KEYS['gamma']} max_streams=1\n")
    stub = start_server("--api-keys", str(keys)).stub
    shared = new_id("shared")

    def call(method, message, tenant: str):
        return method(message, metadata=bearer(tenant), timeout=30)

    call(stub.Predict, pb.PredictRequest(stream_id=shared, values=sequence(9, 20).ravel(), timesteps=20), "alpha")
    alpha = call(stub.GetStreamState, pb.GetStreamStateRequest(stream_id=shared), "alpha")
    assert alpha.offset == 20
    code, _, _ = status_of(stub.GetStreamState, pb.GetStreamStateRequest(stream_id=shared), metadata=bearer("beta"))
    assert code == grpc.StatusCode.NOT_FOUND  # not in beta's namespace
    zeros = [pb.StateTensor(name=t.name, shape=t.shape, values=[0.0] * len(t.values)) for t in alpha.tensors]
    call(stub.SetStreamState, pb.StreamState(stream_id=shared, offset=3, tensors=zeros), "beta")
    assert call(stub.GetStreamState, pb.GetStreamStateRequest(stream_id=shared), "alpha") == alpha
    beta = call(stub.GetStreamState, pb.GetStreamStateRequest(stream_id=shared), "beta")
    assert beta.offset == 3 and all(not any(t.values) for t in beta.tensors)
    code, _, _ = status_of(stub.GetStreamState, pb.GetStreamStateRequest(stream_id=shared))
    assert code == grpc.StatusCode.UNAUTHENTICATED

    # A set on a new stream starts a live stream, as a first chunk does: counted against the tenant's limit.
    call(stub.SetStreamState, pb.StreamState(stream_id="g1", offset=1, tensors=zeros), "gamma")
    call(stub.SetStreamState, pb.StreamState(stream_id="g1", offset=2, tensors=zeros), "gamma")  # still one
    code, text, _ = status_of(stub.SetStreamState, pb.StreamState(stream_id="g2", tensors=zeros),
                              metadata=bearer("gamma"), timeout=30)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "1 live streams; the state was not set" in text
    code, _, _ = status_of(stub.GetStreamState, pb.GetStreamStateRequest(stream_id="g2"), metadata=bearer("gamma"))
    assert code == grpc.StatusCode.NOT_FOUND


# --- the client library and `lstm-stream state` ---------------------------------------------------------------


def test_the_client_gets_and_sets_states_and_moves_its_handle(default_server) -> None:
    x = sequence(10, 50)
    with Client(default_server.address) as client:
        a = client.stream(new_id("client-a"))
        a.start_new()
        a.send(x[:30])
        state = a.get_state()
        names = [f"{layer.name}/{i}" for layer in client.model().recurrent_layers for i in range(2)]
        assert state.offset == 30 and list(state.tensors) == names and state.model_version == 1
        assert all(array.shape == (layer.units,) for array, layer in
                   zip(state.tensors.values(), [ly for ly in client.model().recurrent_layers for _ in range(2)],
                       strict=True))
        b = client.stream(new_id("client-b"))
        assert b.set_state(state) == 30 and b.offset == 30
        np.testing.assert_array_equal(b.send(x[30:]), a.send(x[30:]))
        assert b.offset == 50
        # --offset of the library: the same state, elsewhere in the sequence; and a bad one refused by name.
        assert client.set_state(b.stream_id, state, offset=7) == 7 and client.stream_info(b.stream_id).offset == 7
        bad = StreamState(0, {**state.tensors, names[0]: state.tensors[names[0]][:-1]})
        with pytest.raises(RequestRejected, match=r"tensors\[0\]\.shape") as refused:
            client.set_state(b.stream_id, bad)
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(RequestRejected) as missing:
            client.get_state(new_id("never"))
        assert missing.value.code == grpc.StatusCode.NOT_FOUND

    async def round_trip() -> None:
        async with AsyncClient(default_server.address) as client:
            c = client.stream(new_id("client-c"))
            assert await c.set_state(state, offset=30) == 30
            got = await c.get_state()
            assert got.offset == 30 and list(got.tensors) == names
            for name in names:
                np.testing.assert_array_equal(got.tensors[name], state.tensors[name])

    asyncio.run(round_trip())


def test_the_cli_writes_and_reads_a_state_file(default_server, tmp_path: Path, capsys) -> None:
    stub, target = default_server.stub, default_server.address
    source, copy = new_id("cli-state-a"), new_id("cli-state-b")
    y = sequence(11, 40)
    predict(stub, source, y[:25], reset=True)
    path = tmp_path / "state.npz"
    assert main(["--target", target, "state", "get", source, "--out", str(path)]) == EXIT_OK
    with np.load(path, allow_pickle=False) as saved:
        assert int(saved["offset"]) == 25 and str(saved["model"]) == "sensor_forecaster"
        assert int(saved["model_version"]) == 1
        served = as_arrays(get_state(stub, source))
        assert [name for name in saved.files if "/" in name] == list(served)
        for name, values in served.items():
            np.testing.assert_array_equal(saved[name], values)

    assert main(["--target", target, "state", "set", copy, str(path)]) == EXIT_OK
    assert "offset 25" in capsys.readouterr().out
    np.testing.assert_array_equal(outputs(predict(stub, copy, y[25:], start_offset=25)),
                                  outputs(predict(stub, source, y[25:], start_offset=25)))
    assert main(["--target", target, "state", "set", copy, str(path), "--offset", "3"]) == EXIT_OK
    assert get_state(stub, copy).offset == 3

    # A file the server refuses, or none at all: usage errors, the stream untouched.
    with np.load(path, allow_pickle=False) as saved:
        arrays = {name: saved[name] for name in saved.files}
    first = next(name for name in arrays if "/" in name)
    arrays[first] = np.full_like(arrays[first], np.nan)
    broken = tmp_path / "broken.npz"
    np.savez(broken, **arrays)
    capsys.readouterr()
    assert main(["--target", target, "state", "set", copy, str(broken)]) == EXIT_USAGE
    assert "tensors[0].values" in capsys.readouterr().err
    assert main(["--target", target, "state", "set", copy, str(tmp_path / "missing.npz")]) == EXIT_USAGE
    assert "cannot read" in capsys.readouterr().err
    assert get_state(stub, copy).offset == 3
