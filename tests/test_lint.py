"""The code's own checks: mypy --strict on both packages, and ruff's error rules everywhere."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        found = shutil.which(name)
        if found is None:
            print(f"skipping: {name} is not installed (scripts/setup.sh installs it)")
            pytest.skip(f"{name} is not installed")
        return found
    return str(path)


def test_mypy_strict() -> None:
    res = subprocess.run([_tool("mypy"), "--strict", "syscalls", "containerfs"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def test_ruff() -> None:
    res = subprocess.run([_tool("ruff"), "check", ".", "--select", "F,E9,B",
                          "--ignore", "B905,B008", "--output-format", "concise"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
