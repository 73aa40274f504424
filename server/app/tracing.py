"""Tracing on or off, from the standard OpenTelemetry environment (docs/operations.md, "Tracing").

Off unless `OTEL_TRACES_EXPORTER` names an exporter (`otlp`, or `console` for a look at the spans on stdout);
off, OpenTelemetry is not even imported (its SDK and exporter cost start-up time and memory for nothing).
On, the SDK reads the rest of the standard variables itself: `OTEL_EXPORTER_OTLP_ENDPOINT` (and its
`_TRACES_` form, headers, certificates, timeout), `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`,
`OTEL_TRACES_SAMPLER` and its argument, `OTEL_BSP_*` for the batching of exports, `OTEL_PROPAGATORS`. OTLP goes
over gRPC unless `OTEL_EXPORTER_OTLP_PROTOCOL` (or its `_TRACES_` form) says `http/protobuf`, which needs
the OTLP/HTTP exporter installed. Spans are exported in the background (a batch span processor's thread);
the edge's spans themselves are server/api/tracing.py.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from server.errors import TracingConfigError
from server.security.redact import redact_url
from server.version import server_version

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

    from server.api.tracing import Tracing

SERVICE_NAME = "lstm-serve"  # service.name unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES name one
EXPORTERS = ("otlp", "console")
# Left to the exports still queued at shutdown: a collector that is down must not hold the exit up.
FLUSH_TIMEOUT_MS = 2000
_EXTRA_HINT = "pip install 'lstm-stream-server[tracing]' (the container image has it)"


@dataclass(frozen=True, slots=True)
class TracingSetup:
    """Tracing on: the edges' `Tracing`, and the SDK provider to flush at shutdown."""

    tracing: Tracing
    provider: TracerProvider
    description: str  # for the "serving" log line: exporters and where to

    def close(self) -> None:
        """Send what is still queued and stop the exporters, within FLUSH_TIMEOUT_MS: an export to a collector
        that is down retries for its whole OTLP timeout (10 s), and the exit must not wait for that."""
        stopping = threading.Thread(target=self._flush_and_stop, name="tracing-shutdown", daemon=True)
        stopping.start()
        stopping.join(FLUSH_TIMEOUT_MS / 1000)

    def _flush_and_stop(self) -> None:
        self.provider.force_flush(FLUSH_TIMEOUT_MS)
        self.provider.shutdown()


def exporters_wanted(environ: Mapping[str, str]) -> list[str]:
    """The exporters OTEL_TRACES_EXPORTER names (a comma-separated list; "none" or unset: tracing off)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [name.strip().lower() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",")]
    names = [name for name in names if name and name != "none"]
    unknown = [name for name in names if name not in EXPORTERS]
    if unknown:
        raise TracingConfigError(f"OTEL_TRACES_EXPORTER names {', '.join(unknown)}; this server exports traces with "
                                 f"{' or '.join(EXPORTERS)} (or none)")
    return names


def keep_opentelemetry_out(environ: Mapping[str, str] = os.environ) -> bool:
    """With tracing off, make OpenTelemetry unimportable in this process (True if so), before Redis' client is.

    redis-py (8 and later) imports OpenTelemetry's metrics SDK at import time whenever it is installed, for its
    own optional metrics (about 0.14 s of start-up, and memory), which this server never turns on: an
    installed SDK (the container image has it, for tracing) would cost every server that does not trace. With
    `opentelemetry` marked missing, redis-py takes the path it takes when the SDK is not installed.
    Called by `lstm-serve` only (server/app/main.py), never on import: other processes (the tests' OTLP
    receiver) keep their OpenTelemetry."""
    try:
        if exporters_wanted(environ):
            return False
    except TracingConfigError:
        return False  # reported by start_tracing, where start-up errors are
    if any(name == "opentelemetry" or name.startswith("opentelemetry.") for name in sys.modules):
        return False  # already imported by someone: too late to keep out, and nothing to save
    sys.modules["opentelemetry"] = None  # type: ignore[assignment]  # `import` raises ImportError
    return True


def start_tracing(hash_stream_ids: bool, environ: Mapping[str, str] = os.environ) -> TracingSetup | None:
    """Tracing as the environment configures it; None when it is off (nothing imported then)."""
    names = exporters_wanted(environ)
    if not names:
        return None
    from server.api.tracing import Tracing

    try:
        from opentelemetry.sdk.resources import SERVICE_NAME as SERVICE_NAME_KEY
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise TracingConfigError(f"OTEL_TRACES_EXPORTER={','.join(names)} needs the OpenTelemetry SDK ({exc}): "
                                 f"{_EXTRA_HINT}") from None
    resource = Resource.create({"service.version": server_version()})
    if str(resource.attributes.get(SERVICE_NAME_KEY, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME_KEY: SERVICE_NAME}))
    # The sampler: the SDK's default (parentbased_always_on) unless OTEL_TRACES_SAMPLER names another.
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)  # closed by server/app/run.py
    described = []
    for name in names:
        exporter, where = _exporter(name, environ)
        provider.add_span_processor(BatchSpanProcessor(exporter))
        described.append(where)
    tracing = Tracing(provider.get_tracer("lstm-serve", server_version()), hash_stream_ids=hash_stream_ids)
    return TracingSetup(tracing, provider, "; ".join(described))


def _exporter(name: str, environ: Mapping[str, str]) -> tuple[Any, str]:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(), "console"
    protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "grpc").strip().lower()
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    try:
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        elif protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # type: ignore[no-redef]
        else:
            raise TracingConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL is {protocol!r}; this server sends OTLP as grpc "
                                     "or http/protobuf")
    except ImportError as exc:
        package = "opentelemetry-exporter-otlp-proto-" + ("grpc" if protocol == "grpc" else "http")
        raise TracingConfigError(f"OTLP over {protocol} needs {package} ({exc}): "
                                 + (_EXTRA_HINT if protocol == "grpc" else f"pip install {package}")) from None
    default = "http://localhost:4317" if protocol == "grpc" else "http://localhost:4318/v1/traces"
    return OTLPSpanExporter(), f"otlp {protocol} to {redact_url(endpoint or default)}"
