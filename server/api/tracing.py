"""Traces of requests, at the protocol edges: one server span per request, its stages as child spans.

Off (no `OTEL_TRACES_EXPORTER`), nothing here runs and OpenTelemetry is never imported: the servicers hold
`tracing=None` and take their untraced path. On (server/app/tracing.py builds a `Tracing`), each request -
a unary call, or one message of a bidirectional stream - gets a SERVER span continuing the caller's W3C
`traceparent` (any propagator of OTEL_PROPAGATORS), and, once answered, child spans made after the fact from
the stage times the data path records anyway (server/types.py StageTimes), so the data path itself is never
traced:

    queue        handed to the data plane -> its batch left the batcher's queue
    state.load   -> the model call began: slots loaded (Redis, or this process's memory), stream rules
    model        the model call (one per batch); links to that batch's span below
    state.save   the model call ended -> the batch's answers ready: compare-and-set saves in Redis
    model.batch  one per model call: a child of one request in it, with a link to every request in it

A chunk answered without the model (a replayed retry, a refusal) has `queue` and `state.load` only.

An edge uses it in three steps (the HTTP edge the same way, with its headers and route):

    trace = tracing.request(metadata, "lstm_stream.v1.StreamInference/Predict", {...})
    with trace:                                   # ends the span if validation or submitting raises
        answer = dataplane.submit(trace.chunk(chunk))  # attaches the StageTimes, notes the chunk's attributes
    prediction = await trace.answer(answer)       # or trace.end(...): children written, span ended, once

The model span links rather than nests because one model call answers many requests, each in its own trace.
Why not opentelemetry-instrumentation-grpc: docs/operations.md, "Tracing".
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from server.errors import ServiceError
from server.types import Chunk, ModelCall, Prediction, StageTimes

if TYPE_CHECKING:  # imported only when tracing is on (server/app/tracing.py)
    from opentelemetry.trace import Span, Tracer

# Carriers are grpc metadata or HTTP headers: (name, value) pairs, or a mapping of them.
Carrier = Iterable[tuple[str, str | bytes]] | Mapping[str, str]

# gRPC codes that mean the server failed (OpenTelemetry's semantic conventions for gRPC servers); the rest are
# the caller's errors, which leave a server span's status unset.
_SERVER_FAULTS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"})


def stream_id_attribute(stream_id: str, tenant: str, hashed: bool) -> tuple[str, str]:
    """The attribute naming a stream: its id, or with API keys on (tenants) a hash of tenant and id, so a trace
    backend never holds a tenant's ids. The hash is unkeyed on purpose: an operator given a stream id and its
    tenant finds its spans by computing it (docs/operations.md, "Tracing")."""
    if not hashed:
        return "lstm.stream.id", stream_id
    digest = hashlib.blake2b(f"{tenant}\0{stream_id}".encode("utf-8", "surrogatepass"), digest_size=8)
    return "lstm.stream.id_hash", digest.hexdigest()


def outcome_of(answer: Prediction | BaseException) -> str:
    """"ok", "replayed", or the gRPC code's name the caller gets ("CANCELLED" for a call that broke)."""
    if isinstance(answer, Prediction):
        return "replayed" if answer.replayed else "ok"
    if isinstance(answer, ServiceError):
        return answer.code.name
    return "CANCELLED" if isinstance(answer, asyncio.CancelledError) else "INTERNAL"  # api/errors.py's mapping


class Tracing:
    """The tracer and the propagators, and what each request's spans need; built only when tracing is on."""

    def __init__(self, tracer: Tracer, *, hash_stream_ids: bool) -> None:
        from opentelemetry import propagate, trace
        from opentelemetry.trace import Link, SpanKind, Status, StatusCode

        self.tracer = tracer
        self.hash_stream_ids = hash_stream_ids
        self._extract = propagate.extract
        self._in_context = trace.set_span_in_context
        self._link = Link
        self._server = SpanKind.SERVER
        self._error = Status(StatusCode.ERROR)

    def request(self, carrier: Carrier | None, name: str, attributes: Mapping[str, Any] | None = None
                ) -> RequestTrace:
        """Start the SERVER span of one request: `carrier` the incoming metadata or headers (a `traceparent`
        there is continued), `name` the RPC ("<service>/<method>") or the HTTP route ("POST /v1/streams/{id}")."""
        parent = self._extract(_headers(carrier)) if carrier is not None else None
        span = self.tracer.start_span(name, context=parent, kind=self._server, attributes=attributes)
        return RequestTrace(self, span)


def rpc_trace(tracing: Tracing | None, metadata: Carrier | None, service: str, method: str) -> RequestTrace | None:
    """A gRPC request's server span (named `<service>/<method>`, with the rpc.* attributes), continuing a
    `traceparent` in its metadata; None with tracing off. Both servicers start theirs here."""
    if tracing is None:
        return None
    return tracing.request(metadata, f"{service}/{method}",
                           {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method})


def _headers(carrier: Carrier) -> dict[str, str]:
    """Metadata or headers as the propagators read them: lower-case names, text values (binary ones skipped)."""
    pairs = carrier.items() if isinstance(carrier, Mapping) else carrier
    return {key.lower(): value for key, value in pairs if isinstance(value, str)}


class RequestTrace:
    """One request's SERVER span, and the chunks it handed to the data plane (one; PredictBatch, several)."""

    __slots__ = ("_chunks", "_ended", "_tracing", "span")

    def __init__(self, tracing: Tracing, span: Span) -> None:
        self._tracing = tracing
        self.span = span
        self._chunks: list[tuple[Chunk, StageTimes]] = []
        self._ended = False

    def __enter__(self) -> RequestTrace:
        return self

    def __exit__(self, _type: object, error: BaseException | None, _traceback: object) -> None:
        """`with trace:` ends the span if the block raises (a refused request); it stays open otherwise."""
        if error is not None:
            self.end(error)

    async def answer(self, answer: Awaitable[Prediction]) -> Prediction:
        """Await a submitted chunk's answer, and end the span with it."""
        try:
            prediction = await answer
        except BaseException as exc:
            self.end(exc)
            raise
        self.end(prediction)
        return prediction

    def chunk(self, chunk: Chunk) -> Chunk:
        """Note a validated chunk before it is submitted: its stages are recorded from now on (its own StageTimes
        if the edge gave it one, Triton's statistics do) and its attributes go on the span."""
        times = chunk.times
        if times is None:
            times = chunk.times = StageTimes()
        if not times.queued:
            times.queued = time.monotonic_ns()
        times.trace = self
        self._chunks.append((chunk, times))
        if len(self._chunks) == 1:
            self.span.set_attributes(self._chunk_attributes(chunk))
        else:
            self.span.set_attribute("lstm.chunks", len(self._chunks))
        return chunk

    def _chunk_attributes(self, chunk: Chunk) -> dict[str, Any]:
        attributes: dict[str, Any] = {"lstm.timesteps": chunk.timesteps}
        if chunk.stream_id is not None:
            key, value = stream_id_attribute(chunk.stream_id, chunk.tenant, self._tracing.hash_stream_ids)
            attributes[key] = value
        if chunk.tenant:
            attributes["lstm.tenant"] = chunk.tenant
        if chunk.model:
            attributes["lstm.model"] = chunk.model
        if chunk.start_offset is not None:
            attributes["lstm.start_offset"] = chunk.start_offset
        if chunk.reset:
            attributes["lstm.reset"] = True
        if chunk.end:
            attributes["lstm.end"] = True
        return attributes

    def end(self, answer: Prediction | BaseException | None,
            answers: Iterable[Prediction | BaseException] = ()) -> None:
        """The request is answered (`answer`: its Prediction, or what it failed with); for a request of several
        chunks `answer` is None (or what refused it whole) and `answers` is each chunk's. Writes the stages'
        child spans and ends the span; once only."""
        if self._ended:
            return
        self._ended = True
        span = self.span
        answers = list(answers)
        if answer is None and len(answers) == 1:
            answer = answers[0]  # a PredictBatch of one chunk: its outcome is the request's
        outcome = "ok" if answer is None else outcome_of(answer)
        span.set_attribute("lstm.outcome", outcome)
        if isinstance(answer, Prediction):
            span.set_attribute("lstm.offset", answer.offset)
            if answer.model_version:
                span.set_attribute("lstm.model.version", answer.model_version)
        elif outcome in _SERVER_FAULTS:
            span.set_status(self._tracing._error)
        if span.is_recording():
            # Monotonic stage times to the wall clock spans use: one offset, read now.
            to_wall = time.time_ns() - time.monotonic_ns()
            several = len(self._chunks) > 1
            for index, (chunk, times) in enumerate(self._chunks):
                parent = span
                if several:
                    parent = self._chunk_span(chunk, times, index, answers, to_wall)
                self._stages(parent, times, to_wall)
        for _, times in self._chunks:
            times.call = None  # no cycle left for the garbage collector (times -> call -> members -> times)
        self._chunks.clear()
        span.end()

    def _chunk_span(self, chunk: Chunk, times: StageTimes, index: int, answers: list[Prediction | BaseException],
                    to_wall: int) -> Span:
        """A chunk of a request of several: its own span under the request's, its stages under it."""
        attributes = self._chunk_attributes(chunk)
        attributes["lstm.chunk.index"] = index
        if index < len(answers):
            attributes["lstm.outcome"] = outcome_of(answers[index])
            if isinstance(answers[index], Prediction):
                attributes["lstm.offset"] = answers[index].offset  # type: ignore[union-attr]
        finished = times.batch_finished or time.monotonic_ns()
        span = self._tracing.tracer.start_span("chunk", context=self._tracing._in_context(self.span),
                                               attributes=attributes, start_time=times.queued + to_wall)
        span.end(end_time=finished + to_wall)
        return span

    def _stages(self, parent: Span, times: StageTimes, to_wall: int) -> None:
        if not times.batch_started:
            return  # refused before its batch ran (a full queue, a deadline, a broken stream)
        tracing = self._tracing
        context = tracing._in_context(parent)
        tracer = tracing.tracer

        def child(name: str, start: int, end: int, **kwargs: Any) -> None:
            tracer.start_span(name, context=context, start_time=start + to_wall, **kwargs).end(end_time=end + to_wall)

        finished = times.batch_finished or time.monotonic_ns()
        child("queue", times.queued or times.batch_started, times.batch_started)
        if not times.model_started:  # answered without the model: a replay, a refusal
            child("state.load", times.batch_started, finished)
            return
        child("state.load", times.batch_started, times.model_started)
        batch = self._batch_span(times.call, times, to_wall) if times.call is not None else None
        child("model", times.model_started, times.model_finished, attributes={"lstm.batch.size": times.model_batch},
              links=[tracing._link(batch.get_span_context())] if batch is not None else None)
        child("state.save", times.model_finished, finished)
        parent.set_attribute("lstm.batch.size", times.model_batch)

    def _batch_span(self, call: ModelCall, times: StageTimes, to_wall: int) -> Span | None:
        """The model call's own span, written by the first of its requests to end: under the first request in it
        that is sampled, linked to every request in it."""
        if call.span is not None:
            return call.span  # type: ignore[return-value]
        traces = [member.trace for member in call.members if isinstance(member.trace, RequestTrace)]
        parent = next((trace.span for trace in traces if trace.span.is_recording()), None)
        if parent is None:
            return None
        tracing = self._tracing
        span = tracing.tracer.start_span(
            "model.batch", context=tracing._in_context(parent), start_time=times.model_started + to_wall,
            attributes={"lstm.batch.size": times.model_batch},
            links=[tracing._link(trace.span.get_span_context()) for trace in traces],
        )
        span.end(end_time=times.model_finished + to_wall)
        call.span = span
        return span
