"""Each example runs and checks its own outcome."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "examples" / name), *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_container_sample(service: Any) -> None:
    res = run_example("container_sample.py", "sh", "-c",
                      "echo pid $$; ls /; ls /proc | grep '^[0-9]' | tr '\\n' ' '")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "pid 1"
    assert set(lines[1:-1]) <= {"bin", "lib", "lib64", "proc", "usr"} and "proc" in lines
    assert lines[-1].split()[0] == "1"


def test_demo(service: Any) -> None:
    res = run_example("demo.py")
    assert res.returncode == 0, res.stderr
    assert "POLLHUP: the container is dead" in res.stdout
    assert "inside: pid 1, hostname demo, links lo" in res.stdout
    assert "waitpid -> exit 3; container_wait -> exit 3" in res.stdout
