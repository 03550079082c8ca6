"""`nox -s lock`: resolve every runtime's world for each architecture into alpine.lock.json.

The lock file itself is apk/lockfile.py."""

from __future__ import annotations

import argparse

from .apk.lockfile import lock_all, lock_path
from .arch import ARCHES
from .pins import load as load_pins
from .steps import prog


def main(argv: list[str]) -> int:
    pins = load_pins()
    parser = argparse.ArgumentParser(
        prog=prog("lock"),
        description="Resolve each runtime's Alpine world (base + runtime) against the pinned branch and record "
        f"the exact closure in {lock_path(pins).name}. Builds use the lock.",
    )
    parser.add_argument("--arch", action="append", choices=ARCHES, help="only this architecture (repeatable)")
    parser.add_argument("--runtime", action="append", help="only this runtime (repeatable)")
    args = parser.parse_args(argv)
    lock_all(pins, args.runtime or list(pins.alpine.runtimes), args.arch or list(ARCHES))
    return 0
