"""The terminal of a foreground `run` or `exec` without --console-socket: the runtime holds
the pty master and relays it to its own stdio, as `containerfs run -t` does."""

from __future__ import annotations

from ..cli import _relay


def relay(master: int) -> None:
    """Copy stdin to the terminal and its output to stdout until it closes (closes it)."""
    _relay(master)
