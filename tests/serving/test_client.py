"""The client library (clients/python, `lstm_stream.client`) against a real server and Redis.

Invariant 1 (docs/invariants.md) seen through the client: for random chunk splits, sync and asyncio,
unary `send` and pipelined `pipe`, the outputs equal Keras on the whole sequence, on the default model
and on a three-feature GRU model whose server takes at most 16 timesteps a chunk (the client splits
longer chunks). Invariant 4 through the client: a handle that disagrees with the server's offset gets
a StreamPositionError saying where the server stands; resume() and start_new() act on it.
"""

from __future__ import annotations

import asyncio
import re
import uuid

import numpy as np
import pytest

from devkit import ROOT
from devkit.references import TOLERANCE, keras_whole_sequence
from devkit.small_models import build_gru_stateful
from lstm_stream.client import AsyncClient, Client, InvalidInput, RequestRejected, StreamPositionError
from server.config import DEFAULT_MODEL

pytestmark = pytest.mark.timeout(240)


def random_split(rng: np.random.Generator, x: np.ndarray, most: int) -> list[np.ndarray]:
    cuts = sorted(set(rng.integers(1, x.shape[0], size=int(rng.integers(1, most))).tolist()))
    return np.split(x, cuts)


def sequences(features: int, seed: int, count: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 1.5, size=(int(rng.integers(40, 120)), features)).astype(np.float32) for _ in range(count)]


def assert_keras(model, x: np.ndarray, got: np.ndarray, what: str) -> None:
    assert_close(keras_whole_sequence(model, x), got, what)


def assert_close(expected: np.ndarray, got: np.ndarray, what: str) -> None:
    assert got.shape == expected.shape, what
    assert float(np.max(np.abs(got - expected))) <= TOLERANCE, what


def run_sync(target: str, model, features: int, seed: int, one_feature_1d: bool = False) -> None:
    rng = np.random.default_rng(seed + 100)
    with Client(target) as client:
        for n, x in enumerate(sequences(features, seed)):
            chunks = random_split(rng, x, 8)
            expected = keras_whole_sequence(model, x)  # once for both ways of sending x
            if one_feature_1d:
                chunks = [chunk.reshape(-1) for chunk in chunks]  # 1-D for a one-feature model
            unary = client.stream(f"cl-sync-u-{uuid.uuid4().hex[:6]}")
            got = np.concatenate([unary.send(chunk) for chunk in chunks])
            assert_close(expected, got, f"sync unary {n}")
            assert unary.offset == x.shape[0]
            piped = client.stream(f"cl-sync-p-{uuid.uuid4().hex[:6]}")
            outputs = list(piped.pipe(iter(chunks), window=1 + n % 3))
            assert len(outputs) == len(chunks)  # one answer per chunk, in order
            assert_close(expected, np.concatenate(outputs), f"sync pipe {n}")
            assert piped.info().offset == x.shape[0]


async def run_async(target: str, model, features: int, seed: int) -> None:
    rng = np.random.default_rng(seed + 200)
    async with AsyncClient(target) as client:

        async def one(n: int, x: np.ndarray) -> None:
            chunks = random_split(rng, x, 8)
            expected = keras_whole_sequence(model, x)  # once for both ways of sending x
            unary = client.stream(f"cl-async-u-{uuid.uuid4().hex[:6]}")
            got = [await unary.send(chunk) for chunk in chunks]
            assert_close(expected, np.concatenate(got), f"async unary {n}")

            async def source():
                for chunk in chunks:
                    await asyncio.sleep(0)
                    yield chunk

            piped = client.stream(f"cl-async-p-{uuid.uuid4().hex[:6]}")
            outputs = [out async for out in piped.pipe(source(), window=1 + n % 3)]
            assert len(outputs) == len(chunks)
            assert_close(expected, np.concatenate(outputs), f"async pipe {n}")

        await asyncio.gather(*(one(n, x) for n, x in enumerate(sequences(features, seed + 1))))


def test_default_model_sync_and_async(default_server) -> None:
    run_sync(default_server.address, DEFAULT_MODEL, 1, seed=1, one_feature_1d=True)
    asyncio.run(run_async(default_server.address, DEFAULT_MODEL, 1, seed=2))


def test_gru_model_with_chunks_split_to_the_server_limit(start_server, tmp_path) -> None:
    model = build_gru_stateful(tmp_path / "gru.keras")
    # No XLA: the many chunk lengths would each compile a shape, and the client, not XLA, is under test.
    server = start_server("--max-chunk-timesteps", "16", "--xla", "false", model=model)
    with Client(server.address) as client:
        info = client.model()
        assert (info.input_features, info.output_size, info.max_chunk_timesteps) == (3, 2, 16)
        assert [layer.kind for layer in info.recurrent_layers] == ["GRU", "SimpleRNN"]
        x = sequences(3, 5, count=1)[0]
        stream = client.stream(f"cl-split-{uuid.uuid4().hex[:6]}")
        assert_keras(model, x, stream.send(x), "one chunk longer than the server's limit, split by the client")
    run_sync(server.address, model, 3, seed=3)
    asyncio.run(run_async(server.address, model, 3, seed=4))


def test_offsets_resume_start_new_reset_and_end(default_server) -> None:
    x = np.random.default_rng(9).normal(size=(60, 1)).astype(np.float32)
    stream_id = f"cl-pos-{uuid.uuid4().hex[:6]}"
    with Client(default_server.address) as client:
        assert client.health() == "SERVING"
        first = client.stream(stream_id)
        head = first.send(x[:20])
        # A second handle (a restarted program) starts at offset 0: the server says where it stands.
        second = client.stream(stream_id)
        with pytest.raises(StreamPositionError) as caught:
            second.send(x[20:40])
        assert caught.value.server_offset == 20 and caught.value.client_offset == 0
        assert "resume()" in str(caught.value) and "offset 20" in str(caught.value)
        assert client.stream_info(stream_id).offset == 20  # the refused chunk changed nothing
        assert second.resume() == 20
        middle = second.send(x[20:40])
        tail = second.end(x[40:])
        assert_keras(DEFAULT_MODEL, x, np.concatenate([head, middle, tail]), "resumed by a second handle")
        assert second.offset == 0 and not client.stream_info(stream_id).exists  # ended
        # start_new(): a new sequence whatever the server held; reset() forgets the state now.
        second.send(x[:10])
        second.start_new()
        assert_keras(DEFAULT_MODEL, x[:30], second.send(x[:30]), "after start_new")
        assert second.reset() is True
        assert second.offset == 0 and not second.info().exists
        with pytest.raises(InvalidInput, match=r"\[timesteps, 1\]"):
            second.send(np.zeros((4, 2), dtype=np.float32))
        with pytest.raises(RequestRejected, match="stream_id"):
            client.stream("bad\nid").send(x[:3])


@pytest.mark.timeout(60)
def test_api_key_reaches_the_server_as_a_bearer_token(default_server) -> None:
    """The key rides as `authorization: Bearer KEY` on every call, unary and streaming. Without
    issue 10's key checking on this branch the server ignores it; what is checked here is that a
    plaintext client sending it still works end to end (the metadata is well formed)."""
    x = np.random.default_rng(3).normal(size=(12, 1)).astype(np.float32)
    with Client(default_server.address, api_key="k-123") as client:
        assert client.model().input_features == 1
        stream = client.stream(f"cl-key-{uuid.uuid4().hex[:6]}")
        got = np.concatenate([stream.send(x[:5]), *stream.pipe([x[5:]])])
        assert_keras(DEFAULT_MODEL, x, got, "with an api key")


@pytest.mark.timeout(60)
def test_the_readme_examples_run_and_rerun(default_server, capsys) -> None:
    """The quick-start example (and the client README's) run as written, twice: a rerun starts anew."""
    for readme in (ROOT / "README.md", ROOT / "clients" / "python" / "README.md"):
        found = re.search(r"```python\n(import numpy as np\nfrom lstm_stream.client import Client\n.*?)```",
                          readme.read_text(), re.S)
        assert found, f"{readme} has no client example"
        code = compile(found.group(1).replace("127.0.0.1:50051", default_server.address), str(readme), "exec")
        for _ in range(2):
            exec(code, {})
    assert "200 " in capsys.readouterr().out
