"""The shape every build step has: ``check(args)`` says what is to be done, ``run(args, check)`` does it.

A step module (download.py, guest.py, rootfs/build.py) exports:
  ``parser()``            its arguments (``nox -s STEP -- --help``);
  ``check(args, dry)``    one ``Check`` per output set: stamp, inputs, outputs and why it is out
                          of date (``why`` None: up to date). ``dry`` (the noxfile's in-process
                          check) must not fetch, resolve or write; it raises ``Unsure`` when it
                          cannot tell without doing so;
  ``run(args, check)``    build what one out-of-date Check describes.
``drive()`` is the loop all of them share; ``scripts/uptodate.py`` runs the same checks dry.
Model: mkosi's cache manifest, pypa/build's small single-purpose entry points.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from . import log

T = TypeVar("T")


class Unsure(Exception):
    """A dry check cannot tell without network or writes: the step must run."""


class Check(NamedTuple, Generic[T]):
    """One output set of a step and why it is out of date; ``context`` is what the step's
    check() decided and its run() builds from (the rootfs step's Plan, the pins, ...)."""

    what: str  # "rootfs python (x86_64)": how log lines name this output set
    stamp: Path
    inputs: Mapping[str, Any]
    outputs: list[Path]
    why: str | None  # None: up to date
    base: Path  # outputs are shown relative to it
    context: T

    def done_line(self) -> str:
        shown = ", ".join(_rel(p, self.base) for p in self.outputs)
        return f"{self.what}: up to date: {shown}"


def _rel(p: Path, base: Path) -> str:
    try:
        return str(p.relative_to(base))
    except ValueError:
        return str(p)


class StepModule(Protocol[T]):
    def parser(self) -> argparse.ArgumentParser: ...

    def check(self, args: argparse.Namespace, dry: bool) -> list[Check[T]]: ...

    def run(self, args: argparse.Namespace, check: Check[T]) -> None: ...


def drive(module: StepModule[T], argv: list[str]) -> int:
    """Parse, check, and run what is out of date, saying why. A module whose Checks are
    independent (``CONCURRENT = True``: own outputs, scratch and cache entries) runs them all at
    once: the writers are single-threaded tools, so two images take the two cores."""
    args = module.parser().parse_args(argv)
    todo = []
    for c in module.check(args, dry=False):
        if c.why is None:
            log.info(c.done_line())
            continue
        log.info(f"{c.what}: {c.why}")
        todo.append(c)
    if not todo:
        return 0
    from . import paths

    created = paths.claim_outputs([p for c in todo for p in c.outputs])
    try:
        if len(todo) > 1 and getattr(module, "CONCURRENT", False):
            _run_together(module, args, todo)
        else:
            for c in todo:
                module.run(args, c)
    except BaseException:
        paths.unclaim(created)  # a failed first build leaves no empty bin/ or images/ behind
        raise
    return 0


def _run_together(module: StepModule[T], args: argparse.Namespace, todo: list[Check[T]]) -> None:
    """Every Check in its own thread; all of them finish (what succeeded is published), then
    the first failure is raised and any others are said before it."""
    from .background import Task

    tasks = [Task(module.run, args, c) for c in todo]
    failures = [exc for t in tasks if (exc := t.exception()) is not None]
    if not failures:
        return
    from .errors import handle

    for exc in failures[1:]:
        handle(exc, debug=False)
    raise failures[0]


def all_up_to_date(module: StepModule[T], argv: list[str]) -> list[str] | None:
    """The done lines if a dry check finds nothing to do, else None (then the step runs)."""
    args = module.parser().parse_args(argv)
    checks = module.check(args, dry=True)
    if any(c.why is not None for c in checks):
        return None
    return [c.done_line() for c in checks]
