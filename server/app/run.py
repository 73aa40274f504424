"""Running a built server until SIGTERM or SIGINT, then draining it (docs/operations.md, "Shutdown and draining")."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import resource
import signal

from aiohttp import web

from server import metrics
from server.api.rest import start_rest
from server.app.build import BuiltServer, build_server
from server.config import ServerConfig
from server.errors import StartupError
from server.security.redact import redact_url

log = logging.getLogger("server")

# Left at the end of the grace for closing the port and stopping the data plane.
STOP_MARGIN_S = 1.0


async def serve(config: ServerConfig, worker_of: tuple[int, int] | None = None) -> None:
    """Build the server, serve until signalled, drain. `worker_of`: (index, count) under --workers."""
    raised_from = raise_fd_limit()
    built = await build_server(config, worker_of)
    await run_until_signalled(built, config, worker_of, raised_from)


async def run_until_signalled(built: BuiltServer, config: ServerConfig, worker_of: tuple[int, int] | None,
                              raised_from: int | None = None) -> None:
    # Every service name has its status before the port opens: no caller sees SERVING (the health
    # servicer's default for "") or NOT_FOUND before the first answer from Redis.
    await built.redis_health.check()
    await built.server.start()
    log_fd_limit(config, raised_from)
    # TensorFlow leaves hundreds of thousands of objects behind at start-up; a full garbage collection
    # walks them all (pauses of 100-200 ms under load). Freezing them takes them out of every collection.
    gc.collect()
    gc.freeze()
    if config.metrics_port:
        # Each worker is its own process with its own counters, so each gets its own port.
        metrics_port = config.metrics_port + (worker_of[0] if worker_of else 0)
        try:
            metrics.serve_metrics(metrics_port, config.metrics_host)
        except OSError as exc:
            raise StartupError(f"cannot serve metrics on {config.metrics_host}:{metrics_port}: {exc}; "
                               "choose another --metrics-port, or 0 to turn metrics off") from exc
    http = await _start_http(built, config, worker_of)
    log.info("serving", extra={"fields": {"address": f"{config.host}:{built.port}", "port": built.port,
                                          "http_port": config.http_port if http else None,
                                          "redis": redact_url(config.redis_url), "redis_mode": built.redis_mode,
                                          **built.security.describe(),
                                          "tracing": built.tracing.description if built.tracing else "off",
                                          "worker": "/".join(map(str, worker_of)) if worker_of else None}})

    stopping = asyncio.Event()
    hurry = asyncio.Event()  # a second signal: skip what is left of the drain delay
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        (hurry if stopping.is_set() else stopping).set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    security_watch = built.security.start()  # SIGHUP and file changes re-read keys and certificates

    tracker = asyncio.create_task(built.redis_health.track())
    await stopping.wait()
    if security_watch:
        security_watch.cancel()
    await _drain(config, built, tracker, hurry, http)
    if built.repository is not None:
        await built.repository.stop()
    await built.dataplane.stop()
    if built.tracing is not None:
        built.tracing.close()  # the spans of the last requests, before the process exits


async def _start_http(built: BuiltServer, config: ServerConfig, worker_of: tuple[int, int] | None
                      ) -> web.AppRunner | None:
    """The HTTP/REST port, in this loop beside gRPC (every worker of --workers shares it, as the gRPC port)."""
    if built.rest is None:
        return None
    try:
        return await start_rest(built.rest, config.host, config.http_port, built.security.ssl_context(),
                                shared_port=worker_of is not None, shutdown_timeout_s=STOP_MARGIN_S,
                                idle_s=config.http_idle_s)
    except OSError as exc:
        raise StartupError(f"cannot serve HTTP on {config.host}:{config.http_port}: {exc}; choose another "
                           "--http-port, or 0 to turn HTTP off") from exc


async def _drain(config: ServerConfig, built: BuiltServer, tracker: asyncio.Task, hurry: asyncio.Event,
                 http: web.AppRunner | None) -> None:
    """SIGTERM: tell the load balancer (health NOT_SERVING, port still open), keep serving for the drain
    delay while it takes this replica out, then refuse new calls (UNAVAILABLE, retryable), let accepted
    chunks finish and be answered, end open streams UNAVAILABLE, and close the port, all within the grace.
    """
    drain = built.drain
    loop = asyncio.get_running_loop()
    deadline = loop.time() + config.shutdown_grace_s
    await built.health.enter_graceful_shutdown()  # every service name at once, and later sets are ignored
    drain.announce()  # the HTTP port's /v2/health/ready reads 503 from now on
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
    grace = max(0.0, min(STOP_MARGIN_S, deadline - loop.time()))
    if http is not None:
        await asyncio.gather(built.server.stop(grace), http.cleanup())
    else:
        await built.server.stop(grace)


def raise_fd_limit() -> int | None:
    """Raise the soft RLIMIT_NOFILE to the hard one; the old soft limit if it was raised, else None.

    Every client connection holds a descriptor. The soft limit is often 1,024 (systemd keeps it there for
    programs that still use select(), and leaves the hard limit at 524,288 for those that do not); this
    server waits with epoll only (grpc, asyncio, redis-py), so it takes what the hard limit allows, as
    nginx and Envoy deployments do. Lowering the hard limit (ulimit -Hn, LimitNOFILE=) caps it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # the kernel refuses more than fs.nr_open
        try:
            with open("/proc/sys/fs/nr_open") as nr_open:
                target = int(nr_open.read())
        except (OSError, ValueError):
            return None
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log.warning("could not raise the file-descriptor limit", extra={"fields": {
                "soft": soft, "hard": hard, "error": str(exc)}})
            return None
        return soft
    return None


def log_fd_limit(config: ServerConfig, raised_from: int | None) -> None:
    """The descriptor limit in use and the client connections it leaves room for (one descriptor each)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    open_now = _open_fds()
    limit = None if soft == resource.RLIM_INFINITY else soft
    log.info("file descriptors", extra={"fields": {
        "limit": limit, "hard_limit": None if hard == resource.RLIM_INFINITY else hard,
        "raised_from": raised_from, "open": open_now,
        # Beyond this many connections at once, accepting fails and new clients wait (DEADLINE_EXCEEDED).
        "max_connections": limit - open_now if limit is not None and open_now is not None else None,
        "max_connection_idle_s": config.max_connection_idle_s or None}})


def _open_fds() -> int | None:
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder)) - 1  # less the descriptor listdir itself held open
        except OSError:
            continue
    return None
