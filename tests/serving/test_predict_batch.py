"""PredictBatch and PredictBatchStream: many chunks in one message (a gateway's tick).

Invariants 17 and 1 (docs/invariants.md) through messages that carry many streams' chunks in random groupings:
two chunks of one stream in one message, resets and ends in the middle, both encodings of the values (each
chunk's own `values`, and one block per message). Each chunk keeps every rule of Predict, and its failure is
its own (invariant 6); a message over a limit is refused whole, nothing of it applied (invariant 12).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import secrets
import uuid

import grpc
import numpy as np
import pytest

from devkit.native_calls import outputs, predict
from devkit.references import TOLERANCE, keras_whole_sequences
from lstm_stream.v1 import stream_pb2 as pb
from lstm_stream.v1 import stream_pb2_grpc
from server.config import DEFAULT_MODEL

pytestmark = pytest.mark.timeout(180)


def chunk(stream_id: str, x: np.ndarray, start: int | None, *, packed: bool, **flags: object) -> pb.PredictRequest:
    message = pb.PredictRequest(stream_id=stream_id, timesteps=x.shape[0], request_id=f"{stream_id}@{start}", **flags)
    if not packed:
        message.values.extend(x.astype(np.float32).ravel().tolist())
    if start is not None:
        message.start_offset = start
    return message


def message(chunks: list[tuple[pb.PredictRequest, np.ndarray]], packed: bool) -> pb.PredictBatchRequest:
    request = pb.PredictBatchRequest(chunks=[c for c, _ in chunks])
    if packed:
        request.values = b"".join(x.astype("<f4").tobytes() for _, x in chunks)
    return request


def result_outputs(response: pb.PredictBatchResponse) -> list[np.ndarray | pb.Error]:
    """Each result's outputs (or its error), from the block or from the results' own outputs."""
    block = np.frombuffer(response.outputs, dtype="<f4")
    answers: list[np.ndarray | pb.Error] = []
    start = 0
    for result in response.results:
        if result.HasField("error"):
            answers.append(result.error)
            continue
        size = result.timesteps * result.output_size
        if response.outputs:
            answers.append(block[start:start + size].reshape(result.timesteps, result.output_size))
            start += size
        else:
            answers.append(outputs(result))
    assert start == block.size
    return answers


def sequences(seed: int, count: int, prefix: str) -> dict[str, tuple[np.ndarray, list[int], set[int]]]:
    """stream id -> (sequence, chunk lengths, indices of the chunks that reset: the first, and one cut in
    the middle where the sequence starts over)."""
    rng = np.random.default_rng(seed)
    streams = {}
    for n in range(count):
        length = int(rng.integers(2, 120))
        cuts = sorted(set(rng.integers(1, length, size=int(rng.integers(1, 6))).tolist()))
        bounds = [0, *cuts, length]
        lengths = [b - a for a, b in itertools.pairwise(bounds)]
        resets = {0}
        if len(lengths) > 2 and n % 3 == 0:
            resets.add(int(rng.integers(1, len(lengths))))  # a reset in the middle: a new sequence from there
        streams[f"{prefix}-{n}-{uuid.uuid4().hex[:4]}"] = (
            rng.normal(0, 1.5, size=(length, 1)).astype(np.float32), lengths, resets)
    return streams


def expected_answers(streams) -> dict[str, list[np.ndarray]]:
    """Keras on every sequence (the part after each reset is its own sequence from zero state), per chunk."""
    pieces, where = [], []
    for stream_id, (x, lengths, resets) in streams.items():
        bounds = np.cumsum([0, *lengths])
        starts = sorted(resets)
        for number, first in enumerate(starts):
            last = starts[number + 1] if number + 1 < len(starts) else len(lengths)
            pieces.append(x[bounds[first]:bounds[last]])
            where.append((stream_id, first, last))
    whole = keras_whole_sequences(DEFAULT_MODEL, pieces)
    answers: dict[str, list[np.ndarray]] = {stream_id: [] for stream_id in streams}
    for (stream_id, first, last), y in zip(where, whole, strict=True):
        _, lengths, _ = streams[stream_id]
        start = 0
        for index in range(first, last):
            answers[stream_id].append(y[start:start + lengths[index]])
            start += lengths[index]
    return answers


def random_messages(streams, seed: int, packed: bool, end_streams: set[str]) -> list[pb.PredictBatchRequest]:
    """Every stream's chunks, in its own order, dealt into messages of random sizes: a message may hold
    several chunks of one stream. Streams in `end_streams` end with their last chunk."""
    rng = random.Random(seed)
    queues = {}
    for stream_id, (x, lengths, resets) in streams.items():
        items, start, offset = [], 0, 0
        for index, length in enumerate(lengths):
            if index in resets:
                offset = 0
            flags = {"reset": index in resets, "end": stream_id in end_streams and index == len(lengths) - 1}
            piece = x[start:start + length]
            items.append((chunk(stream_id, piece, offset, packed=packed, **flags), piece))
            start += length
            offset += length
        queues[stream_id] = items
    order = [s for s, items in queues.items() for _ in items]
    rng.shuffle(order)
    messages, current = [], []
    size = rng.randint(1, 40)
    for stream_id in order:
        current.append(queues[stream_id].pop(0))
        if len(current) >= size:
            messages.append(message(current, packed))
            current, size = [], rng.randint(1, 40)
    if current:
        messages.append(message(current, packed))
    return messages


def collect(messages, responses, got: dict[str, list[np.ndarray]]) -> None:
    for request, response in zip(messages, responses, strict=True):
        assert not response.HasField("error"), response.error.message
        assert len(response.results) == len(request.chunks)
        for sent, result, answer in zip(request.chunks, response.results, result_outputs(response), strict=True):
            assert not isinstance(answer, pb.Error), f"{sent.stream_id}: {answer.message}"
            assert result.stream_id == sent.stream_id and result.request_id == sent.request_id
            assert result.offset == sent.start_offset + sent.timesteps and not result.replayed
            got[sent.stream_id].append(answer)


@pytest.mark.parametrize("packed", [True, False], ids=["values-block", "values-per-chunk"])
def test_random_groupings_equal_keras_on_both_rpcs(default_server, packed) -> None:
    """Two gateways: one sends unary PredictBatch calls, one pipelines PredictBatchStream; each message mixes
    streams, and holds several chunks of one stream in order; resets and ends fall in the middle."""
    unary = sequences(seed=11, count=40, prefix="batch-unary")
    streaming = sequences(seed=12, count=40, prefix="batch-stream")
    ends = set(list(unary)[::5]) | set(list(streaming)[::5])
    got: dict[str, list[np.ndarray]] = {s: [] for s in [*unary, *streaming]}

    async def run() -> None:
        async with grpc.aio.insecure_channel(default_server.address) as channel:
            stub = stream_pb2_grpc.StreamInferenceStub(channel)
            unary_messages = random_messages(unary, 1, packed, ends)
            stream_messages = random_messages(streaming, 2, packed, ends)

            async def one_by_one() -> None:
                collect(unary_messages, [await stub.PredictBatch(m, timeout=60) for m in unary_messages], got)

            async def pipelined() -> None:
                call = stub.PredictBatchStream(iter(stream_messages), timeout=60)
                collect(stream_messages, [r async for r in call], got)

            await asyncio.gather(one_by_one(), pipelined())
            # An ended stream is gone: its state was deleted after its last chunk.
            for stream_id in sorted(ends)[:3]:
                assert not (await stub.GetStream(pb.GetStreamRequest(stream_id=stream_id))).exists

    asyncio.run(run())
    expected = expected_answers({**unary, **streaming})
    worst = 0.0
    for stream_id, answers in expected.items():
        assert len(got[stream_id]) == len(answers), stream_id
        for have, want in zip(got[stream_id], answers, strict=True):
            worst = max(worst, float(np.max(np.abs(have - want))))
    assert worst <= TOLERANCE, worst


def test_a_bad_chunk_fails_alone(default_server) -> None:
    """A bad id, a NaN, a wrong offset, too many timesteps, a late duplicate: each is its own result's error;
    the good chunks of the same message are applied and answered; bad chunks change nothing."""
    with grpc.insecure_channel(default_server.address) as channel:
        stub = stream_pb2_grpc.StreamInferenceStub(channel)
        tag = uuid.uuid4().hex[:6]
        good, moved = f"good-{tag}", f"moved-{tag}"
        x = np.linspace(-1, 1, 4, dtype=np.float32).reshape(4, 1)
        predict(stub, moved, x, reset=True)  # at offset 4
        nan = x.copy()
        nan[2, 0] = np.nan
        parts = [
            (chunk(good, x, 0, packed=True, reset=True), x),
            (chunk("bad\x07id", x, 0, packed=True), x),
            (chunk(f"nan-{tag}", nan, 0, packed=True), nan),
            (chunk(moved, x, 0, packed=True), x),  # the stream stands at 4, not 0
            (chunk(f"long-{tag}", np.zeros((2000, 1), np.float32), 0, packed=True), np.zeros((2000, 1), np.float32)),
            (chunk(good, x, 4, packed=True), x),  # the same stream again, after its first chunk
            (chunk(good, x, 4, packed=True), x),  # a repeat of that chunk: answered again (replayed)
        ]
        response = stub.PredictBatch(message(parts, packed=True), timeout=30)
        codes = [grpc.StatusCode.OK if not r.HasField("error") else
                 next(c for c in grpc.StatusCode if c.value[0] == r.error.code) for r in response.results]
        assert codes == [grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INVALID_ARGUMENT,
                         grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
                         grpc.StatusCode.OK, grpc.StatusCode.OK], [r.error.message for r in response.results]
        results = response.results
        assert "stream_id" in results[1].error.message and "control character" in results[1].error.message
        assert "values" in results[2].error.message and "NaN" in results[2].error.message
        assert results[3].offset == 4 and "offset" in results[3].error.message
        assert "timesteps" in results[4].error.message
        assert [r.offset for r in results if not r.HasField("error")] == [4, 8, 8]
        assert [r.replayed for r in results if not r.HasField("error")] == [False, False, True]
        answers = result_outputs(response)
        np.testing.assert_array_equal(answers[5], answers[6])  # the replayed answer is the stored one
        # Nothing changed where a chunk failed.
        assert stub.GetStream(pb.GetStreamRequest(stream_id=moved)).offset == 4
        for failed in (f"nan-{tag}", f"long-{tag}"):
            assert not stub.GetStream(pb.GetStreamRequest(stream_id=failed)).exists
        assert stub.GetStream(pb.GetStreamRequest(stream_id=good)).offset == 8


def test_messages_over_a_limit_are_refused_whole(start_server) -> None:
    """More chunks or timesteps than allowed, or a values block of the wrong size: the whole message is
    refused with INVALID_ARGUMENT (the same message would be refused again), naming the limit or the field,
    and none of its chunks is applied; on PredictBatchStream the refusal is that message's answer and the
    stream goes on."""
    server = start_server("--max-batch-chunks", "8", "--max-batch-timesteps", "100")
    x = np.ones((5, 1), np.float32)
    tag = uuid.uuid4().hex[:6]
    with grpc.insecure_channel(server.address) as channel:
        stub = stream_pb2_grpc.StreamInferenceStub(channel)
        model = stub.GetModel(pb.GetModelRequest())
        assert (model.max_batch_chunks, model.max_batch_timesteps) == (8, 100)
        too_many = message([(chunk(f"many-{tag}-{i}", x, 0, packed=True), x) for i in range(9)], packed=True)
        too_long = message([(chunk(f"long-{tag}-{i}", np.ones((60, 1), np.float32), 0, packed=True),
                             np.ones((60, 1), np.float32)) for i in range(2)], packed=True)
        short_block = message([(chunk(f"short-{tag}", x, 0, packed=True), x)], packed=True)
        short_block.values = short_block.values[:-4]
        mixed = message([(chunk(f"mixed-{tag}", x, 0, packed=False), x)], packed=True)
        refusals = [(too_many, grpc.StatusCode.INVALID_ARGUMENT, "--max-batch-chunks"),
                    (too_long, grpc.StatusCode.INVALID_ARGUMENT, "--max-batch-timesteps"),
                    (short_block, grpc.StatusCode.INVALID_ARGUMENT, "values: has 4 values"),
                    (mixed, grpc.StatusCode.INVALID_ARGUMENT, "chunks[0].values")]
        for request, code, text in refusals:
            with pytest.raises(grpc.RpcError) as refused:
                stub.PredictBatch(request, timeout=30)
            assert refused.value.code() == code and text in refused.value.details(), refused.value.details()
        fine = message([(chunk(f"fine-{tag}", x, 0, packed=True), x)], packed=True)
        answers = list(stub.PredictBatchStream(iter([r for r, _, _ in refusals] + [fine]), timeout=30))
        for (_, code, text), answer in zip(refusals, answers, strict=False):
            assert answer.error.code == code.value[0] and text in answer.error.message and not answer.results
        assert not answers[-1].HasField("error") and answers[-1].results[0].offset == 5
        for request, _, _ in refusals:
            for sent in request.chunks:
                assert not stub.GetStream(pb.GetStreamRequest(stream_id=sent.stream_id)).exists, sent.stream_id


def test_a_message_that_does_not_fit_the_queue_is_refused_whole(start_server) -> None:
    """--max-queued-chunks counts a message's chunks together: a message larger than the room left is
    refused whole with RESOURCE_EXHAUSTED, not applied in part."""
    server = start_server("--max-queued-chunks", "10")
    x = np.ones((2, 1), np.float32)
    tag = uuid.uuid4().hex[:6]
    with grpc.insecure_channel(server.address) as channel:
        stub = stream_pb2_grpc.StreamInferenceStub(channel)
        request = message([(chunk(f"queue-{tag}-{i}", x, 0, packed=True), x) for i in range(11)], packed=True)
        with pytest.raises(grpc.RpcError) as refused:
            stub.PredictBatch(request, timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-queued-chunks" in refused.value.details()
        for sent in request.chunks:
            assert not stub.GetStream(pb.GetStreamRequest(stream_id=sent.stream_id)).exists
        fits = message([(chunk(f"fits-{tag}-{i}", x, 0, packed=True), x) for i in range(10)], packed=True)
        assert [r.offset for r in stub.PredictBatch(fits, timeout=30).results] == [2] * 10


def test_tenants_and_their_limits_hold_per_chunk(start_server, tmp_path) -> None:
    """With API keys, a message's chunks are in its tenant's namespace: a chunk that names another tenant's
    stream reaches its own tenant's stream of that id, and leaves the other's unchanged; a chunk over the
    tenant's chunks/s fails alone with RESOURCE_EXHAUSTED while the chunks before it are applied."""
    alpha, beta = secrets.token_hex(16), secrets.token_hex(16)
    keys = tmp_path / "api-keys"
    keys.write_text(f"alpha {alpha}\nbeta {beta} chunks_per_s=3\n")
    server = start_server("--api-keys", str(keys))
    x = np.ones((3, 1), np.float32)
    shared = f"shared-{uuid.uuid4().hex[:6]}"
    with grpc.insecure_channel(server.address) as channel:
        stub = stream_pb2_grpc.StreamInferenceStub(channel)
        as_alpha = (("authorization", f"Bearer {alpha}"),)
        as_beta = (("authorization", f"Bearer {beta}"),)
        stub.PredictBatch(message([(chunk(shared, x, 0, packed=True, reset=True), x)], True), metadata=as_alpha)
        # beta's chunk at alpha's offset: beta's own stream of that id is new, so offset 3 does not fit it.
        parts = [(chunk(shared, x, 3, packed=True), x)] + [
            (chunk(f"beta-{i}-{shared}", x, 0, packed=True), x) for i in range(5)]
        response = stub.PredictBatch(message(parts, True), metadata=as_beta, timeout=30)
        codes = [r.error.code for r in response.results]
        assert codes[0] == grpc.StatusCode.FAILED_PRECONDITION.value[0] and response.results[0].offset == 0
        # chunks/s = 3, a burst of 3: the refused chunk took one, two new streams pass, the rest are over the rate.
        assert codes[1:3] == [0, 0] and codes[3:] == [grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]] * 3, codes
        assert "chunks" in response.results[5].error.message
        info = stub.GetStream(pb.GetStreamRequest(stream_id=shared), metadata=as_alpha)
        assert info.exists and info.offset == 3
