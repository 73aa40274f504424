"""Tracing's pieces in process (server/app/tracing.py, server/api/tracing.py), on the real OpenTelemetry SDK with
its in-memory exporter: which environment turns it on, the attributes, and the spans a batch of requests leaves.
tests/serving/test_tracing.py drives a real server."""

from __future__ import annotations

import hashlib
import time

import grpc
import numpy as np
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from server.api.tracing import Tracing, outcome_of, stream_id_attribute
from server.app.tracing import exporters_wanted, start_tracing
from server.errors import ServiceError, TracingConfigError
from server.types import Chunk, ModelCall, Prediction

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.mark.parametrize(("value", "wanted"), [
    (None, []), ("", []), ("none", []), ("otlp", ["otlp"]), (" OTLP , console", ["otlp", "console"]),
])
def test_the_exporter_variable_turns_tracing_on(value: str | None, wanted: list[str]) -> None:
    environ = {} if value is None else {"OTEL_TRACES_EXPORTER": value}
    assert exporters_wanted(environ) == wanted
    assert exporters_wanted({**environ, "OTEL_SDK_DISABLED": "true"}) == []


def test_an_exporter_or_protocol_it_cannot_send_with_is_a_start_up_error() -> None:
    with pytest.raises(TracingConfigError, match="zipkin"):
        exporters_wanted({"OTEL_TRACES_EXPORTER": "otlp,zipkin"})
    with pytest.raises(TracingConfigError, match="http/json"):
        start_tracing(False, {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    assert start_tracing(False, {}) is None


def test_stream_ids_are_hashed_with_tenants() -> None:
    assert stream_id_attribute("s-1", "", hashed=False) == ("lstm.stream.id", "s-1")
    key, value = stream_id_attribute("s-1", "alpha", hashed=True)
    assert key == "lstm.stream.id_hash" and "s-1" not in value
    assert value == hashlib.blake2b(b"alpha\0s-1", digest_size=8).hexdigest()
    assert value != stream_id_attribute("s-1", "beta", hashed=True)[1]  # two tenants' "s-1" are two streams


def test_outcomes_name_the_code_the_caller_gets() -> None:
    answer = Prediction("s", np.zeros((1, 1), np.float32), 3)
    assert outcome_of(answer) == "ok"
    answer.replayed = True
    assert outcome_of(answer) == "replayed"
    assert outcome_of(ServiceError(grpc.StatusCode.FAILED_PRECONDITION, "offset")) == "FAILED_PRECONDITION"
    assert outcome_of(RuntimeError("bug")) == "INTERNAL"


def _ran_together(chunks: list[Chunk], start: int) -> None:
    """What the batcher and the processor record for chunks whose batch ran the model (1 ms each stage)."""
    call = ModelCall([chunk.times for chunk in chunks])  # type: ignore[misc]
    for times in call.members:
        times.batch_began(start)
        times.model_ran(start + 1_000_000, start + 2_000_000, len(chunks), call)
        times.batch_finished = start + 3_000_000


def test_a_batch_leaves_stage_spans_per_request_and_one_linked_model_span() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider.get_tracer("test"), hash_stream_ids=False)
    carrier = [("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"), ("x-binary-bin", b"\0")]
    traces = [tracing.request(carrier if i == 0 else None, "svc/Predict") for i in range(2)]
    chunks = [trace.chunk(Chunk(f"s-{i}", np.zeros((2, 1), np.float32), tenant="", start_offset=4))
              for i, trace in enumerate(traces)]
    _ran_together(chunks, time.monotonic_ns())
    for chunk, trace in zip(chunks, traces, strict=True):
        trace.end(Prediction(chunk.stream_id, np.zeros((2, 1), np.float32), 6))
    traces[0].end(RuntimeError("twice"))  # ends once: ignored

    spans = exporter.get_finished_spans()
    servers = [span for span in spans if span.name == "svc/Predict"]
    assert len(servers) == 2
    first = servers[0]
    assert format(first.context.trace_id, "032x") == TRACE_ID and format(first.parent.span_id, "016x") == PARENT_ID
    assert dict(first.attributes) == {"lstm.timesteps": 2, "lstm.stream.id": "s-0", "lstm.start_offset": 4,
                                            "lstm.outcome": "ok", "lstm.offset": 6, "lstm.batch.size": 2}
    (batch,) = [span for span in spans if span.name == "model.batch"]
    assert {link.context.span_id for link in batch.links} == {server.context.span_id for server in servers}
    assert batch.parent.span_id == first.context.span_id
    models = [span for span in spans if span.name == "model"]
    assert len(models) == 2 and all(model.links[0].context.span_id == batch.context.span_id for model in models)
    for server in servers:
        stages = {span.name: span for span in spans if span.parent and span.parent.span_id == server.context.span_id}
        assert {"queue", "state.load", "model", "state.save"} <= set(stages)
        assert stages["model"].end_time - stages["model"].start_time == 1_000_000
        assert stages["state.load"].end_time == stages["model"].start_time
