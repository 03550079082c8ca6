"""`nox -s rootfs-<runtime>`: one runtime's images, from the lock, as any user (the step).

check: lock (no network when it is fresh) -> plan (plan.py) -> stamp. run: make.py (fetch +
verify packages, tar stream, each format, manifest + SPDX, publish). make.py is imported only
when an image is out of date, so a no-op run loads just what the stamp check needs.
"""

from __future__ import annotations

import argparse

from .. import cli
from ..pins import Pins
from ..pins import load as load_pins
from ..step import Check
from . import plan
from .plan import Plan

CONCURRENT = True  # one Check per runtime: its own images, scratch directory and cache entries


def parser() -> argparse.ArgumentParser:
    return cli.parser("rootfs", "Build one runtime's images (or all) from the lock into images/.")


def check(args: argparse.Namespace, dry: bool) -> list[Check[Plan]]:
    pins = load_pins()
    runtimes = list(pins.alpine.runtimes) if args.all or not args.runtime else list(args.runtime)
    _ask_tools(pins, runtimes)
    return [plan.check(pins, rt, args.arch, args.frozen, dry) for rt in runtimes]


def _ask_tools(pins: Pins, runtimes: list[str]) -> None:
    """The writers' versions (stamp inputs) asked on another thread while the plan is made:
    ``mke2fs -V`` took 3 ms of every warm rebuild's start, one after the other (what a failure
    says, a missing tool, comes from the plan's own ask)."""
    from ..background import Task
    from ..formats import get

    for name in {f for rt in runtimes if rt in pins.alpine.runtimes for f in pins.alpine.formats_of(rt)}:
        Task(get(name).writer.tool_inputs)


def run(args: argparse.Namespace, check: Check[Plan]) -> None:
    from .make import make

    make(check.context)
