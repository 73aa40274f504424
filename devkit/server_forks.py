"""Test servers forked from one process that imported the server once: the suite's start-ups, not users'.

Most of an lstm-serve start is importing TensorFlow (5-7 s of CPU on the suite's machines) and the suite
starts about two hundred servers. So each test worker keeps one fork server: a process that imports what
`python -m server` imports, then forks a child for every server it is asked for. The child takes the
server's arguments, environment, working directory and log (standard output and error), and runs the
same `server.app.main.main` that `python -m server` runs; it exits as that process would, through the
interpreter's own exit. Such a server starts in about 2 s instead of 8-10.

What differs from a fresh process is what happens at import: the modules were imported once, with the
fork server's environment. So a server whose environment differs in a variable read at import time
(IMPORT_TIME_PREFIXES: Keras' backend, TensorFlow's and BLAS' settings, OpenTelemetry's, which decide
whether tracing imports it) is started as a fresh process instead, and the tests of start-up itself (the
`lstm-serve` command, start-up errors, workers, the topology scripts, releases) start real processes.
`LSTM_TEST_FORK_SERVERS=0` starts every server as a fresh process.

The protocol, one JSON object a line: the harness writes {"id", "argv", "env", "cwd", "log", "new_session",
"nofile"} (its descriptor limit, which a child of its own would inherit) to the fork server's standard
input; it answers {"id", "pid"} on its standard output once the child exists, and {"exited": pid, "code":
exit code or -signal} once the child has exited (polled every REAP_INTERVAL_S). When its standard input
closes (the test worker is gone) it kills the children left, then exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from devkit import ROOT

# Variables read when the server's modules are imported (or that decide what is imported): a server whose
# value differs from the fork server's starts as a fresh process.
IMPORT_TIME_PREFIXES = ("KERAS_", "TF_", "XLA_", "OPENBLAS_", "OMP_", "MKL_", "OTEL_", "PYTHON", "GRPC_")
REAP_INTERVAL_S = 0.02
READY_TIMEOUT_S = 180.0
FORKS_ENV = "LSTM_TEST_FORK_SERVERS"  # "0": every server a fresh process


class ForkedServer:
    """A forked server child, with the part of subprocess.Popen's interface the tests use."""

    def __init__(self, forks: ServerForks, pid: int, args: list[str]) -> None:
        self._forks = forks
        self.pid = pid
        self.args = args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self._forks.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)  # type: ignore[arg-type]
            self._forks.wait_for_exits(0.05)
        return self.returncode  # type: ignore[return-value]

    def send_signal(self, sig: int) -> None:
        # As Popen: never signal a child known to have exited (its pid may have been reused since).
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ServerForks:
    """The harness's side: starts the fork server on first use, asks it for servers, hears of their exits."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._environment: dict[str, str] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition()
        self._pids: dict[int, int] = {}  # request id -> pid
        self._exits: dict[int, int] = {}  # pid -> exit code
        self._next_id = 0
        self._failed: str | None = None

    @staticmethod
    def wanted() -> bool:
        return os.environ.get(FORKS_ENV, "1") != "0"

    def forkable(self, environment: dict[str, str]) -> bool:
        """Whether a server with this environment may be forked: the same import-time variables as ours."""
        reference = self._environment or dict(os.environ)

        def import_time(env: dict[str, str]) -> dict[str, str]:
            # PYTHONUNBUFFERED aside: the fork server has it too (its children write their logs unbuffered).
            return {name: value for name, value in env.items()
                    if name.startswith(IMPORT_TIME_PREFIXES) and name != "PYTHONUNBUFFERED"}

        return self._failed is None and import_time(environment) == import_time(reference)

    def start(self, argv: list[str], environment: dict[str, str], cwd: Path, log: Path, *,
              new_session: bool = False) -> ForkedServer:
        """Fork a server: `python -m server *argv` with this environment, working directory and log file (appended
        to); `new_session` as Popen's `start_new_session`."""
        with self._lock:
            process = self._ensure_started()
            self._next_id += 1
            request_id = self._next_id
            # The descriptor limit as a child of this process would inherit it (a test may lower it for a server).
            line = json.dumps({"id": request_id, "argv": argv, "env": environment, "cwd": str(cwd), "log": str(log),
                               "new_session": new_session, "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)})
            assert process.stdin is not None
            process.stdin.write(line.encode() + b"\n")
            process.stdin.flush()
        with self._changed:
            if not self._changed.wait_for(lambda: request_id in self._pids or self._failed is not None, 60):
                raise RuntimeError("the fork server did not answer within 60 s")
            if self._failed is not None:
                raise RuntimeError(self._failed)
            pid = self._pids.pop(request_id)
        return ForkedServer(self, pid, [sys.executable, "-m", "server", *argv])

    def exit_code(self, pid: int) -> int | None:
        with self._changed:
            return self._exits.get(pid)

    def wait_for_exits(self, timeout_s: float) -> None:
        with self._changed:
            self._changed.wait(timeout_s)

    def stop(self) -> None:
        """Close the fork server: it kills the children left and exits."""
        with self._lock:
            process, self._process = self._process, None
        if process is None:
            return
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def _ensure_started(self) -> subprocess.Popen[bytes]:
        if self._process is not None and self._process.poll() is None:
            return self._process
        self._environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "devkit.server_forks"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            cwd=ROOT, env=self._environment,
        )
        assert self._process.stdout is not None
        ready = _read_line_within(self._process.stdout, READY_TIMEOUT_S)
        if ready != b"ready\n":
            self._process.kill()
            self._process.wait(10)
            raise RuntimeError(f"the fork server did not start: {ready!r}")
        threading.Thread(target=self._hear, args=(self._process,), name="server-forks", daemon=True).start()
        return self._process

    def _hear(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue  # not the protocol's: something imported wrote to standard output
            with self._changed:
                if "exited" in message:
                    self._exits[message["exited"]] = message["code"]
                else:
                    self._pids[message["id"]] = message["pid"]
                self._changed.notify_all()
        with self._changed:
            if self._process is process:
                self._failed = f"the fork server exited with {process.wait()}"
            self._changed.notify_all()


def _read_line_within(stream: object, timeout_s: float) -> bytes:
    fd = stream.fileno()  # type: ignore[attr-defined]
    ready, _, _ = select.select([fd], [], [], timeout_s)
    return stream.readline() if ready else b""  # type: ignore[attr-defined]


# The fork server itself (`python -m devkit.server_forks`): one thread, so that a fork copies no other thread's
# half-held lock; nothing is initialised before forking but imports (no event loop, channel, or TensorFlow op).

def _serve_forks() -> None:
    from server.app.tracing import keep_opentelemetry_out

    keep_opentelemetry_out()  # as `python -m server` with tracing off, before redis-py is imported
    # What `python -m server` imports to serve.
    import server.app.main
    import server.app.run
    import server.state.launcher  # noqa: F401

    os.write(1, b"ready\n")
    children: set[int] = set()
    pending = b""
    while True:
        readable, _, _ = select.select([0], [], [], REAP_INTERVAL_S)
        _reap(children)
        if not readable:
            continue
        data = os.read(0, 1 << 16)
        if not data:  # the test worker is gone: no server outlives it
            for pid in children:
                os.kill(pid, signal.SIGKILL)
            while children:
                _reap(children)
                time.sleep(REAP_INTERVAL_S)
            return
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                _become_server(request)  # returns only by raising SystemExit, as `python -m server` exits
            children.add(pid)
            os.write(1, json.dumps({"id": request["id"], "pid": pid}).encode() + b"\n")


def _reap(children: set[int]) -> None:
    while children:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            return
        children.discard(pid)
        os.write(1, json.dumps({"exited": pid, "code": os.waitstatus_to_exitcode(status)}).encode() + b"\n")


def _become_server(request: dict) -> None:
    """In the child: the server's standard streams, environment and directory, then `python -m server`'s main."""
    if request["new_session"]:
        os.setsid()
    resource.setrlimit(resource.RLIMIT_NOFILE, tuple(request["nofile"]))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    log = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = [str(ROOT / "server" / "__main__.py"), *request["argv"]]
    from server.app.main import main

    main(request["argv"])
    sys.exit(0)


if __name__ == "__main__":
    _serve_forks()
