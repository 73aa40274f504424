"""lstm-loadtest: simulated sensors that drive an lstm-serve server, measure it and verify its answers.

As a library::

    from loadtest import LoadConfig, run_load
    report = run_load(LoadConfig(target="127.0.0.1:50051", streams=64, chunk_timesteps=20, duration_s=30))
    print(report["chunks_per_s"], report["latency_ms"]["p99"])
"""

from loadtest.config import ConfigError, LoadConfig
from loadtest.plot import plot_report
from loadtest.report import render
from loadtest.run import (
    EXIT_CRASH,
    EXIT_FAILED_CHUNKS,
    EXIT_OK,
    EXIT_SOAK_FAILED,
    EXIT_USAGE,
    EXIT_VERIFY_FAILED,
    run_load,
)
from loadtest.transports import ConnectError

__all__ = [
    "EXIT_CRASH", "EXIT_FAILED_CHUNKS", "EXIT_OK", "EXIT_SOAK_FAILED", "EXIT_USAGE", "EXIT_VERIFY_FAILED",
    "ConfigError", "ConnectError",
    "LoadConfig",
    "plot_report", "render", "run_load",
]
