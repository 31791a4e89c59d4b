"""The README's command-line examples run as written (on the real data, in a scratch folder)."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from edgetune.cli import main

from .conftest import DATA_DIR

ROOT = Path(__file__).resolve().parents[1]
#: Lines with their own, longer tests: the paper's full evaluation and the benchmark suite.
LONG = ("edgetune reproduce", "edgetune bench")


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## The command line", 1)[1].split("```", 2)[1]
    lines, current = [], ""
    for raw in block.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        current = f"{current} {line.strip()}" if current else line.strip()
        if current.endswith("\\"):
            current = current[:-1].rstrip()
            continue
        if current.startswith("edgetune "):
            lines.append(current)
        current = ""
    return lines


def test_readme_command_lines_run_as_written(tmp_path, monkeypatch):
    if not (DATA_DIR / "cooling-fan").is_dir():
        pytest.skip("the cooling-fan data set is not in ../shared/data")
    monkeypatch.chdir(tmp_path)
    commands = readme_commands()
    assert any(c.startswith("edgetune pretrain") for c in commands) and len(commands) >= 8
    ran = 0
    for cmd in commands:
        if cmd.startswith(LONG):
            continue
        argv = [str(DATA_DIR) if a == "../shared/data" else a for a in shlex.split(cmd)[1:]]
        assert main([*argv, "--quiet"] if "--quiet" not in argv else argv) == 0, cmd
        ran += 1
    assert ran >= 7
    assert (tmp_path / "runs" / "adapter" / "adapter_config.json").is_file()
