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
import threading
import time
from dataclasses import dataclass

from server.config import ServerConfig, load_config
from server.logs import carry_native_stderr, configure_logging
from server.redact import redact_url
from server.state.connection import TopologyError
from server.state.launcher import RedisUnavailable, check_redis, stop_private_redis

log = logging.getLogger("server")


class StartupError(Exception):
    """The server cannot start as configured; the message says what to change."""


WORKER_ENV = "LSTM_SERVE_WORKER"  # "index/count", set by the supervisor for each worker process
SUPERVISOR_ENV = "LSTM_SERVE_SUPERVISOR_PID"  # a worker exits when this process is gone
HEALTH_POLL_S = 1.0
# Left at the end of the grace for closing the port and stopping the data plane.
STOP_MARGIN_S = 1.0
# A crash-looping worker is restarted after 0.5, 1, 2, 4 ... s, at most 30 s apart; a worker that ran
# this long counts as stable, and its next crash starts the series again.
RESTART_FIRST_DELAY_S = 0.5
RESTART_MAX_DELAY_S = 30.0
RESTART_STABLE_AFTER_S = 60.0
SUPERVISOR_POLL_S = 0.1


class _StopBeforeServing(BaseException):
    """SIGTERM or SIGINT arrived while the model was still loading: stop, nothing to drain."""


async def serve(config: ServerConfig, worker_of: tuple[int, int] | None = None) -> None:
    # Imported here: TensorFlow takes seconds to import, and `lstm-serve --help` should not wait for it.
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1._async import HealthServicer
    from grpc_reflection.v1alpha import reflection

    from lstm_stream.v1 import stream_pb2, stream_pb2_grpc
    from server import metrics
    from server.api.interceptors import Drain, EdgeInterceptor
    from server.api.native import StreamInferenceServicer
    from server.api.security import Security, SecurityConfigError
    from server.api.streaming import StreamWindow
    from server.api.triton import add_triton_service
    from server.api.wire import add_servicer
    from server.dataplane import DataPlane
    from server.model.runner import ModelRunner
    from server.processor import StreamPolicy
    from server.state.connection import RedisTopology
    from server.state.live import LiveStreams
    from server.state.routing import WaitPolicy
    from server.state.store import StateStore
    from server.tenants import ChunkRate

    # Before the model loads (seconds): a bad key file or certificate should fail at once.
    try:
        security = Security(config)
    except SecurityConfigError as exc:
        raise StartupError(str(exc)) from None

    runner = ModelRunner(
        config.model, max_chunk_timesteps=config.max_chunk_timesteps, xla=config.xla, max_batch=config.max_batch
    )
    if config.identity_model:
        from server.model.identity import IdentityRunner

        runner = IdentityRunner(runner.description, config.max_chunk_timesteps)  # type: ignore[assignment]
    runner.warm_up(config.warmup_lengths())
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
    store = StateStore(
        RedisTopology.from_config(config), config.key_prefix,
        wait=WaitPolicy(config.redis_wait_replicas, config.redis_wait_timeout_ms),
    )
    policy = StreamPolicy(
        state_ttl_ms=int(config.state_ttl_s * 1000),
        ended_ttl_ms=int(config.ended_ttl_s * 1000),
        reset_on_model_change=config.reset_on_model_change,
        request_deadline_s=config.request_deadline_s,
    )
    tenants = security.tenants
    dataplane = DataPlane(
        runner, store, policy,
        max_batch=config.max_batch, max_delay_s=config.max_delay_ms / 1000, max_in_flight=config.max_in_flight,
        max_queued=config.max_queued_chunks,
        # Per-tenant limits (invariants 12 and 13), only with API keys.
        chunk_rate=ChunkRate(tenants.limits) if tenants else None,
        live=LiveStreams(store, policy.state_ttl_ms, lambda tenant: tenants.limits(tenant).max_streams)
        if tenants else None,
    )
    dataplane.start()

    # Invariant 12 (docs/invariants.md): no message larger than the largest valid chunk (plus headroom),
    # a bounded number of calls at once; past either grpc answers RESOURCE_EXHAUSTED for that call only.
    receive_limit, send_limit = config.message_limits(model.input_features, model.output_size)
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
        port = security.add_port(server, config.address)
    except RuntimeError as exc:  # grpc raises this when the address is taken or invalid
        raise StartupError(f"cannot listen on {config.address}: {exc}; is another server running there?") from exc
    redis_up: list[bool] = []  # the last answer, once there is one

    async def check_redis() -> None:
        # Health follows Redis: a load balancer should stop sending chunks to a replica that cannot save them.
        started = time.perf_counter()
        try:
            up = await store.ping()
            metrics.REDIS_PING_SECONDS.observe(time.perf_counter() - started)
        except Exception:
            up = False
        metrics.REDIS_UP.set(1 if up else 0)
        metrics.READY.set(1 if up else 0)
        if redis_up and redis_up[-1] == up:
            return
        status = health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *inference_services):
            await health.set(name, status)
        if redis_up:
            log.warning("redis %s", "reachable again" if up else "unreachable")
        redis_up[:] = [up]

    async def track_redis() -> None:
        while True:
            await asyncio.sleep(HEALTH_POLL_S)
            await check_redis()

    # Every service name has its status before the port opens: no caller sees SERVING (the health
    # servicer's default for "") or NOT_FOUND before the first answer from Redis.
    await check_redis()
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
            serve_metrics(metrics_port, config.metrics_host)
        except OSError as exc:
            raise StartupError(f"cannot serve metrics on {config.metrics_host}:{metrics_port}: {exc}; "
                               "choose another --metrics-port, or 0 to turn metrics off") from exc
    log.info("serving", extra={"fields": {"address": f"{config.host}:{port}", "port": port,
                                          "redis": redact_url(config.redis_url),
                                          "redis_mode": RedisTopology.from_config(config).mode, **security.describe(),
                                          "worker": "/".join(map(str, worker_of)) if worker_of else None}})

    stopping = asyncio.Event()
    hurry = asyncio.Event()  # a second signal: skip what is left of the drain delay
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        (hurry if stopping.is_set() else stopping).set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    security_watch = security.start()  # SIGHUP and file changes re-read keys and certificates

    tracker = asyncio.create_task(track_redis())
    await stopping.wait()
    if security_watch:
        security_watch.cancel()
    await _drain(config, server, health, drain, tracker, hurry)
    await dataplane.stop()


async def _drain(config: ServerConfig, server, health, drain, tracker: asyncio.Task, hurry: asyncio.Event) -> None:
    """SIGTERM: tell the load balancer (health NOT_SERVING, port still open), keep serving for the drain
    delay while it takes this replica out, then refuse new calls (UNAVAILABLE, retryable), let accepted
    chunks finish and be answered, end open streams UNAVAILABLE, and close the port, all within the grace.
    """
    from server import metrics

    loop = asyncio.get_running_loop()
    deadline = loop.time() + config.shutdown_grace_s
    await health.enter_graceful_shutdown()  # every service name at once, and later sets are ignored
    metrics.READY.set(0)
    log.info("draining: health is NOT_SERVING; still serving while load balancers take this replica out",
             extra={"fields": {"drain_delay_s": config.drain_delay_s, "shutdown_grace_s": config.shutdown_grace_s}})
    tracker.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await tracker
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(hurry.wait(), config.drain_delay_s)
    drain.refuse()
    log.info("refusing new calls; finishing accepted chunks and ending open streams",
             extra={"fields": {"calls_in_flight": drain.calls}})
    if not await drain.wait_idle(deadline - loop.time() - STOP_MARGIN_S):
        log.warning("the shutdown grace ran out; cancelling the calls still running",
                    extra={"fields": {"calls_in_flight": drain.calls, "shutdown_grace_s": config.shutdown_grace_s}})
    await server.stop(max(0.0, min(STOP_MARGIN_S, deadline - loop.time())))


def run_workers(config: ServerConfig, argv: list[str]) -> int:
    """Start `workers` server processes on the shared port and supervise them.

    Python serves gRPC on one core (the GIL); processes sharing the port with SO_REUSEPORT use the
    others. They share nothing but Redis, which is all a stream's state needs. A worker that dies is
    started again, after a delay that doubles while it keeps crashing (RESTART_*). SIGTERM or SIGINT is
    passed on to every worker, which drains as a single server does; each worker exits by itself when
    the supervisor dies (`_exit_with_supervisor`), so a SIGKILLed supervisor leaves no orphans serving.
    """
    command = [sys.executable, "-m", "server", *argv]
    stopping: list[int] = []  # the signal that stops the workers, once one came

    @dataclass
    class Worker:
        process: subprocess.Popen
        started: float
        crashes: int = 0  # consecutive crashes without a stable run between them
        restart_at: float | None = None

    def start(index: int) -> subprocess.Popen:
        env = {**os.environ, WORKER_ENV: f"{index}/{config.workers}", SUPERVISOR_ENV: str(os.getpid()),
               "LSTM_SERVE_REDIS_AUTOSTART": "false"}
        return subprocess.Popen(command, env=env)

    def stop(signum: int, _frame: object) -> None:
        if not stopping:
            stopping.append(signum)
            for worker in workers:
                if worker.process.poll() is None:
                    worker.process.send_signal(signum)

    def forward(signum: int, _frame: object) -> None:
        for worker in workers:
            if worker.restart_at is None and worker.process.poll() is None:
                worker.process.send_signal(signum)

    workers = [Worker(start(index), time.monotonic()) for index in range(config.workers)]
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, forward)  # each worker re-reads its keys and certificates
    log.info("started workers", extra={"fields": {"workers": config.workers,
                                                  "pids": [w.process.pid for w in workers]}})
    while not stopping:
        now = time.monotonic()
        for index, worker in enumerate(workers):
            if worker.restart_at is not None:
                if now >= worker.restart_at:
                    worker.process, worker.started, worker.restart_at = start(index), now, None
                    log.info("worker started again", extra={"fields": {"worker": index, "pid": worker.process.pid}})
                continue
            code = worker.process.poll()
            if code is None:
                continue
            if code == 2:  # a configuration error: every restart would fail the same way
                log.error("worker %d exited with 2 (a start-up error, see above); stopping", index)
                stop(signal.SIGTERM, None)
                break
            worker.crashes = 1 if now - worker.started >= RESTART_STABLE_AFTER_S else worker.crashes + 1
            delay = min(RESTART_MAX_DELAY_S, RESTART_FIRST_DELAY_S * 2 ** (worker.crashes - 1))
            worker.restart_at = now + delay
            log.warning("worker exited; starting it again after a delay", extra={"fields": {
                "worker": index, "pid": worker.process.pid, "exit_code": code, "delay_s": delay,
                "crashes": worker.crashes}})
        time.sleep(SUPERVISOR_POLL_S)
    # Each worker drains within the grace; a little more before the ones still running are killed.
    deadline = time.monotonic() + config.shutdown_grace_s + 5.0
    codes = []
    for worker in workers:
        try:
            codes.append(worker.process.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            log.warning("worker %d did not stop within the grace; killing it", worker.process.pid)
            worker.process.kill()
            codes.append(worker.process.wait())
    log.info("workers stopped", extra={"fields": {"exit_codes": codes}})
    return max((code for code in codes if code is not None and code > 0), default=0)


def _exit_with_supervisor(supervisor_pid: int) -> None:
    """A worker must not outlive its supervisor (it would serve on, unsupervised). On Linux the kernel
    sends SIGTERM when the parent dies (PR_SET_PDEATHSIG), so the worker drains and exits; a watcher
    thread covers other systems and a supervisor that died before prctl was called."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)

    def watch() -> None:
        while os.getppid() == supervisor_pid:
            time.sleep(1.0)
        log.warning("the supervisor is gone; stopping this worker",
                    extra={"fields": {"supervisor_pid": supervisor_pid}})
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


def _stop_before_serving(signum: int, _frame: object) -> None:
    raise _StopBeforeServing(signum)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    config = load_config(argv)
    configure_logging(config.log_level, config.log_format)
    worker_env = os.environ.get(WORKER_ENV)
    supervising = config.workers > 1 and worker_env is None
    # Until the event loop takes over the signals, SIGTERM stops start-up cleanly. Installed explicitly,
    # not left to Python's default: as PID 1 in a container a signal without a handler is ignored.
    signal.signal(signal.SIGTERM, _stop_before_serving)
    signal.signal(signal.SIGINT, _stop_before_serving)
    # SIGHUP means "reload keys and certificates" (server/api/security.py, once serving; the supervisor
    # passes it on to its workers); it never stops the server, during start-up neither.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if worker_env is not None and os.environ.get(SUPERVISOR_ENV):
        _exit_with_supervisor(int(os.environ[SUPERVISOR_ENV]))
    if config.log_format == "json" and not supervising:
        carry_native_stderr()  # before TensorFlow is imported: its C++ logs become JSON lines too
    redis_process = None
    code = 0
    try:
        if worker_env is None:
            try:
                redis_process = check_redis(config)
            except RedisUnavailable as exc:
                log.error("no Redis: %s", exc)
                sys.exit(2)
            except TopologyError as exc:
                log.error("Redis is not as configured: %s", exc)
                sys.exit(2)
        code = run_workers(config, argv) if supervising else _serve_until_stopped(config, worker_env)
    except _StopBeforeServing:
        log.info("stopped before serving: a signal arrived during start-up")
    finally:
        stop_private_redis(redis_process)
    log.info("stopped", extra={"fields": {"exit_code": code}})
    sys.exit(code)


def _serve_until_stopped(config: ServerConfig, worker_env: str | None) -> int:
    from server.model.runner import ModelLoadError

    worker_of = tuple(int(part) for part in worker_env.split("/")) if worker_env else None
    try:
        asyncio.run(serve(config, worker_of))  # type: ignore[arg-type]
        # Closing the loop put back the default handlers: a late signal must not kill the exit under way.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ModelLoadError as exc:
        log.error("cannot serve this model: %s", exc)
        return 2
    except StartupError as exc:
        log.error("%s", exc)
        return 2
    return 0


if __name__ == "__main__":
    main()
