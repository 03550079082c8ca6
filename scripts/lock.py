"""`nox -s lock`: resolve every runtime (its world, or a template's image) per arch into alpine.lock.json.

The lock file itself is apk/lockfile.py; a template's entries, template/lock.py."""

from __future__ import annotations

import argparse

from .apk.lockfile import lock_all, lock_path
from .arch import ARCHES
from .errors import UsageError
from .pins import load as load_pins
from .steps import prog


def main(argv: list[str]) -> int:
    pins = load_pins()
    parser = argparse.ArgumentParser(
        prog=prog("lock"),
        description="Resolve each runtime's Alpine world (base + runtime) against the pinned branch, and each "
        f"template's image reference, and record the exact closure or digests in {lock_path(pins).name}. Builds "
        "use the lock.",
    )
    parser.add_argument("--arch", action="append", choices=ARCHES, help="only this architecture (repeatable)")
    parser.add_argument("--runtime", action="append", help="only this runtime (repeatable)")
    args = parser.parse_args(argv)
    runtimes = args.runtime or list(pins.alpine.runtimes)
    for rt in runtimes:
        if rt not in pins.alpine.runtimes:
            raise UsageError(f"unknown runtime {rt!r}", hint=f"known: {', '.join(pins.alpine.runtimes)}")
    templates = [rt for rt in runtimes if pins.alpine.runtimes[rt].image is not None]
    lock_all(pins, [rt for rt in runtimes if rt not in templates], args.arch or list(ARCHES))
    if templates:
        from .template.lock import lock_templates

        lock_templates(pins, templates, args.arch or list(ARCHES))
    return 0
