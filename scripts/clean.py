"""`nox -s clean`: remove bin/, images/ and their stamps; ``--all`` also the download cache.

Only what this tool wrote, and only where it made the directory: each of bin/, images/ and the
cache must carry the tool's marker (paths.MARKER, written when the tool created it), and inside
it only the entries the tool writes are removed (output_entries(), CACHE_ENTRIES below). A
directory without the marker, a symbolic link, or anything else is left and reported, and the
run then fails, saying what to do. Never the checkout, ``$HOME``, ``/``, or a parent of them.
Scratch directories of runs that died (on disk and in RAM) are swept too; a live run's never.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import os
import shutil
from pathlib import Path

from . import formats, log, paths, settings, workspace
from .arch import ARCHES
from .errors import VulcanError
from .steps import prog

# What clean removes inside the output directories (paths.OUTPUT_DIRS; fnmatch patterns; arch
# subdirectories hold the same), scratch directories and temporary files of dead runs too.


def output_entries(top: str) -> tuple[str, ...]:
    """What clean removes in bin/ or images/ (and their arch subdirectories): what is named above."""
    if top == "bin":
        return ("firecracker", "jailer", "vmlinux", "vulcan-guest")
    return (
        *(f"*.{name}" for name in formats.FORMATS),
        "*.manifest.json",
        "*.spdx.json",
        ".boot",
        "snapshots",
        "published.json",
    )


LEFTOVER_ENTRIES = (".stamps", ".vulcan-*", ".*.tmp", ".*.part", paths.MARKER)  # .part: an interrupted pull
CACHE_ENTRIES = ("sha256", "apk", "keys", "rootfs", "go", "go-build", "oci", "tools", paths.MARKER)


class CleanLeft(VulcanError):
    """clean was asked to remove something it did not create."""


def _precious() -> list[Path]:
    """Directories that clean never removes, nor any directory that holds one of them."""
    out = [Path("/"), settings.REPO_ROOT]
    for home in (os.environ.get("HOME"), str(Path.home())):
        if home:
            out.append(Path(home))
    return [Path(os.path.realpath(p)) for p in out]


def _entries_of(top: str) -> tuple[str, ...]:
    return (*output_entries(top), *LEFTOVER_ENTRIES)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _sweep(directory: Path, patterns: tuple[str, ...], arch_dirs: bool, left: list[str]) -> None:
    """Remove the entries of ``directory`` that match ``patterns``; an arch subdirectory holds the
    same kinds of entries (another architecture's outputs) and is swept the same way."""
    for entry in sorted(directory.iterdir()):
        name = entry.name
        if arch_dirs and name in ARCHES and entry.is_dir() and not entry.is_symlink():
            _sweep(entry, patterns, False, left)
            _rmdir_if_empty(entry)
        elif name.startswith(workspace.SCRATCH_PREFIX) or (name.startswith(".") and name.endswith(".tmp")):
            # a run's scratch directory or temporary file: only if that run is gone (its flock)
            flags = os.O_DIRECTORY if entry.is_dir() and not entry.is_symlink() else os.O_NOFOLLOW
            if not workspace.remove_if_abandoned(entry, flags, _remove):
                left.append(f"{entry}: in use by a build that is running")
        elif any(fnmatch.fnmatchcase(name, pat) for pat in patterns):
            _remove(entry)
        else:
            left.append(f"{entry}: not written by vulcan-images")


def _rmdir_if_empty(directory: Path) -> bool:
    try:
        directory.rmdir()
        return True
    except OSError:
        return False


def clean_dir(target: Path, patterns: tuple[str, ...], arch_dirs: bool, problems: list[str]) -> None:
    """Remove what the tool wrote in ``target``, then ``target`` itself when nothing else is left."""
    shown = str(target)
    if not os.path.lexists(target):
        log.info(f"{shown}: already absent")
        return
    if target.is_symlink():
        problems.append(
            f"{shown} is a symbolic link (to {os.readlink(target)}): clean does not follow links; "
            "remove the link, or what you want gone where it points, yourself"
        )
        return
    real = Path(os.path.realpath(target))
    for keep in _precious():
        if keep == real or keep.is_relative_to(real):
            problems.append(f"{shown} is {'' if keep == real else 'a parent of '}{keep}: clean never removes that")
            return
    if not target.is_dir():
        problems.append(f"{shown} is not a directory: clean did not make it")
        return
    if not paths.is_marked(target):
        problems.append(
            f"{shown} has no {paths.MARKER} of vulcan-images: this tool did not create it, so clean leaves it"
        )
        return
    left: list[str] = []
    _sweep(target, patterns, arch_dirs, left)
    if left:  # the marker stays: the directory is still ours, with a user's files in it
        (target / paths.MARKER).write_text(paths.MARKER_TEXT)
        problems.extend(left)
        log.info(f"{shown}: removed what vulcan-images wrote; left what it did not write")
    elif _rmdir_if_empty(target):
        log.info(f"removed {shown}")


def sweep_ram() -> None:
    """RAM scratch of runs that died (kill -9 during a build leaves it in /dev/shm)."""
    root = settings.ram_dir()
    if root is None:
        return
    parent = root / f"vulcan-images-{os.getuid()}"
    if not parent.is_dir() or parent.is_symlink():
        return
    removed = workspace.remove_stale(parent)
    if removed:
        log.info(f"removed {len(removed)} RAM scratch director{'y' if len(removed) == 1 else 'ies'} of runs that died")
    with contextlib.suppress(OSError):  # a live run's scratch is still there
        parent.rmdir()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=prog("clean"), description=__doc__.split("\n\n")[0])
    p.add_argument("--all", action="store_true", help=f"also remove the download cache ({paths.cache_dir()})")
    args = p.parse_args(argv)
    problems: list[str] = []
    for top in paths.OUTPUT_DIRS:
        clean_dir(paths.out_root() / top, _entries_of(top), True, problems)
    scratch = settings.scratch_dir()
    if scratch is not None and scratch.is_dir():
        workspace.remove_stale(scratch)
    sweep_ram()
    if args.all:
        clean_dir(paths.cache_dir(), CACHE_ENTRIES, False, problems)
    if problems:
        raise CleanLeft(
            "clean left what vulcan-images did not write:\n  " + "\n  ".join(problems),
            hint="remove those yourself if you mean to; clean only removes what this tool created "
            f"(directories with its {paths.MARKER})",
        )
    return 0
