"""A real OTLP/gRPC trace receiver on a free loopback port: what a collector would get from lstm-serve.

It implements `opentelemetry.proto.collector.trace.v1.TraceService/Export` (the opentelemetry-proto package's
generated code) and keeps every span it is sent, with its resource, for the tests and benchmarks to read.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent import futures
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    span: trace_pb2.Span
    service_name: str

    @property
    def name(self) -> str:
        return self.span.name

    @property
    def trace_id(self) -> str:
        return self.span.trace_id.hex()

    @property
    def span_id(self) -> str:
        return self.span.span_id.hex()

    @property
    def parent_id(self) -> str:
        return self.span.parent_span_id.hex()

    @property
    def attributes(self) -> dict[str, object]:
        """Attribute values as Python values (string, int, bool or float)."""
        values: dict[str, object] = {}
        for attribute in self.span.attributes:
            kind = attribute.value.WhichOneof("value")
            values[attribute.key] = getattr(attribute.value, kind) if kind else None
        return values

    @property
    def links(self) -> list[tuple[str, str]]:
        """(trace id, span id) of each link."""
        return [(link.trace_id.hex(), link.span_id.hex()) for link in self.span.links]


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
               ) -> trace_service_pb2.ExportTraceServiceResponse:
        received = []
        for resource_spans in request.resource_spans:
            service = next((a.value.string_value for a in resource_spans.resource.attributes
                            if a.key == "service.name"), "")
            for scope_spans in resource_spans.scope_spans:
                received.extend(ReceivedSpan(span, service) for span in scope_spans.spans)
        with self._receiver.lock:
            self._receiver.spans.extend(received)
            self._receiver.exports += 1
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """Serves OTLP/gRPC on 127.0.0.1:`port` until `stop`; `endpoint` is what OTEL_EXPORTER_OTLP_ENDPOINT takes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: list[ReceivedSpan] = []
        self.exports = 0
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def of_trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self.lock:
            return [span for span in self.spans if span.trace_id == trace_id]

    def wait_for(self, trace_id: str, names: set[str], timeout_s: float = 20, each: int = 1) -> list[ReceivedSpan]:
        """The spans of `trace_id`, once each name in `names` is among them `each` times (at least); TimeoutError
        naming the missing."""
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.of_trace(trace_id)
            counts = Counter(span.name for span in spans)
            missing = {name for name in names if counts[name] < each}
            if not missing:
                return spans
            if time.monotonic() > deadline:
                raise TimeoutError(f"spans {sorted(missing)} of trace {trace_id} not received in {timeout_s:g} s; "
                                   f"received: {sorted(span.name for span in spans)}")
            time.sleep(0.05)

    def stop(self) -> None:
        self._server.stop(0)
