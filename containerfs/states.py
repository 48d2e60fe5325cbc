"""A container's states and the transitions allowed between them: the one table of them."""

from __future__ import annotations

import enum


class State(str, enum.Enum):
    CREATED = "created"    # namespaces made, no process yet
    STARTING = "starting"  # an intermediate is making init right now
    RUNNING = "running"    # init lives
    DEAD = "dead"          # init exited (or the container was killed before it had one)


TRANSITIONS: dict[State, frozenset[State]] = {
    State.CREATED: frozenset({State.STARTING, State.DEAD}),
    # STARTING -> CREATED when the intermediate fails or vanishes before init exists.
    State.STARTING: frozenset({State.CREATED, State.RUNNING, State.DEAD}),
    State.RUNNING: frozenset({State.DEAD}),
    State.DEAD: frozenset(),
}


def check_transition(old: State, new: State) -> None:
    """Raise if `old` -> `new` is not in the table (a bug in the service, never user input)."""
    if new not in TRANSITIONS[old]:
        raise RuntimeError(f"container state {old.value} cannot become {new.value}")
