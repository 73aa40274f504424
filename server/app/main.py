"""The `lstm-serve` command (`python -m server`): configuration, Redis, then one server or a supervisor.

The pieces: server/app/build.py builds the server from the configuration, server/app/run.py runs it until
signalled and drains it, server/app/redis_health.py keeps its health in step with Redis, and
server/app/supervisor.py runs `--workers` processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

from server.app.logs import carry_native_stderr, configure_logging
from server.app.supervisor import SUPERVISOR_ENV, WORKER_ENV, exit_with_supervisor, run_workers
from server.app.tracing import keep_opentelemetry_out
from server.config import ServerConfig, load_config
from server.errors import EXIT_STARTUP_ERROR, StartupError

log = logging.getLogger("server")


class _StopBeforeServing(BaseException):
    """SIGTERM or SIGINT arrived while the model was still loading: stop, nothing to drain."""


def _stop_before_serving(signum: int, _frame: object) -> None:
    raise _StopBeforeServing(signum)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["admin"]:  # operator steps on the deployment's Redis (server/app/admin.py)
        from server.app.admin import main as admin

        sys.exit(admin(argv[1:]))
    config = load_config(argv)
    # Tracing off: OpenTelemetry stays out of the process, before Redis' client (which would import it) loads.
    keep_opentelemetry_out()
    from server.state.launcher import check_redis, release_private_redis

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
        exit_with_supervisor(int(os.environ[SUPERVISOR_ENV]))
    if config.log_format == "json" and not supervising:
        carry_native_stderr()  # before TensorFlow is imported: its C++ logs become JSON lines too
    private_redis = None
    code = 0
    served = False
    try:
        if worker_env is None:
            private_redis = check_redis(config)  # a private Redis, when one is used: watched until released
        code = run_workers(config, argv) if supervising else _serve_until_stopped(config, worker_env)
        served = not supervising
    except StartupError as exc:  # the one place a start-up failure is reported (server/errors.py)
        log.error("%s", exc.log_line())  # the one line it writes: what to change
        sys.exit(EXIT_STARTUP_ERROR)
    except _StopBeforeServing:
        log.info("stopped before serving: a signal arrived during start-up")
    finally:
        release_private_redis(private_redis)  # stopped only when no other lstm-serve uses it
    log.info("stopped", extra={"fields": {"exit_code": code}})
    if served:
        _exit_at_once(code)
    sys.exit(code)


def _exit_at_once(code: int) -> None:
    """Exit after a drained stop without the interpreter's teardown: everything is answered, closed and logged.

    An XLA compile still running (the warm-up's, server/model/shapes.py) cannot be interrupted, and a normal
    exit would wait for its thread (up to a second), then take TensorFlow's objects down one by one (0.2 s);
    nothing is left that needs either. Logs and standard streams are flushed first.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _serve_until_stopped(config: ServerConfig, worker_env: str | None) -> int:
    # Imported here: TensorFlow takes seconds to import, and `lstm-serve --help` should not wait for it.
    from server.app.run import serve

    worker_of = tuple(int(part) for part in worker_env.split("/")) if worker_env else None
    asyncio.run(serve(config, worker_of))  # type: ignore[arg-type]
    # Closing the loop put back the default handlers: a late signal must not kill the exit under way.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return 0


if __name__ == "__main__":
    main()
