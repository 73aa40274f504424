"""Regenerate the Python protobuf and gRPC code from protos/ into the client distribution.

Run from anywhere: `python scripts/gen_protos.py`. The code lands in clients/python/lstm_stream/{v1,triton}
(the server and the client both import it from the lstm-stream-client distribution); `--out DIR` writes
elsewhere, which the test suite uses to prove the checked-in code matches the protos. It runs protoc in a child
process on purpose: protoc inside a process that has imported TensorFlow can crash (two protobuf
runtimes), and keeping generation out of process makes it safe to call from anywhere.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
# The client distribution's root: generated packages go to OUT_ROOT/lstm_stream/...
OUT_ROOT = ROOT / "clients" / "python"


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}",
        f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *files,
    ]
    subprocess.run(cmd, check=True, cwd=PROTO_ROOT)
    # protoc writes modules, not packages: add the __init__.py files the imports need.
    for proto in files:
        package_dir = out_dir / Path(proto).parent
        while package_dir != out_dir:
            (package_dir / "__init__.py").touch()
            package_dir = package_dir.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_ROOT,
                        help="output root (default: clients/python, the client distribution)")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
