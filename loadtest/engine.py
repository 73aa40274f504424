"""Running the load: every stream's driver in this process, or split over several worker processes
(spawned, with a common start time, progress snapshots and results sent back over a queue). With
--verify every process ships its answered chunks to the verifier process (live_verify.py) as it goes.
What one simulated sensor does is drivers.py; how it talks to the server, transports.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import queue as queue_module
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from loadtest.config import LoadConfig
from loadtest.drivers import ProcessLoad
from loadtest.live_verify import FEED_INTERVAL_S, LiveFeed
from loadtest.recorder import Recorder, Snapshot
from loadtest.transports import ConnectError
from lstm_stream.client.types import ModelInfo

SNAPSHOT_INTERVAL_S = 0.5


def _install_stop(stop: asyncio.Event) -> None:
    # The first Ctrl-C ends the load early but still reports what was measured; a second one aborts.
    def interrupted() -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, interrupted)


async def _drive(load: ProcessLoad, origin: float, source: int,
                 on_snapshot: Callable[[Snapshot], None] | None, shared_stop: Any = None) -> dict[str, Any]:
    stop = asyncio.Event()
    _install_stop(stop)

    async def follow_parent() -> None:
        # A worker also stops when only the parent was interrupted (a signal sent to its pid alone).
        while not stop.is_set():
            await asyncio.sleep(0.2)
            if shared_stop.is_set():
                stop.set()

    follower = asyncio.create_task(follow_parent()) if shared_stop is not None else None

    async def report() -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_INTERVAL_S)
            on_snapshot(load.recorder.snapshot(source, time.monotonic() - origin))  # type: ignore[misc]

    feed = load.feed

    async def ship() -> None:
        while feed is not None:
            await asyncio.sleep(FEED_INTERVAL_S)
            feed.flush()

    reporter = asyncio.create_task(report()) if on_snapshot else None
    shipper = asyncio.create_task(ship()) if feed is not None else None
    try:
        await load.run(origin, stop)
    finally:
        if shipper is not None:
            shipper.cancel()
        if feed is not None:
            feed.done()  # its last chunks, then the verifier may conclude
        if follower is not None:
            follower.cancel()
        if reporter is not None:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
            on_snapshot(load.recorder.snapshot(source, time.monotonic() - origin))  # type: ignore[misc]
    if load.config.cleanup:
        await load.cleanup()
    await load.close()
    return load.recorder.export()


async def run_local(config: LoadConfig, model: ModelInfo, on_snapshot: Callable[[Snapshot], None] | None = None,
                    verifier_inbox: Any = None) -> tuple[dict[str, Any], float]:
    """Every stream in this process. Returns the recording and the origin (monotonic seconds)."""
    feed = LiveFeed(verifier_inbox, 0) if verifier_inbox is not None else None
    load = ProcessLoad(config, model, range(config.streams), Recorder(), feed)
    await load.connect()
    origin = time.monotonic() + 0.05
    return await _drive(load, origin, 0, on_snapshot), origin


def _child(config: LoadConfig, model: ModelInfo, indices: list[int], source: int, messages: Any,
           start: Any, origin: Any, stop: Any, verifier_inbox: Any) -> None:
    """A worker process: connect, say ready, wait for the common origin, drive its streams, send results."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # until the loop's own handler is installed

    async def main() -> None:
        feed = LiveFeed(verifier_inbox, source) if verifier_inbox is not None else None
        load = ProcessLoad(config, model, indices, Recorder(), feed)
        try:
            await load.connect()
        except ConnectError as exc:
            messages.put(("connect_error", source, str(exc)))
            return
        messages.put(("ready", source, None))
        started = await asyncio.get_running_loop().run_in_executor(None, start.wait, 120.0)
        if not started:
            await load.close()
            messages.put(("error", source, "never told to start"))
            return
        result = await _drive(load, origin.value, source, lambda snapshot: messages.put(("progress", source, snapshot)),
                              stop)
        messages.put(("result", source, result))

    try:
        asyncio.run(main())
    except Exception as exc:  # reported to the parent, which raises it
        messages.put(("error", source, f"{type(exc).__name__}: {exc}"))


def run_processes(config: LoadConfig, model: ModelInfo, on_snapshot: Callable[[Snapshot], None] | None = None,
                  verifier_inbox: Any = None) -> tuple[list[dict[str, Any]], float]:
    """Streams split over `config.processes` worker processes (spawned: no gRPC state is forked)."""
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    start = context.Event()
    stop = context.Event()
    origin = context.Value("d", 0.0)
    groups = [list(range(p, config.streams, config.processes)) for p in range(config.processes)]
    workers = [context.Process(target=_child, args=(config, model, group, p, messages, start, origin, stop,
                                                     verifier_inbox),
                               name=f"lstm-loadtest-{p}", daemon=True) for p, group in enumerate(groups)]
    for worker in workers:
        worker.start()
    results: dict[int, dict[str, Any]] = {}
    try:
        ready: set[int] = set()
        # Spawning re-imports gRPC and NumPy in every worker: allow for that on a busy machine.
        _collect(workers, messages, lambda kind, source, payload: ready.add(source) if kind == "ready" else None,
                 lambda: len(ready) == len(workers), timeout_s=config.connect_timeout_s + 60)
        origin.value = time.monotonic() + 0.1
        start.set()

        def handle(kind: str, source: int, payload: Any) -> None:
            if kind == "progress" and on_snapshot is not None:
                on_snapshot(payload)
            elif kind == "result":
                results[source] = payload

        run_s = config.warmup_s + (config.duration_s or 0.0)
        # A run bounded only by a chunk count has no time bound of its own; every chunk has a deadline.
        limit = None if config.duration_s is None else run_s + (config.max_retries + 2) * (config.timeout_s + 1) + 60
        with _first_interrupt_stops(stop):
            _collect(workers, messages, handle, lambda: len(results) == len(workers), timeout_s=limit)
    finally:
        for worker in workers:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.terminate()
                worker.join(timeout=5)
    return [results[p] for p in range(len(workers))], origin.value


@contextlib.contextmanager
def _first_interrupt_stops(stop: Any) -> Iterator[None]:
    """The first Ctrl-C tells the workers to wind down and report; a second one aborts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupted(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _collect(workers: list[Any], messages: Any, handle: Callable[[str, int, Any], None],
             done: Callable[[], bool], timeout_s: float | None) -> None:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not done():
        if deadline is not None and time.monotonic() > deadline:
            raise RuntimeError(f"worker processes did not finish within {timeout_s:.0f} s")
        try:
            kind, source, payload = messages.get(timeout=0.25)
        except queue_module.Empty:
            dead = [w.name for w in workers if w.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"worker process {', '.join(dead)} died") from None
            continue
        if kind == "connect_error":
            raise ConnectError(payload)
        if kind == "error":
            raise RuntimeError(f"worker process {source} failed: {payload}")
        handle(kind, source, payload)
