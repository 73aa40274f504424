"""The checked-in generated code is exactly what `python scripts/gen_protos.py` makes from protos/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT


@pytest.mark.timeout(120)
def test_generated_code_matches_protos(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)], check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    checked_in = sorted(p.relative_to(ROOT) for p in (ROOT / "lstm_stream").rglob("*")
                        if p.is_file() and "__pycache__" not in p.parts)
    assert generated == checked_in, "regenerate with: python scripts/gen_protos.py"
    for path in generated:
        assert (tmp_path / path).read_bytes() == (ROOT / path).read_bytes(), (
            f"{path} is stale; regenerate with: python scripts/gen_protos.py"
        )
