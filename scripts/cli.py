"""The arguments every build step accepts.

``nox -s rootfs-python -- --arch aarch64 --frozen`` passes the same arguments to the sessions it
requires (download, guest), so the build steps share one parser: each takes what concerns it
and accepts the rest, and a typo is reported once, naming every step it went to.
"""

from __future__ import annotations

import argparse

from .arch import ARCHES, host_arch
from .steps import prog


def parser(step: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog(step),
        description=f"{step}: {description}",
        epilog="Build sessions pass these arguments on to the sessions they require "
        "(rootfs-<runtime> -> guest), so every build step accepts all of them.",
    )
    p.add_argument(
        "--arch",
        default=host_arch(),
        choices=ARCHES,
        help=f"target architecture (default: this host, {host_arch()}); "
        "another architecture's outputs go to bin/ARCH/ and images/ARCH/",
    )
    p.add_argument(
        "--frozen",
        action="store_true",
        help="CI mode: the lock must exist and match pins.json; never re-resolve packages",
    )
    p.add_argument("--runtime", action="append", help="rootfs: a runtime from pins.json alpine.runtimes (repeatable)")
    p.add_argument("--all", action="store_true", help="rootfs: every runtime in pins.json (the default)")
    return p
