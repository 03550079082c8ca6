"""`nox -s clean`: remove bin/, images/ and their stamps; ``--all`` also the download cache."""

from __future__ import annotations

import argparse
import shutil

from . import log, paths


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="nox -s clean --", description=__doc__)
    p.add_argument("--all", action="store_true", help=f"also remove the download cache ({paths.cache_dir()})")
    args = p.parse_args(argv)
    targets = [paths.out_root() / "bin", paths.out_root() / "images"]
    if args.all:
        targets.append(paths.cache_dir())
    for t in targets:
        if t.exists():
            shutil.rmtree(t)
            log.info(f"removed {t}")
        else:
            log.info(f"{t}: already absent")
    return 0
