"""Wiring: configuration, Redis, the model, the data plane and the gRPC server, and a clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from server.config import ServerConfig, load_config
from server.logs import configure_logging
from server.state.launcher import RedisUnavailable, ensure_redis, stop_private_redis

log = logging.getLogger("server")

HEALTH_POLL_S = 1.0
SHUTDOWN_GRACE_S = 5.0


async def serve(config: ServerConfig, ready: asyncio.Event | None = None) -> None:
    # Imported here: TensorFlow takes seconds to import, and `lstm-serve --help` should not wait for it.
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1._async import HealthServicer
    from grpc_reflection.v1alpha import reflection

    from lstm_stream.v1 import stream_pb2
    from server.api.native import StreamInferenceServicer
    from server.dataplane import DataPlane
    from server.model.runner import ModelRunner
    from server.processor import StreamPolicy
    from server.state.store import StateStore

    runner = ModelRunner(config.model, max_chunk_timesteps=config.max_chunk_timesteps)
    runner.warm_up()
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
    dataplane = DataPlane(runner, store, policy, max_batch=config.max_batch, max_delay_s=config.max_delay_ms / 1000)
    dataplane.start()

    message_limit = 64 * 1024 * 1024
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", message_limit), ("grpc.max_send_message_length", message_limit)]
    )
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    from lstm_stream.v1 import stream_pb2_grpc

    stream_pb2_grpc.add_StreamInferenceServicer_to_server(StreamInferenceServicer(dataplane), server)
    service_names = [
        stream_pb2.DESCRIPTOR.services_by_name["StreamInference"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    ]
    reflection.enable_server_reflection(service_names, server)
    port = server.add_insecure_port(config.address)
    if port == 0:
        raise OSError(f"could not listen on {config.address}")
    await server.start()
    log.info("serving", extra={"fields": {"address": f"{config.host}:{port}", "port": port, "redis": config.redis_url}})

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    if ready is not None:
        ready.set()

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
                for name in ("", *service_names[:1]):
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


def main(argv: list[str] | None = None) -> None:
    config = load_config(argv)
    configure_logging(config.log_level, config.log_format)
    try:
        redis_process = ensure_redis(config.redis_url, config.redis_data_dir, config.redis_autostart)
    except RedisUnavailable as exc:
        log.error("no Redis: %s", exc)
        sys.exit(2)
    try:
        from server.model.runner import ModelLoadError

        try:
            asyncio.run(serve(config))
        except ModelLoadError as exc:
            log.error("cannot serve this model: %s", exc)
            sys.exit(2)
    finally:
        stop_private_redis(redis_process)


if __name__ == "__main__":
    main()
