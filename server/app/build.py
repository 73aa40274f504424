"""Building the server from its configuration: the model, Redis, the data plane and the gRPC services.

Nothing here serves yet: `build_server` returns a server whose port is bound but not started, so a
bad key file, a model that cannot be served or a taken port fails start-up before any caller sees
the server (server/app/run.py starts it and runs it until signalled).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

# Imported here, not by server/app/main.py: TensorFlow takes seconds to import, and `lstm-serve --help` and
# the supervisor of --workers should not wait for it.
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from lstm_stream.v1 import stream_pb2, stream_pb2_grpc
from server import metrics
from server.api.batch_convert import BatchLimits
from server.api.interceptors import Drain, EdgeInterceptor
from server.api.malformed import add_servicer
from server.api.native import StreamInferenceServicer
from server.api.rest import RestApi
from server.api.security import Security
from server.api.streaming import StreamWindow
from server.api.triton import TritonServicer, add_triton_service
from server.app.models import RepositoryModels, load_runner
from server.app.redis_health import RedisHealth
from server.app.tracing import TracingSetup, start_tracing
from server.config import ServerConfig
from server.dataplane.plane import DataPlane
from server.dataplane.processor import StreamPolicy
from server.errors import StartupError
from server.security.limits import ChunkRate
from server.security.tenants import Tenants
from server.state.cache import SavedSlots
from server.state.connection import RedisTopology
from server.state.formats import RecordFormat
from server.state.live import LiveStreams
from server.state.registry import VersionRegistry
from server.state.routing import WaitPolicy
from server.state.store import StateStore
from server.types import Runner

log = logging.getLogger("server")


@dataclass(frozen=True, slots=True)
class BuiltServer:
    """Everything `run_until_signalled` starts, watches and stops."""

    server: grpc.aio.Server
    port: int  # the bound port (the configured one, or the one picked for port 0)
    dataplane: DataPlane
    health: HealthServicer
    redis_health: RedisHealth
    drain: Drain
    security: Security
    redis_mode: str
    repository: RepositoryModels | None = None  # with --model-repository: polls it until stopped
    rest: RestApi | None = None  # the HTTP/REST port's routes (--http-port; None: off), started by run.py
    tracing: TracingSetup | None = None  # with OTEL_TRACES_EXPORTER set: flushed at shutdown


async def build_server(config: ServerConfig, worker_of: tuple[int, int] | None) -> BuiltServer:
    # Before the model loads (seconds): a bad key file or certificate should fail at once.
    security = Security(config)
    # Stream ids stay out of traces when tenants are on: each span names a hash of tenant and id instead.
    tracing = start_tracing(hash_stream_ids=security.tenants is not None)
    edge_tracing = tracing.tracing if tracing is not None else None
    # The message limits fit the models loaded at start-up; a model loaded later must fit them too.
    single = None if config.model_repository else _load_model(config)
    topology = RedisTopology.from_config(config)
    store = StateStore(
        topology, config.key_prefix, wait=WaitPolicy(config.redis_wait_replicas, config.redis_wait_timeout_ms),
        saved_slots=SavedSlots(config.slot_memory_bytes, config.slot_memory_roaming_s)
        if config.slot_memory_bytes > 0 else None,
    )
    record_format = RecordFormat(store.client, config.key_prefix)
    await record_format.settle()  # before the first save: which format this deployment writes
    dataplane = _data_plane(config, store, security.tenants, record_format)
    repository = None
    if single is not None:
        # --model FILE: version 1 of a model named as Keras names it, with the keys of a server without a
        # repository (its streams are the ones an earlier release kept).
        dataplane.add_model(single.description.name, single, 1, namespace="")
    else:
        repository = RepositoryModels(config, VersionRegistry(store.client, config.key_prefix))
        await repository.load_initial(dataplane)
        dataplane.control = repository
    dataplane.start()

    # Invariant 12 (docs/invariants.md): no message larger than the largest valid chunk (plus headroom),
    # a bounded number of calls at once; past either grpc answers RESOURCE_EXHAUSTED for that call only.
    shapes = [(m.input_features, m.output_size) for m in map(dataplane.served, dataplane.model_names())]
    receive_limit, send_limit = config.message_limits(max(f for f, _ in shapes), max(o for _, o in shapes))
    if repository is not None:
        repository.set_fits(lambda features, outputs: _fits(config, (receive_limit, send_limit), features, outputs))
        repository.start()
    drain = Drain()
    server = grpc.aio.server(
        # First: counts every call, the drain's refusals included.
        interceptors=[EdgeInterceptor(drain), *security.interceptors()],  # then API keys, with keys on
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", receive_limit),
            ("grpc.max_send_message_length", send_limit),
            # Off by default: with it, grpc grows each stream's HTTP/2 receive window to the measured
            # bandwidth-delay product, so a client could push many MiB the server never asked for.
            ("grpc.http2.bdp_probe", 1 if config.http2_bdp_probe else 0),
            # Workers share one port; a lone server must fail loudly if the port is taken.
            ("grpc.so_reuseport", 1 if worker_of is not None else 0),
            # A connection with no call open (one that sent only the HTTP/2 preface, or a client gone quiet)
            # gets GOAWAY and is closed after this long, so idle connections cannot pile up until the
            # descriptors run out; an open call, however quiet, keeps its connection.
            *([("grpc.max_connection_idle_ms", config.max_connection_idle_ms)]
              if config.max_connection_idle_s else []),
        ]
    )
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    window = StreamWindow(config.stream_window, config.stream_window_bytes)
    # Malformed bytes get INVALID_ARGUMENT rather than grpc's UNKNOWN (server/api/malformed.py).
    batch_limits = BatchLimits(config.max_batch_chunks, config.max_batch_timesteps)
    native = StreamInferenceServicer(dataplane, window, batch_limits, edge_tracing)
    add_servicer(stream_pb2_grpc.add_StreamInferenceServicer_to_server, native, server)
    # The Triton / KServe v2 protocol on the same port, over the same data plane.
    triton = TritonServicer(
        dataplane, window,
        max_batch_size=config.max_batch, max_queue_delay_us=config.max_delay_us,
        sequence_idle_us=config.state_ttl_us, tracing=edge_tracing,
    )
    triton_service = add_triton_service(server, triton)
    inference_services = [stream_pb2.DESCRIPTOR.services_by_name["StreamInference"].full_name, triton_service]
    reflection.enable_server_reflection(
        [*inference_services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    try:
        port = security.add_port(server, config.address)
    except RuntimeError as exc:  # grpc raises this when the address is taken or invalid
        raise StartupError(f"cannot listen on {config.address}: {exc}; is another server running there?") from exc
    redis_health = RedisHealth(dataplane.store, health, inference_services)
    # The HTTP/REST port over the same servicers (their rules, their statistics), the same drain and keys.
    rest = RestApi(
        triton, native, drain, security.tenants, lambda: redis_health.up,
        body_limit=config.http_body_limit(max(f for f, _ in shapes)), body_timeout_s=config.request_deadline_s,
        tracing=edge_tracing,
    ) if config.http_port else None
    return BuiltServer(server, port, dataplane, health, redis_health, drain, security, topology.mode, repository, rest,
                       tracing)


def _fits(config: ServerConfig, limits: tuple[int, int], features: int, outputs: int) -> str | None:
    """Why a model loaded after start-up cannot be served within the message limits set at start-up, if so."""
    needed = config.message_limits(features, outputs)
    if needed[0] > limits[0] or needed[1] > limits[1]:
        return (f"its largest valid message ({max(needed)} bytes) is larger than this server's limit "
                f"({max(limits)} bytes, set at start-up for the models loaded then); restart the server, or set "
                "--max-message-bytes")
    return None


def _data_plane(config: ServerConfig, store: StateStore, tenants: Tenants | None,
                record_format: RecordFormat) -> DataPlane:
    policy = StreamPolicy.from_config(config)
    return DataPlane(
        store, policy,
        max_batch=config.max_batch, max_delay_s=config.max_delay_s, max_in_flight=config.max_in_flight,
        max_queued=config.max_queued_chunks, max_chunk_timesteps=config.max_chunk_timesteps,
        busy_delay_s=config.busy_delay_s,
        # Per-tenant limits (invariants 12 and 13), only with API keys.
        chunk_rate=ChunkRate(tenants.limits) if tenants else None,
        live=LiveStreams(store, policy.state_ttl_ms, lambda tenant: tenants.limits(tenant).max_streams)
        if tenants else None,
        record_format=record_format,
        live_streams_interval_s=config.live_streams_interval_s,
    )


def _load_model(config: ServerConfig) -> Runner:
    """The model of --model FILE, warm (its calls for the configured chunk lengths compiled), described in the log."""
    runner = load_runner(config, config.model)
    model = runner.description
    metrics.MODEL.info({"name": model.name, "fingerprint": model.fingerprint,
                        "input_features": str(model.input_features), "output_size": str(model.output_size),
                        "state_size": str(model.state_size),
                        "per_timestep_outputs": str(model.per_timestep_outputs).lower(),
                        "max_chunk_timesteps": str(config.max_chunk_timesteps)})
    log.info(
        "model loaded",
        extra={"fields": {"model": config.model, "name": model.name, "fingerprint": model.fingerprint,
                          "input_features": model.input_features, "output_size": model.output_size,
                          "state_size": model.state_size, "per_timestep_outputs": model.per_timestep_outputs}},
    )
    return runner
