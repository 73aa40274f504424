"""The HTTP/REST port (--http-port): KServe v2 as Triton serves it, and the native API as JSON.

Built on aiohttp's web server (README, "HTTP/REST": chosen by measurement, bench/http_servers.py), in the
gRPC server's process and event loop, over the same servicers, so the same DataPlane, rules and statistics
answer both ports: each handler converts the HTTP request into the protobuf message a gRPC client would send
(server/api/kserve_json.py, server/api/native_json.py), calls the servicer's context-free method, and
converts the answer back. A sequence may alternate between gRPC and HTTP requests: it is one stream
(invariant 16, docs/invariants.md).

Every request passes through `edge` once: the one place where a request starts and ends. (With tracing on,
the inference handlers start their request's server span themselves, as the gRPC servicers do: the span's
children need the chunk.) It counts it in the metrics with protocol="http" and the
method's gRPC name, gates it on the drain (503 with Retry-After once the server refuses new work), checks
the API key (`Authorization: Bearer`, setting TENANT as the gRPC interceptor does; health stays open), and
maps every ServiceError once to an HTTP status and a JSON body `{"error": message, "code": "GRPC_CODE"}`
(Triton's error body, tritonclient.http reads "error") with `x-stream-offset` and `x-chunk-outcome`
headers where gRPC sends them as trailing metadata. Bodies are read whole under the size limit and the
request deadline, then converted, before the data plane sees anything: a refused body applies nothing.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from urllib.parse import unquote

import grpc
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from lstm_stream.triton import grpc_service_pb2 as pb_triton
from lstm_stream.v1 import stream_pb2 as pb
from server import metrics
from server.api.auth import TENANT, tenant_of_header
from server.api.interceptors import Drain
from server.api.kserve_json import (
    HEADER_LENGTH,
    infer_response_body,
    message_json,
    parse_index_request,
    parse_infer_request,
    parse_repository_request,
    repository_index_json,
)
from server.api.native import StreamInferenceServicer
from server.api.native_json import message_body, parse_message
from server.api.tracing import RequestTrace, Tracing
from server.api.triton import TritonServicer
from server.errors import (
    ServiceError,
    body_too_large,
    body_too_slow,
    body_unreadable,
    draining,
    internal_error,
    invalid_argument,
    method_not_allowed,
    no_such_path,
)
from server.security.tenants import Tenants

log = logging.getLogger(__name__)

PROTOCOL = "http"  # the metrics' protocol label
# Seconds a client that got 503 (draining, Redis unreachable) is told to wait before retrying.
RETRY_AFTER_S = 1
# The one table from gRPC codes to HTTP statuses (the native JSON API's errors, and KServe's).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}
# Health answers without a key and during the drain: load balancers and probes carry no keys.
_OPEN = frozenset({"ServerLive", "ServerReady"})
_STREAMS_PREFIX = "/v1/streams/"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Refused(Exception):
    """A ServiceError whose HTTP status is not its code's (413 for a body too large, 408 for a slow one)."""

    def __init__(self, error: ServiceError, status: int) -> None:
        super().__init__(error.message)
        self.error = error
        self.status = status


def error_response(error: ServiceError, status: int | None = None) -> web.Response:
    headers = dict(error.trailing_metadata())  # x-stream-offset, x-chunk-outcome
    if error.code is grpc.StatusCode.UNAVAILABLE:
        headers["Retry-After"] = str(RETRY_AFTER_S)
    if error.code is grpc.StatusCode.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = "Bearer"
    body: dict[str, object] = {"error": error.message, "code": error.code.name}
    if error.current_offset is not None:
        body["current_offset"] = error.current_offset
    return web.json_response(body, status=status or HTTP_STATUS.get(error.code, 500), headers=headers)


def _json(document: object) -> web.Response:
    return web.json_response(document)


class RestApi:
    """The routes and the edge of the HTTP port, over the gRPC port's servicers."""

    def __init__(self, triton: TritonServicer, native: StreamInferenceServicer, drain: Drain, tenants: Tenants | None,
                 ready: Callable[[], bool], *, body_limit: int, body_timeout_s: float,
                 tracing: Tracing | None = None) -> None:
        """`ready`: whether the server takes work (Redis answers, not shutting down), for /v2/health/ready;
        `tracing`: None with tracing off (server/api/tracing.py), else each inference request gets a server span."""
        self.tracing = tracing
        self.triton = triton
        self.native = native
        self.drain = drain
        self.tenants = tenants
        self.ready = ready
        self.body_limit = body_limit
        self.body_timeout_s = body_timeout_s

    def application(self) -> web.Application:
        # client_max_size: aiohttp stops reading a body past it (memory stays bounded) and raises 413.
        app = web.Application(middlewares=[self.edge], client_max_size=self.body_limit)
        add = app.router.add_route
        add("GET", "/v2/health/live", self.server_live, name="ServerLive")
        add("GET", "/v2/health/ready", self.server_ready, name="ServerReady")
        add("GET", "/v2", self.server_metadata, name="ServerMetadata")
        add("GET", "/v2/models/stats", self.model_statistics, name="ModelStatisticsAll")
        # aiohttp wants unique route names; the metrics count both spellings of a method as one.
        for model, suffix in (("/v2/models/{model}", ""), ("/v2/models/{model}/versions/{version}", "Version")):
            add("GET", model, self.model_metadata, name=f"ModelMetadata{suffix}")
            add("GET", f"{model}/config", self.model_config, name=f"ModelConfig{suffix}")
            add("GET", f"{model}/ready", self.model_ready, name=f"ModelReady{suffix}")
            add("GET", f"{model}/stats", self.model_statistics, name=f"ModelStatistics{suffix}")
            add("POST", f"{model}/infer", self.model_infer, name=f"ModelInfer{suffix}")
        # Triton's repository extension (with --model-repository; otherwise FAILED_PRECONDITION, 409).
        add("POST", "/v2/repository/index", self.repository_index, name="RepositoryIndex")
        add("POST", "/v2/repository/models/{model}/load", self.repository_load, name="RepositoryModelLoad")
        add("POST", "/v2/repository/models/{model}/unload", self.repository_unload, name="RepositoryModelUnload")
        add("GET", "/v1/model", self.get_model, name="GetModel")
        # A stream id may hold any UTF-8 (percent-encoded, "/" as %2F included): the path is parsed raw.
        add("*", _STREAMS_PREFIX + "{tail:.*}", self.stream, name="Stream")
        return app

    # --- the edge: once per request -----------------------------------------------------------------

    @web.middleware
    async def edge(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.name or "unknown"
        method = route.removesuffix("Version").removesuffix("All")
        gated = method not in _OPEN
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        in_flight = metrics.IN_FLIGHT_CALLS.labels(PROTOCOL)
        in_flight.inc()
        if gated:
            self.drain.enter()
        tenant_token = None
        try:
            if gated and self.drain.refusing:
                raise draining()
            if gated and self.tenants is not None:
                tenant_token = TENANT.set(tenant_of_header(request.headers.get("Authorization"), self.tenants))
            response = await handler(request)
        except ServiceError as exc:
            code = exc.code
            response = error_response(exc)
            if exc.code is grpc.StatusCode.UNAVAILABLE and self.drain.refusing:
                response.force_close()  # the client's next request opens a connection to another replica
        except _Refused as exc:
            code = exc.error.code
            response = error_response(exc.error, exc.status)
        except web.HTTPException as exc:  # aiohttp's own: no such path, method not allowed
            if exc.status == 405:
                error = method_not_allowed(request.method, request.path)
            elif exc.status == 404:
                error = no_such_path(request.method, request.path)
            else:
                error = invalid_argument("request", exc.reason)
            code = error.code
            response = error_response(error, exc.status)
        except asyncio.CancelledError:  # the client went away mid-request
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            log.exception("unexpected error in HTTP %s", method)
            error = internal_error(f"{type(exc).__name__}: {exc}")
            code = error.code
            response = error_response(error)
        finally:
            if tenant_token is not None:
                TENANT.reset(tenant_token)
            if gated:
                self.drain.leave()
            in_flight.dec()
            if method == "Stream":  # which of its three methods, once the path was parsed
                method = request.get("method", "unknown")
            metrics.REQUESTS.labels(PROTOCOL, method, code.name).inc()
            metrics.REQUEST_SECONDS.labels(PROTOCOL, method).observe(time.perf_counter() - started)
        return response

    async def _body(self, request: web.Request) -> bytes:
        """The whole body, within the size limit and the request deadline; nothing is converted before."""
        if request.content_length is not None and request.content_length > self.body_limit:
            raise _Refused(body_too_large(self.body_limit), 413)
        try:
            async with asyncio.timeout(self.body_timeout_s):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _Refused(body_too_large(self.body_limit), 413) from None
        except TimeoutError:
            raise _Refused(body_too_slow(self.body_timeout_s), 408) from None
        except (HttpProcessingError, OSError) as exc:  # a body cut short (ContentLengthError), a reset connection
            raise body_unreadable(f"could not be read whole ({type(exc).__name__}: {exc})") from None

    # --- KServe v2 / Triton ----------------------------------------------------------------------------

    async def server_live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def server_ready(self, request: web.Request) -> web.Response:
        # 503 while Redis does not answer or from SIGTERM on, as gRPC health reads NOT_SERVING.
        return web.Response(status=200 if self.ready() and not self.drain.stopping else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json(message_json(self.triton.server_metadata()))

    def _trace(self, request: web.Request, route: str) -> RequestTrace | None:
        """The server span of an inference request, continuing a `traceparent` header; None with tracing off."""
        if self.tracing is None:
            return None
        method, _, path = route.partition(" ")
        return self.tracing.request(request.headers, route, {"http.request.method": method, "http.route": path})

    @staticmethod
    def _model(request: web.Request) -> tuple[str, str]:
        return request.match_info["model"], request.match_info.get("version", "")

    async def model_metadata(self, request: web.Request) -> web.Response:
        return _json(message_json(self.triton.model_metadata(*self._model(request))))

    async def model_config(self, request: web.Request) -> web.Response:
        return _json(message_json(self.triton.model_config(*self._model(request)).config))

    async def model_ready(self, request: web.Request) -> web.Response:
        # Triton's HTTP answer: 200 when ready, 400 otherwise (an unknown model too), no body.
        return web.Response(status=200 if self.triton.model_ready(*self._model(request)) else 400)

    async def model_statistics(self, request: web.Request) -> web.Response:
        name, version = request.match_info.get("model", ""), request.match_info.get("version", "")
        return _json(message_json(self.triton.model_statistics(name, version, TENANT.get())))

    async def model_infer(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        infer = parse_infer_request(body, request.headers.get(HEADER_LENGTH), *self._model(request))
        trace = self._trace(request, "POST /v2/models/{model}/infer")
        answer = await self.triton.infer(infer.message, TENANT.get(), trace=trace)
        payload, header_length = infer_response_body(answer, infer)
        if header_length is None:
            return web.Response(body=payload, content_type="application/json")
        return web.Response(body=payload, content_type="application/octet-stream",
                            headers={HEADER_LENGTH: str(header_length)})

    async def repository_index(self, request: web.Request) -> web.Response:
        ready_only = parse_index_request(await self._body(request))
        return _json(repository_index_json(self.triton.repository_index(ready_only)))

    async def repository_load(self, request: web.Request) -> web.Response:
        load = pb_triton.RepositoryModelLoadRequest(model_name=request.match_info["model"])
        await self.triton.repository_load(parse_repository_request(await self._body(request), load))
        return web.Response(status=200)  # Triton answers a load or unload with an empty 200

    async def repository_unload(self, request: web.Request) -> web.Response:
        unload = pb_triton.RepositoryModelUnloadRequest(model_name=request.match_info["model"])
        await self.triton.repository_unload(parse_repository_request(await self._body(request), unload))
        return web.Response(status=200)

    # --- the native API as JSON ---------------------------------------------------------------------

    async def get_model(self, request: web.Request) -> web.Response:
        version = request.query.get("version", "0")
        if not version.isascii() or not version.isdigit():
            raise invalid_argument("version", f"is {version[:40]!r}; expected a version number (0: the newest)")
        model = self.native.model_info(pb.GetModelRequest(name=request.query.get("model", ""), version=int(version)))
        return web.Response(body=message_body(model), content_type="application/json")

    async def stream(self, request: web.Request) -> web.Response:
        """/v1/streams/{stream_id} (GET: StreamInfo) and /v1/streams/{stream_id}:predict or :reset (POST)."""
        segment = request.raw_path.split("?", 1)[0][len(_STREAMS_PREFIX):]
        verb = ""
        if request.method == "POST" and ":" in segment:
            segment, verb = segment.rsplit(":", 1)
        actions = {("POST", "predict"): "Predict", ("POST", "reset"): "ResetStream", ("GET", ""): "GetStream"}
        if "/" in segment or not segment or (request.method, verb) not in actions:
            if request.method not in ("GET", "POST"):
                raise _Refused(method_not_allowed(request.method, request.path), 405)
            raise no_such_path(request.method, request.path)
        request["method"] = actions[request.method, verb]  # the metrics' method label
        try:
            stream_id = unquote(segment, errors="strict")
        except UnicodeDecodeError:
            raise invalid_argument("stream_id", "is not UTF-8 once percent-decoded") from None
        tenant = TENANT.get()
        if verb == "predict":
            predict = parse_message(await self._body(request), pb.PredictRequest, {"stream_id": stream_id})
            trace = self._trace(request, "POST /v1/streams/{stream_id}:predict")
            answer = await self.native.predict(predict, tenant, trace=trace)
            return web.Response(body=message_body(answer), content_type="application/json")
        if verb == "reset":
            reset = parse_message(await self._body(request), pb.ResetStreamRequest, {"stream_id": stream_id})
            answer = await self.native.reset_stream(reset, tenant)
            return web.Response(body=message_body(answer), content_type="application/json")
        info = await self.native.get_stream(
            pb.GetStreamRequest(stream_id=stream_id, model=request.query.get("model", "")), tenant)
        return web.Response(body=message_body(info), content_type="application/json")


async def start_rest(api: RestApi, host: str, port: int, ssl_context: ssl.SSLContext | None, *,
                     shared_port: bool, shutdown_timeout_s: float, idle_s: float) -> web.AppRunner:
    """Serve `api` on host:port in the running loop; `shared_port`: the workers of --workers share it
    (SO_REUSEPORT, as the gRPC port). Raises OSError when the port is taken.

    `idle_s` bounds slow and silent clients: aiohttp's keep-alive timer starts when a connection opens and
    after each answer, and bytes of a request that is not yet whole do not restart it, so a connection that
    sends nothing, or sends its headers slowly (slowloris), is closed `idle_s` after it opened or was last
    answered, as gRPC closes a connection with no call open (a half-sent HTTP/2 HEADERS frame is no call
    either). aiohttp caps a header line and a field at 8,190 bytes (its max_line_size and max_field_size),
    so what such a connection holds meanwhile is bounded too; a body is bounded by the request deadline."""
    runner = web.AppRunner(api.application(), access_log=None, handle_signals=False, keepalive_timeout=idle_s)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_port=shared_port or None,
                       shutdown_timeout=shutdown_timeout_s)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port the HTTP site listens on (the configured one)."""
    for address in runner.addresses:
        return int(address[1])
    return 0

