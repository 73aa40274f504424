"""Wiring: configuration, Redis, the model, the data plane and the gRPC server, and a clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import subprocess
import sys
import time

from server.config import ServerConfig, load_config
from server.logs import configure_logging
from server.redact import redact_url
from server.state.launcher import RedisUnavailable, ensure_redis, stop_private_redis

log = logging.getLogger("server")


class StartupError(Exception):
    """The server cannot start as configured; the message says what to change."""


WORKER_ENV = "LSTM_SERVE_WORKER"  # "index/count", set by the supervisor for each worker process
HEALTH_POLL_S = 1.0
SHUTDOWN_GRACE_S = 5.0


async def serve(config: ServerConfig, worker_of: tuple[int, int] | None = None) -> None:
    # Imported here: TensorFlow takes seconds to import, and `lstm-serve --help` should not wait for it.
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1._async import HealthServicer
    from grpc_reflection.v1alpha import reflection

    from lstm_stream.v1 import stream_pb2, stream_pb2_grpc
    from server.api.native import StreamInferenceServicer
    from server.api.streaming import StreamWindow
    from server.api.triton import add_triton_service
    from server.api.wire import add_servicer
    from server.dataplane import DataPlane
    from server.model.runner import ModelRunner
    from server.processor import StreamPolicy
    from server.state.store import StateStore

    runner = ModelRunner(
        config.model, max_chunk_timesteps=config.max_chunk_timesteps, xla=config.xla, max_batch=config.max_batch
    )
    if config.identity_model:
        from server.model.identity import IdentityRunner

        runner = IdentityRunner(runner.description, config.max_chunk_timesteps)  # type: ignore[assignment]
    runner.warm_up(config.warmup_lengths())
    model = runner.description
    log.info(
        "model loaded",
        extra={"fields": {"model": config.model, "name": model.name, "fingerprint": model.fingerprint,
                          "input_features": model.input_features, "output_size": model.output_size,
                          "state_size": model.state_size, "per_timestep_outputs": model.per_timestep_outputs}},
    )
    store = StateStore(config.redis_url, config.key_prefix)
    policy = StreamPolicy(
        state_ttl_ms=int(config.state_ttl_s * 1000),
        ended_ttl_ms=int(config.ended_ttl_s * 1000),
        reset_on_model_change=config.reset_on_model_change,
    )
    dataplane = DataPlane(
        runner, store, policy,
        max_batch=config.max_batch, max_delay_s=config.max_delay_ms / 1000, max_in_flight=config.max_in_flight,
        max_queued=config.max_queued_chunks,
    )
    dataplane.start()

    # Invariant 12 (docs/invariants.md): no message larger than the largest valid chunk (plus headroom),
    # a bounded number of calls at once; past either grpc answers RESOURCE_EXHAUSTED for that call only.
    receive_limit, send_limit = config.message_limits(model.input_features, model.output_size)
    server = grpc.aio.server(
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", receive_limit),
            ("grpc.max_send_message_length", send_limit),
            # Off by default: with it, grpc grows each stream's HTTP/2 receive window to the measured
            # bandwidth-delay product, so a client could push many MiB the server never asked for.
            ("grpc.http2.bdp_probe", 1 if config.http2_bdp_probe else 0),
            # Workers share one port; a lone server must fail loudly if the port is taken.
            ("grpc.so_reuseport", 1 if worker_of is not None else 0),
        ]
    )
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    window = StreamWindow(config.stream_window, config.stream_window_bytes)
    # Malformed bytes get INVALID_ARGUMENT rather than grpc's UNKNOWN (server/api/wire.py).
    native = StreamInferenceServicer(dataplane, window)
    add_servicer(stream_pb2_grpc.add_StreamInferenceServicer_to_server, native, server)
    # The Triton / KServe v2 protocol on the same port, over the same data plane.
    triton_service = add_triton_service(
        server, dataplane, window,
        max_batch_size=config.max_batch, max_queue_delay_us=int(config.max_delay_ms * 1000),
        sequence_idle_us=int(config.state_ttl_s * 1_000_000),
    )
    inference_services = [stream_pb2.DESCRIPTOR.services_by_name["StreamInference"].full_name, triton_service]
    reflection.enable_server_reflection(
        [*inference_services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    try:
        port = server.add_insecure_port(config.address)
    except RuntimeError as exc:  # grpc raises this when the address is taken or invalid
        raise StartupError(f"cannot listen on {config.address}: {exc}; is another server running there?") from exc
    await server.start()
    # TensorFlow leaves hundreds of thousands of objects behind at start-up; a full garbage collection
    # walks them all (pauses of 100-200 ms under load). Freezing them takes them out of every collection.
    gc.collect()
    gc.freeze()
    if config.metrics_port:
        from server.metrics import serve_metrics

        # Each worker is its own process with its own counters, so each gets its own port.
        metrics_port = config.metrics_port + (worker_of[0] if worker_of else 0)
        try:
            serve_metrics(metrics_port, config.host)
        except OSError as exc:
            raise StartupError(f"cannot serve metrics on {config.host}:{metrics_port}: {exc}; "
                               "choose another --metrics-port, or 0 to turn metrics off") from exc
    log.info("serving", extra={"fields": {"address": f"{config.host}:{port}", "port": port,
                                          "redis": redact_url(config.redis_url),
                                          "worker": "/".join(map(str, worker_of)) if worker_of else None}})

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    async def track_redis() -> None:
        # Health follows Redis: a load balancer should stop sending chunks to a replica that cannot save them.
        last = None
        while True:
            try:
                up = await store.ping()
            except Exception:
                up = False
            if up != last:
                status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
                for name in ("", *inference_services):
                    await health.set(name, status)
                if last is not None:
                    log.warning("redis %s", "reachable again" if up else "unreachable")
                last = up
            await asyncio.sleep(HEALTH_POLL_S)

    tracker = asyncio.create_task(track_redis())
    await stopping.wait()
    log.info("shutting down")
    tracker.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await tracker
    await health.enter_graceful_shutdown()
    await server.stop(SHUTDOWN_GRACE_S)
    await dataplane.stop()


def run_workers(config: ServerConfig, argv: list[str]) -> int:
    """Start `workers` server processes on the shared port and supervise them.

    Python serves gRPC on one core (the GIL); processes sharing the port with SO_REUSEPORT use the
    others. They share nothing but Redis, which is all a stream's state needs. A worker that dies is
    started again; SIGTERM or SIGINT stops them all.
    """
    command = [sys.executable, "-m", "server", *argv]
    stopping = False

    def start(index: int) -> subprocess.Popen:
        env = {**os.environ, WORKER_ENV: f"{index}/{config.workers}", "LSTM_SERVE_REDIS_AUTOSTART": "false"}
        return subprocess.Popen(command, env=env)

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for process in workers:
            if process.poll() is None:
                process.send_signal(signum)

    workers = [start(index) for index in range(config.workers)]
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("started workers", extra={"fields": {"workers": config.workers, "pids": [p.pid for p in workers]}})
    while not stopping:
        for index, process in enumerate(workers):
            code = process.poll()
            if code is not None and not stopping:
                if code == 2:  # a configuration error: every restart would fail the same way
                    stop(signal.SIGTERM, None)
                    break
                log.warning("worker %d exited with %s; starting it again", index, code)
                workers[index] = start(index)
        time.sleep(0.2)
    codes = [process.wait() for process in workers]
    return max(codes, default=0)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    config = load_config(argv)
    configure_logging(config.log_level, config.log_format)
    worker_env = os.environ.get(WORKER_ENV)
    redis_process = None
    if worker_env is None:
        try:
            redis_process = ensure_redis(config.redis_url, config.redis_data_dir, config.redis_autostart)
        except RedisUnavailable as exc:
            log.error("no Redis: %s", exc)
            sys.exit(2)
    try:
        if config.workers > 1 and worker_env is None:
            sys.exit(run_workers(config, argv))
        from server.model.runner import ModelLoadError

        worker_of = tuple(int(part) for part in worker_env.split("/")) if worker_env else None
        try:
            asyncio.run(serve(config, worker_of))  # type: ignore[arg-type]
        except ModelLoadError as exc:
            log.error("cannot serve this model: %s", exc)
            sys.exit(2)
        except StartupError as exc:
            log.error("%s", exc)
            sys.exit(2)
    finally:
        stop_private_redis(redis_process)


if __name__ == "__main__":
    main()
