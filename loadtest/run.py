"""The library entry point: `run_load(LoadConfig(...))` drives the server and returns the report dict."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import Callable
from typing import Any

from loadtest.config import ConfigError, LoadConfig
from loadtest.engine import run_local, run_processes
from loadtest.live_verify import LiveVerifier, live_section
from loadtest.recorder import Snapshot, merge
from loadtest.report import build_report
from loadtest.soak import SoakRun
from loadtest.transports import ConnectError, fetch_model
from lstm_stream.client.types import ModelInfo

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_USAGE = 2
EXIT_CRASH = 3
EXIT_FAILED_CHUNKS = 4
EXIT_SOAK_FAILED = 5  # --soak: the server's memory grew past --max-memory-slope or its p99 drifted past --max-p99-drift


def check_against_model(config: LoadConfig, model: ModelInfo) -> None:
    if config.chunk_timesteps > model.max_chunk_timesteps:
        raise ConfigError(f"chunks of {config.chunk_timesteps} timesteps are more than the server takes "
                          f"({model.max_chunk_timesteps})")


def run_load(config: LoadConfig, on_snapshot: Callable[[Snapshot], None] | None = None,
             on_phase: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the load (with --verify, checked as it runs by a verifier process); return the report.

    Raises ConfigError for an impossible config and ConnectError when the server cannot be reached.
    `report["exit_code"]` is 0; 1 when verification failed; 2 when no chunk was answered at all; 4 (with
    `fail_on_errors`) when a chunk failed for good, so a sequence broke; 5 (with `soak`, where it would be 0
    otherwise) when the server's memory or p99 did not hold steady (`report["soak"]`). A chunk whose retry was
    answered is not a failure: its failed attempts are counted under `errors` and `retries` only.
    `on_snapshot` gets progress about twice a second; `on_phase` a line when the run changes phase.
    """
    config.check()
    model = fetch_model(config.target, config.connect_timeout_s, config)
    check_against_model(config, model)
    with contextlib.ExitStack() as stack:
        verifier = None
        if config.verify:
            if on_phase is not None:
                on_phase("verify: starting the verifier (Keras) before the load")
            verifier = stack.enter_context(LiveVerifier(config, model, producers=config.processes))
        inbox = verifier.inbox if verifier is not None else None
        # --soak: the server's /metrics sampled (and streams churned) while the load runs, stopped at its end.
        soak = stack.enter_context(SoakRun(config, model, on_snapshot)) if config.soak else None
        if soak is not None:
            on_snapshot = soak.on_snapshot
        started_at = dt.datetime.now(dt.UTC)
        wall = time.monotonic()
        if config.processes == 1:
            recording, _ = asyncio.run(run_local(config, model, on_snapshot, inbox))
        else:
            parts, _ = run_processes(config, model, on_snapshot, inbox)
            recording = merge(parts)
        load_ended = time.monotonic()
        report = build_report(config, model, recording, started_at, load_ended - wall)
        report["soak"] = soak.finish() if soak is not None else None
        if verifier is not None:
            if on_phase is not None:
                on_phase("verify: the last answers and the sampled whole sequences")
            report["verify"] = live_section(config, verifier.verdict(), recording["broken"], load_ended)
    exit_code = EXIT_OK
    if report["totals"]["chunks"] == 0:
        exit_code = EXIT_USAGE  # nothing got through: as good as no connection
    if report["verify"] is not None and not report["verify"]["passed"]:
        exit_code = EXIT_VERIFY_FAILED
    if exit_code == EXIT_OK and config.fail_on_errors and (report["failed_chunks"] or report["broken_streams"]):
        exit_code = EXIT_FAILED_CHUNKS
    if exit_code == EXIT_OK and report["soak"] is not None and report["soak"]["passed"] is False:
        exit_code = EXIT_SOAK_FAILED
    report["exit_code"] = exit_code
    return report


__all__ = [
    "EXIT_CRASH", "EXIT_FAILED_CHUNKS", "EXIT_OK", "EXIT_SOAK_FAILED", "EXIT_USAGE", "EXIT_VERIFY_FAILED",
    "ConfigError", "ConnectError",
    "LoadConfig",
    "run_load",
]
