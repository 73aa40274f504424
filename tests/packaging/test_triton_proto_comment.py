"""The Triton proto's comment on a stream error says what the servicer sets (the check lives beside the native
proto's, in tests/unit/test_proto_comments.py); run in a fresh interpreter, see there why."""

from __future__ import annotations

import subprocess
import sys

from devkit import ROOT


def test_the_triton_stream_error_comment_names_what_the_servicer_sets() -> None:
    check = "from tests.unit.test_proto_comments import check_the_triton_stream_error_comment as c; c()"
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
