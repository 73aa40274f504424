"""`python -m server.healthcheck` imports grpc and the configuration, nothing heavy (issue 23).

A container health check runs every few seconds: importing redis, NumPy or TensorFlow would cost it
seconds of CPU each time. The import runs in a fresh interpreter, so nothing this test process loaded
counts.
"""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("redis", "numpy", "tensorflow", "keras")


def test_healthcheck_imports_no_heavy_module() -> None:
    probe = f"import server.healthcheck, sys; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "", f"server.healthcheck imported {done.stdout.strip()}"
