"""OpenTelemetry traces (docs/operations.md, "Tracing"), sent to a real OTLP/gRPC receiver in the test.

With `OTEL_TRACES_EXPORTER=otlp` a request carrying a W3C `traceparent` is continued: a server span per
request (per message of a stream), with `queue`, `state.load`, `model` and `state.save` under it, and one
`model.batch` span per model call linked to every request in it. With API keys on, stream ids are hashed.
Without the variable nothing is exported and OpenTelemetry is never imported by the server process.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import re
import secrets
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tritonclient.grpc as triton
import yaml

from devkit.native_calls import request
from devkit.otlp import OtlpReceiver, ReceivedSpan
from devkit.processes import RedisServer, ServerProcess, find_binary, free_port, wait_until
from devkit.topology import ENVOY_CONFIG, local_envoy_config
from lstm_stream.v1 import stream_pb2 as pb
from lstm_stream.v1 import stream_pb2_grpc as pb_grpc
from server.config import DEFAULT_MODEL

NATIVE = "lstm_stream.v1.StreamInference"
STAGES = {"queue", "state.load", "model", "state.save"}
KEY = "alpha-" + secrets.token_hex(8)


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def traced(redis_server: RedisServer, receiver: OtlpReceiver) -> Iterator[ServerProcess]:
    """Tracing on, with API keys (so stream ids are hashed); a short batching delay, so concurrent calls share
    model calls."""
    keys = Path(tempfile.mkdtemp(prefix="lstm-tracing-")) / "api-keys"
    keys.write_text(f"alpha {KEY}\n")
    server = ServerProcess(redis_server.url, DEFAULT_MODEL, "--api-keys", str(keys), "--max-delay-ms", "20", env={
        "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "50", "OTEL_SERVICE_NAME": "", "OTEL_RESOURCE_ATTRIBUTES": "",
    })
    yield server
    server.stop()


def traceparent() -> tuple[str, str, str]:
    """(header value, trace id, parent span id): a sampled W3C trace context, as a caller's tracer sends it."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def metadata(header: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {KEY}"), ("traceparent", header))


def by_name(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    return [span for span in spans if span.name == name]


def hashed(stream_id: str, tenant: str = "alpha") -> str:
    """What docs/operations.md tells an operator to compute to find a stream's spans."""
    return hashlib.blake2b(f"{tenant}\0{stream_id}".encode(), digest_size=8).hexdigest()


def test_a_traceparent_is_continued_with_the_stages_as_children(traced: ServerProcess, receiver: OtlpReceiver) -> None:
    header, trace_id, parent_id = traceparent()
    stream_id = "sensor-" + secrets.token_hex(4)
    x = np.arange(6, dtype=np.float32).reshape(3, 2)[:, :1]
    traced.stub.Predict(request(stream_id, x), metadata=metadata(header), timeout=30)

    spans = receiver.wait_for(trace_id, {f"{NATIVE}/Predict", *STAGES, "model.batch"})
    (server_span,) = by_name(spans, f"{NATIVE}/Predict")
    assert server_span.parent_id == parent_id
    assert server_span.service_name == "lstm-serve"
    assert server_span.span.kind == server_span.span.SPAN_KIND_SERVER
    attributes = server_span.attributes
    assert attributes["lstm.stream.id_hash"] == hashed(stream_id)
    assert attributes["lstm.tenant"] == "alpha"
    assert attributes["lstm.timesteps"] == 3
    assert attributes["lstm.offset"] == 3
    assert attributes["lstm.outcome"] == "ok"
    assert attributes["lstm.batch.size"] >= 1
    assert attributes["rpc.method"] == "Predict"
    for name in STAGES:
        (stage,) = by_name(spans, name)
        assert stage.parent_id == server_span.span_id, name
        assert server_span.span.start_time_unix_nano <= stage.span.start_time_unix_nano
        assert stage.span.start_time_unix_nano <= stage.span.end_time_unix_nano
    # The stages follow each other in the data path's order.
    ordered = [by_name(spans, name)[0].span for name in ("queue", "state.load", "model", "state.save")]
    assert all(a.end_time_unix_nano <= b.start_time_unix_nano for a, b in itertools.pairwise(ordered))
    # The raw stream id appears nowhere: tenants are on.
    assert not any(stream_id in str(value) for span in spans for value in span.attributes.values())


def test_each_message_of_a_stream_has_its_own_server_span(traced: ServerProcess, receiver: OtlpReceiver) -> None:
    header, trace_id, parent_id = traceparent()
    stream_id = "stream-" + secrets.token_hex(4)
    chunks = [request(stream_id, np.full((2, 1), i, np.float32)) for i in range(3)]
    answers = list(traced.stub.PredictStream(iter(chunks), metadata=metadata(header), timeout=30))
    assert [answer.offset for answer in answers] == [2, 4, 6]

    name = f"{NATIVE}/PredictStream"
    spans = receiver.wait_for(trace_id, {name, *STAGES}, each=3)
    servers = by_name(spans, name)
    assert len(servers) == 3
    assert sorted(span.attributes["lstm.offset"] for span in servers) == [2, 4, 6]
    assert all(span.parent_id == parent_id for span in servers)
    assert {span.attributes["lstm.stream.id_hash"] for span in servers} == {hashed(stream_id)}


def test_a_model_call_links_to_every_request_in_its_batch(traced: ServerProcess, receiver: OtlpReceiver) -> None:
    """Concurrent calls of distinct streams share model calls (--max-delay-ms); each call's `model` span links to
    its batch's `model.batch` span, which links back to every request whose chunk ran in it."""
    calls = 6
    for _ in range(5):  # until two calls shared a model call (the delay makes that the first try, nearly always)
        contexts = [traceparent() for _ in range(calls)]

        def call(context: tuple[str, str, str]) -> None:
            traced.stub.Predict(request("batch-" + secrets.token_hex(4), np.ones((1, 1), np.float32)),
                                metadata=metadata(context[0]), timeout=30)

        with concurrent.futures.ThreadPoolExecutor(calls) as pool:
            list(pool.map(call, contexts))
        traces = {trace_id: receiver.wait_for(trace_id, {f"{NATIVE}/Predict", "model"}) for _, trace_id, _ in contexts}
        servers = {trace_id: by_name(spans, f"{NATIVE}/Predict")[0] for trace_id, spans in traces.items()}
        batches: dict[tuple[str, str], ReceivedSpan] = {}
        # Every batch span sits in the trace of one request of its batch: wait until each request's is known.
        for trace_id, spans in traces.items():
            (model,) = by_name(spans, "model")
            (link,) = model.links
            batch_spans = [span for span in receiver.wait_for(link[0], {"model.batch"}) if span.span_id == link[1]]
            assert batch_spans, f"the model span of {trace_id} links to a batch span never received"
            batches[link] = batch_spans[0]
        for batch in batches.values():
            linked = set(batch.links)
            members = {(trace_id, server.span_id) for trace_id, server in servers.items()
                       if by_name(traces[trace_id], "model")[0].links[0] == (batch.trace_id, batch.span_id)}
            assert members <= linked
            assert batch.attributes["lstm.batch.size"] >= len(members)
            assert batch.parent_id in {span_id for _, span_id in linked}
        if any(len(batch.links) > 1 for batch in batches.values()):
            return
    pytest.fail("no two of 6 concurrent calls shared a model call in 5 tries")


def test_a_batch_message_has_a_span_per_chunk(traced: ServerProcess, receiver: OtlpReceiver) -> None:
    header, trace_id, _ = traceparent()
    ids = [f"batch-msg-{secrets.token_hex(4)}-{i}" for i in range(3)]
    message = pb.PredictBatchRequest(chunks=[request(i, np.ones((2, 1), np.float32)) for i in ids])
    traced.stub.PredictBatch(message, metadata=metadata(header), timeout=30)
    spans = receiver.wait_for(trace_id, {f"{NATIVE}/PredictBatch", "chunk", *STAGES})
    (server,) = by_name(spans, f"{NATIVE}/PredictBatch")
    chunks = by_name(spans, "chunk")
    spans = receiver.wait_for(trace_id, {"chunk", *STAGES}, each=3)
    chunks = by_name(spans, "chunk")
    assert len(chunks) == 3 and all(chunk.parent_id == server.span_id for chunk in chunks)
    assert sorted(chunk.attributes["lstm.stream.id_hash"] for chunk in chunks) == sorted(map(hashed, ids))
    assert {chunk.attributes["lstm.outcome"] for chunk in chunks} == {"ok"}
    assert len(by_name(spans, "model")) == 3


def test_triton_requests_are_traced_too(traced: ServerProcess, receiver: OtlpReceiver) -> None:
    header, trace_id, parent_id = traceparent()
    client = triton.InferenceServerClient(traced.address)
    try:
        infer_input = triton.InferInput("INPUT", [2, 1], "FP32")
        infer_input.set_data_from_numpy(np.ones((2, 1), np.float32))
        client.infer("default", [infer_input], sequence_id=int.from_bytes(secrets.token_bytes(6)), sequence_start=True,
                     headers={"authorization": f"Bearer {KEY}", "traceparent": header}, client_timeout=30)
    finally:
        client.close()
    name = "inference.GRPCInferenceService/ModelInfer"
    spans = receiver.wait_for(trace_id, {name, *STAGES})
    (server,) = by_name(spans, name)
    assert server.parent_id == parent_id
    assert server.attributes["lstm.outcome"] == "ok" and server.attributes["lstm.reset"] is True


def test_http_requests_are_traced_too(traced: ServerProcess, receiver: OtlpReceiver) -> None:
    """KServe v2 infer and the native predict over HTTP: a `traceparent` header is continued, as in gRPC metadata."""
    headers = {"Authorization": f"Bearer {KEY}"}
    stream_id = "http-" + secrets.token_hex(4)
    kserve, kserve_trace, kserve_parent = traceparent()
    body = {"inputs": [{"name": "INPUT", "shape": [2, 1], "datatype": "FP32", "data": [0.5, 0.25]}],
            "parameters": {"sequence_id": stream_id, "sequence_start": True}}
    reply = requests.post(f"{traced.http_url}/v2/models/default/infer", json=body, timeout=30,
                          headers={**headers, "traceparent": kserve})
    assert reply.status_code == 200, reply.text
    native, native_trace, native_parent = traceparent()
    reply = requests.post(f"{traced.http_url}/v1/streams/{stream_id}:predict", timeout=30,
                          json={"values": [0.75], "timesteps": 1, "start_offset": 2},
                          headers={**headers, "traceparent": native})
    assert reply.status_code == 200, reply.text

    for trace_id, parent_id, name, offset in (
            (kserve_trace, kserve_parent, "POST /v2/models/{model}/infer", 2),
            (native_trace, native_parent, "POST /v1/streams/{stream_id}:predict", 3)):
        spans = receiver.wait_for(trace_id, {name, *STAGES})
        (server,) = by_name(spans, name)
        assert server.parent_id == parent_id
        assert server.attributes["http.route"] == name.split(" ", 1)[1]
        assert server.attributes["lstm.offset"] == offset
        assert server.attributes["lstm.stream.id_hash"] == hashed(stream_id)


def test_envoy_passes_the_trace_context_through(traced: ServerProcess, receiver: OtlpReceiver,
                                                tmp_path: Path) -> None:
    """deploy/envoy.yaml, addresses changed only, in front of the server: the caller's traceparent arrives."""
    config = local_envoy_config(yaml.safe_load(ENVOY_CONFIG.read_text()), ("127.0.0.1", free_port()),
                                ("127.0.0.1", free_port()), [("127.0.0.1", traced.port)])
    (tmp_path / "envoy.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    listen = config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    envoy = subprocess.Popen([find_binary("envoy"), "-c", str(tmp_path / "envoy.yaml"), "--disable-hot-restart",
                              "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    channel = grpc.insecure_channel(f"127.0.0.1:{listen}")
    try:
        stub = pb_grpc.StreamInferenceStub(channel)
        header, trace_id, parent_id = traceparent()

        def through_envoy() -> bool:  # until Envoy's health checks put the server in rotation
            try:
                stub.Predict(request("envoy-" + secrets.token_hex(4), np.ones((1, 1), np.float32)),
                             metadata=metadata(header), timeout=5)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                return False
            return True

        wait_until(through_envoy, 30, "a call through Envoy", interval_s=0.2)
        spans = receiver.wait_for(trace_id, {f"{NATIVE}/Predict"})
        assert {span.parent_id for span in by_name(spans, f"{NATIVE}/Predict")} == {parent_id}
    finally:
        channel.close()
        envoy.terminate()
        envoy.wait(10)


def test_a_refused_request_ends_its_span_with_the_code(traced: ServerProcess, receiver: OtlpReceiver) -> None:
    header, trace_id, _ = traceparent()
    bad = pb.PredictRequest(stream_id="bad-" + secrets.token_hex(4), values=[1.0, 2.0, 3.0], timesteps=2)
    with pytest.raises(grpc.RpcError) as refused:
        traced.stub.Predict(bad, metadata=metadata(header), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    (server,) = receiver.wait_for(trace_id, {f"{NATIVE}/Predict"})
    assert server.attributes["lstm.outcome"] == "INVALID_ARGUMENT"


def test_without_the_variables_nothing_is_exported_nor_imported(redis_server: RedisServer,
                                                                receiver: OtlpReceiver) -> None:
    """The receiver is named, but OTEL_TRACES_EXPORTER is not: no span arrives, even after the server's exit (which
    would flush them), and Python's own import log (-X importtime) shows OpenTelemetry was never imported."""
    server = ServerProcess(redis_server.url, DEFAULT_MODEL, env={
        "OTEL_TRACES_EXPORTER": "", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "PYTHONPROFILEIMPORTTIME": "1",
    })
    try:
        header, trace_id, _ = traceparent()
        stream_id = "untraced-" + secrets.token_hex(4)
        answers = list(server.stub.PredictStream(iter([request(stream_id, np.ones((1, 1), np.float32))] * 2),
                                                 metadata=(("traceparent", header),), timeout=30))
        assert answers[-1].offset == 2
        server.stub.Predict(request(stream_id, np.ones((1, 1), np.float32)), metadata=(("traceparent", header),),
                            timeout=30)
    finally:
        assert server.stop() == 0
    log = server.log()
    assert '"tracing": "off"' in log
    # One line per module imported, written by Python itself (some relayed as JSON log lines: server/app/logs.py).
    modules = re.findall(r"import time:\s+\d+ \|\s+\d+ \|\s+([\w.]+)", log)
    assert "grpc" in modules and "tensorflow" in modules, "the import log is missing"
    # Any module of OpenTelemetry loads its top package first. Redis' client tries `opentelemetry.sdk.metrics`,
    # which fails at once (lines for the attempt, a few microseconds): the server keeps the package out.
    assert "opentelemetry" not in modules
    assert receiver.of_trace(trace_id) == []
