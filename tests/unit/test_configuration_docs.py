"""docs/configuration.md is generated from server/config.py (scripts/gen_config_docs.py): it must be current,
and it must name every option with its environment variable and default, in a table markdown renders."""

from __future__ import annotations

import importlib.util
from dataclasses import fields
from pathlib import Path
from types import ModuleType

from server.config import ENV_PREFIX, ServerConfig

ROOT = Path(__file__).resolve().parents[2]


def load_generator() -> ModuleType:
    # scripts/ is not a package: load the script by its path, in this process.
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "scripts" / "gen_config_docs.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_configuration_page_is_current() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert page == load_generator().render(), (
        "docs/configuration.md is stale: run .venv/bin/python scripts/gen_config_docs.py"
    )


def test_every_option_is_one_row_of_one_table() -> None:
    lines = load_generator().render().splitlines()
    start = lines.index("| flag | environment | default | meaning |")
    table = lines[start:]
    table = table[: next((i for i, line in enumerate(table) if not line.startswith("|")), len(table))]
    # Four cells in every row (no stray pipe), and nothing but rows until the table ends.
    assert all(line.replace("\\|", "").count("|") == 5 for line in table), table
    defaults = ServerConfig()
    rows = table[2:]
    assert len(rows) == len(fields(ServerConfig))
    for item, row in zip(fields(ServerConfig), rows, strict=True):
        flag = "--" + item.name.replace("_", "-")
        assert row.startswith(f"| `{flag}` | `{ENV_PREFIX}{item.name.upper()}` | "), row
        value = getattr(defaults, item.name)
        if isinstance(value, float):
            assert f"| `{value:g}` |" in row, row
        elif isinstance(value, int) and not isinstance(value, bool):
            assert f"| `{value}` |" in row, row


def test_defaults_show_no_machine_paths() -> None:
    page = load_generator().render()
    assert str(ROOT) not in page
    assert "| `server/model/default.keras` |" in page
