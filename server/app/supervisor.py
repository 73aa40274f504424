"""`--workers N`: a supervisor process starts N server processes on one port and keeps them running.

Python serves gRPC on one core (the GIL); processes sharing the port with SO_REUSEPORT use the
others. They share nothing but Redis, which is all a stream's state needs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from server.config import ServerConfig
from server.errors import EXIT_STARTUP_ERROR

log = logging.getLogger("server")

WORKER_ENV = "LSTM_SERVE_WORKER"  # "index/count", set by the supervisor for each worker process
SUPERVISOR_ENV = "LSTM_SERVE_SUPERVISOR_PID"  # a worker exits when this process is gone
# A crash-looping worker is restarted after 0.5, 1, 2, 4 ... s, at most 30 s apart; a worker that ran
# this long counts as stable, and its next crash starts the series again.
RESTART_FIRST_DELAY_S = 0.5
RESTART_MAX_DELAY_S = 30.0
RESTART_STABLE_AFTER_S = 60.0
SUPERVISOR_POLL_S = 0.1


def run_workers(config: ServerConfig, argv: list[str]) -> int:
    """Start `workers` server processes on the shared port and supervise them.

    Python serves gRPC on one core (the GIL); processes sharing the port with SO_REUSEPORT use the
    others. They share nothing but Redis, which is all a stream's state needs. A worker that dies is
    started again, after a delay that doubles while it keeps crashing (RESTART_*). SIGTERM or SIGINT is
    passed on to every worker, which drains as a single server does; each worker exits by itself when
    the supervisor dies (`exit_with_supervisor`), so a SIGKILLed supervisor leaves no orphans serving.
    """
    supervisor = _Supervisor(config, [sys.executable, "-m", "server", *argv])
    signal.signal(signal.SIGTERM, supervisor.stop)
    signal.signal(signal.SIGINT, supervisor.stop)
    signal.signal(signal.SIGHUP, supervisor.forward)  # each worker re-reads its keys and certificates
    log.info("started workers", extra={"fields": {"workers": config.workers,
                                                  "pids": [w.process.pid for w in supervisor.workers]}})
    while not supervisor.stopping:
        supervisor.look_after(time.monotonic())
        time.sleep(SUPERVISOR_POLL_S)
    codes = supervisor.wait_all()
    log.info("workers stopped", extra={"fields": {"exit_codes": codes}})
    return max((code for code in codes if code is not None and code > 0), default=0)


@dataclass
class _Worker:
    process: subprocess.Popen
    started: float
    crashes: int = 0  # consecutive crashes without a stable run between them
    restart_at: float | None = None


class _Supervisor:
    def __init__(self, config: ServerConfig, command: list[str]) -> None:
        self.config = config
        self.command = command
        self.stopping: list[int] = []  # the signal that stops the workers, once one came
        self.workers = [_Worker(self.start(index), time.monotonic()) for index in range(config.workers)]

    def start(self, index: int) -> subprocess.Popen:
        env = {**os.environ, WORKER_ENV: f"{index}/{self.config.workers}", SUPERVISOR_ENV: str(os.getpid()),
               "LSTM_SERVE_REDIS_AUTOSTART": "false"}
        return subprocess.Popen(self.command, env=env)

    def stop(self, signum: int, _frame: object) -> None:
        if not self.stopping:
            self.stopping.append(signum)
            for worker in self.workers:
                if worker.process.poll() is None:
                    worker.process.send_signal(signum)

    def forward(self, signum: int, _frame: object) -> None:
        for worker in self.workers:
            if worker.restart_at is None and worker.process.poll() is None:
                worker.process.send_signal(signum)

    def look_after(self, now: float) -> None:
        """Start again the workers whose delay is over; schedule a restart for those that exited."""
        for index, worker in enumerate(self.workers):
            if worker.restart_at is not None:
                if now >= worker.restart_at:
                    worker.process, worker.started, worker.restart_at = self.start(index), now, None
                    log.info("worker started again", extra={"fields": {"worker": index, "pid": worker.process.pid}})
                continue
            code = worker.process.poll()
            if code is None:
                continue
            if code == EXIT_STARTUP_ERROR:  # a configuration error: every restart would fail the same way
                log.error("worker %d exited with %d (a start-up error, see above); stopping", index, code)
                self.stop(signal.SIGTERM, None)
                return
            worker.crashes = 1 if now - worker.started >= RESTART_STABLE_AFTER_S else worker.crashes + 1
            delay = min(RESTART_MAX_DELAY_S, RESTART_FIRST_DELAY_S * 2 ** (worker.crashes - 1))
            worker.restart_at = now + delay
            log.warning("worker exited; starting it again after a delay", extra={"fields": {
                "worker": index, "pid": worker.process.pid, "exit_code": code, "delay_s": delay,
                "crashes": worker.crashes}})

    def wait_all(self) -> list[int | None]:
        # Each worker drains within the grace; a little more before the ones still running are killed.
        deadline = time.monotonic() + self.config.shutdown_grace_s + 5.0
        codes: list[int | None] = []
        for worker in self.workers:
            try:
                codes.append(worker.process.wait(max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                log.warning("worker %d did not stop within the grace; killing it", worker.process.pid)
                worker.process.kill()
                codes.append(worker.process.wait())
        return codes


def exit_with_supervisor(supervisor_pid: int) -> None:
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
