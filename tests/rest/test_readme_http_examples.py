"""The README's curl examples ("HTTP/REST"), run as written against a real server, give the answers it shows.

Each ```sh block between the `http-examples` markers runs in bash with the server's HTTP port in place of
localhost:8000; its output must equal the block after it, line by line: JSON lines as JSON, numbers to 4
decimals (within 1e-4, as the README says), other lines as text.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from devkit import ROOT
from devkit.processes import ServerProcess

pytestmark = pytest.mark.timeout(120)

BLOCK = re.compile(r"```sh\n(.*?)```\n```(?:json|text)\n(.*?)```", re.S)


def examples() -> list[tuple[str, str]]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("<!-- http-examples:start -->", 1)[1].split("<!-- http-examples:end -->", 1)[0]
    return BLOCK.findall(section)


def same(shown: object, got: object) -> bool:
    if isinstance(shown, dict) and isinstance(got, dict):
        return shown.keys() == got.keys() and all(same(shown[key], got[key]) for key in shown)
    if isinstance(shown, list) and isinstance(got, list):
        return len(shown) == len(got) and all(same(a, b) for a, b in zip(shown, got, strict=True))
    if isinstance(shown, float) and isinstance(got, int | float) and not isinstance(got, bool):
        return abs(shown - got) <= 1e-4
    return type(shown) is type(got) and shown == got


def parsed(line: str) -> object:
    try:
        return json.loads(line)
    except ValueError:
        return line


def test_readme_curl_examples_answer_as_documented(default_server: ServerProcess) -> None:
    found = examples()
    assert len(found) >= 5, "the README's HTTP examples were not found between their markers"
    for command, shown in found:
        script = command.replace("localhost:8000", f"127.0.0.1:{default_server.http_port}")
        done = subprocess.run(["bash", "-c", f"set -euo pipefail\n{script}"], capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == 0, f"{command}\n{done.stderr}"
        got_lines, shown_lines = done.stdout.strip().splitlines(), shown.strip().splitlines()
        assert len(got_lines) == len(shown_lines), f"{command}\nshown:\n{shown}\ngot:\n{done.stdout}"
        for shown_line, got_line in zip(shown_lines, got_lines, strict=True):
            assert same(parsed(shown_line), parsed(got_line)), f"{command}\nshown: {shown_line}\ngot:   {got_line}"
