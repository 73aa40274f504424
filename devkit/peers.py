"""Where the Triton peer and its tools live, from one place: the benchmarks and the tests that compare with
Triton ask here, never spell the paths themselves.

The peer is set up by ../shared/peers/triton/setup.sh (next to this checkout): Triton's server and
perf_analyzer (Triton's load generator, a C++ binary) built under /tmp/triton, the PyPI wheel run
through a newer glibc loader.
"""

from __future__ import annotations

import os
import shlex
import shutil
from pathlib import Path
from types import ModuleType

from devkit import ROOT
from lstm_stream.client.triton_modules import triton_modules

TRITON_SETUP = ROOT.parent / "shared" / "peers" / "triton"  # setup.sh, start_server.sh, the model repository
TRITON_PEER = Path("/tmp/triton")  # what setup.sh builds
_PEER_LIBS = TRITON_PEER / "sysroot" / "usr" / "lib" / "x86_64-linux-gnu"
_PEER_PERF_ANALYZER = [
    str(_PEER_LIBS / "ld-linux-x86-64.so.2"), "--library-path", str(_PEER_LIBS),
    str(TRITON_PEER / "pa" / "perf_analyzer" / "bin" / "perf_analyzer"),
]


def triton_server_available() -> bool:
    """The Triton peer is set up: its start script and its server build are both there."""
    return (TRITON_SETUP / "start_server.sh").is_file() and (TRITON_PEER / "server").is_dir()


def perf_analyzer_command() -> list[str] | None:
    """perf_analyzer on this machine: $PERF_ANALYZER (a command), the Triton peer's build, or PATH."""
    if command := os.environ.get("PERF_ANALYZER"):
        return shlex.split(command)
    if all(Path(part).exists() for part in (_PEER_PERF_ANALYZER[0], _PEER_PERF_ANALYZER[-1])):
        return _PEER_PERF_ANALYZER
    if binary := shutil.which("perf_analyzer"):
        return [binary]
    return None


def triton_messages() -> tuple[ModuleType, ModuleType]:
    """Triton's generated messages and stubs: the copy this process already loaded, else tritonclient's (the
    tests' processes use tritonclient; only one copy fits in protobuf's default descriptor pool)."""
    return triton_modules(prefer="tritonclient")
