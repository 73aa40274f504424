"""The checked-in generated code (in the client distribution, clients/python/lstm_stream) is exactly what
`python scripts/gen_protos.py` makes from protos/. The hand-written code beside it (the client, the wire
module, the model fingerprint) is not generated and is left out of the comparison."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from devkit import ROOT

CLIENT_ROOT = ROOT / "clients" / "python"
HAND_WRITTEN = ("client", "wire.py", "fingerprint.py")  # under lstm_stream/


@pytest.mark.timeout(120)
def test_generated_code_matches_protos(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)], check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    package = CLIENT_ROOT / "lstm_stream"
    checked_in = sorted(p.relative_to(CLIENT_ROOT) for p in package.rglob("*")
                        if p.is_file() and "__pycache__" not in p.parts
                        and not any(p.is_relative_to(package / name) for name in HAND_WRITTEN))
    assert generated == checked_in, "regenerate with: python scripts/gen_protos.py"
    for path in generated:
        assert (tmp_path / path).read_bytes() == (CLIENT_ROOT / path).read_bytes(), (
            f"{path} is stale; regenerate with: python scripts/gen_protos.py"
        )
