"""Arguments every build command accepts, so that ``nox -s rootfs-python -- --arch aarch64
--frozen`` can pass the same arguments to the sessions it requires (download, guest)."""

from __future__ import annotations

import argparse

from .pins import ARCHES, host_arch


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"nox -s {prog} --", description=description)
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
    return p
