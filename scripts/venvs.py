"""One nox at a time creates a session's virtualenv: a lock per session, taken when the noxfile loads.

nox makes a session's virtualenv just before the session runs, with no lock: two ``nox -s
rootfs_all`` started together on a fresh checkout ran virtualenv into the same directory at
once (3 of 3 trials: tracebacks, and a venv without pip that every later run failed on). So the
noxfile takes, for each session it is asked to run (and what they require), an flock on
``.nox/.vulcan-create-<session>.lock`` before nox starts, in one order (no deadlock), and gives
it back once that session's requirements are installed (or found installed): a second nox
waits for the first to finish making the venv, then reuses it. A no-op run finds every lock
free and holds each only until its session starts. Standard library only (the noxfile imports it).
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

_held: dict[str, int] = {}  # session -> fd of its lock


def hold(envdir: Path, sessions: Iterable[str]) -> None:
    """Take the creation lock of each session, in sorted order, waiting (and saying so) where
    another nox holds it."""
    names = sorted(set(sessions) - set(_held))
    if not names:
        return
    envdir.mkdir(parents=True, exist_ok=True)
    for name in names:
        fd = os.open(envdir / f".vulcan-create-{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"vulcan: another nox is creating .nox/{name}; waiting for it", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        _held[name] = fd


def release(name: str) -> None:
    """The session's venv is ready (requirements installed): other nox processes may use it."""
    fd = _held.pop(name, None)
    if fd is not None:
        os.close(fd)


def closure(names: Iterable[str], requires: Callable[[str], Iterable[str]]) -> set[str]:
    """``names`` and every session they require, transitively."""
    out: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name not in out:
            out.add(name)
            todo.extend(requires(name))
    return out
