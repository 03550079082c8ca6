"""Is alpine.lock.json fresh for the pins? CI's lock job asks, offline: ``python -m scripts ci-lock``.

Prints ``fresh=true`` or ``fresh=false`` (for ``$GITHUB_OUTPUT``) and, when stale, which
entries are missing or stale. The lock job then runs ``nox -s lock`` once and hands that one
lock to every build cell, so all cells build the same closure.
"""

from __future__ import annotations

import argparse

from .apk import lockfile
from .arch import ARCHES
from .pins import load as load_pins
from .steps import prog


def stale_entries() -> list[str]:
    pins = load_pins()
    return [f"{rt}/{arch}" for rt in pins.alpine.runtimes for arch in ARCHES
            if lockfile.locked_entry(pins, rt, arch) is None]  # fmt: skip


def main(argv: list[str]) -> int:
    argparse.ArgumentParser(prog=prog("ci-lock"), description=__doc__).parse_args(argv)
    stale = stale_entries()
    print(f"fresh={'false' if stale else 'true'}")
    if stale:
        print(f"stale={','.join(stale)}")
    return 0
