"""`nox -s rootfs-<runtime>`: one image per runtime in pins.json, from the lock, as any user.

Steps: lock (no network when it is fresh) -> stamp check -> fetch + verify packages (shared
cache) -> merged tree -> what install scripts would do -> normalised tar -> ext4 ->
e2fsck -> manifest + SPDX -> publish with os.replace (an interrupted build leaves no image).

This module decides (inputs, stamp); `make` builds. It is imported only when an image is
out of date, so a no-op run loads just what the stamp check needs (see bench: no-op).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import cli, ext4, log, paths, stamps
from ..apk import repo
from ..errors import BuildError, PinError
from ..fetch import sha256_file
from ..pins import Pins
from ..pins import load as load_pins


def source_date_epoch(closure: list[repo.Locked]) -> int:
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env:
        if not env.isdigit():
            raise PinError(f"SOURCE_DATE_EPOCH={env!r} is not a number of seconds")
        return int(env)
    return max((p.build_time for p in closure), default=0)


@dataclass(frozen=True)
class Plan:
    """What an out-of-date image is built from, and where it goes."""

    pins: Pins
    runtime: str
    arch: str
    frozen: bool
    closure: list[repo.Locked]
    guest: Path
    guest_sha: str
    epoch: int
    headroom_mib: int
    content_inputs: dict[str, Any]  # what the image's bytes depend on (keys the stream cache)
    inputs: dict[str, Any]  # the stamp's inputs: content + sizing + e2fsprogs
    stamp: Path
    base: Path
    out_dir: Path
    image: Path
    manifest: Path
    spdx: Path


def plan(pins: Pins, runtime: str, arch: str, frozen: bool, dry: bool = False) -> tuple[Plan, str | None] | None:
    """The step's stamp check: the plan and why the image is out of date (None: it is not).

    ``dry`` (the noxfile's in-process check) never resolves or writes the lock: None when the
    lock has no fresh entry for this runtime and arch."""
    alpine = pins.alpine
    if runtime not in alpine.runtimes:
        raise PinError(f"unknown runtime {runtime!r}", hint=f"runtimes in pins.json: {', '.join(alpine.runtimes)}")
    rt = alpine.runtimes[runtime]
    base = paths.out_root()
    out_dir = paths.images_dir(arch)
    guest = paths.bin_dir(arch) / "vulcan-guest"
    if not guest.is_file():
        raise BuildError(f"{guest} is missing", hint=f"run 'nox -s guest -- --arch {arch}' first")
    closure = repo.locked_entry(pins, runtime, arch) if dry else repo.ensure_locked(pins, runtime, arch, frozen)
    if closure is None:
        return None
    guest_sha = sha256_file(guest)
    epoch = source_date_epoch(closure)
    headroom = rt.headroom_mib if rt.headroom_mib is not None else alpine.headroom_mib
    stamp = paths.stamp_path(out_dir, f"rootfs-{runtime}")
    content_inputs = {
        "arch": arch,
        "runtime": {"world": list(rt.world), "check": list(rt.check), "binary": rt.binary},
        "alpine": {"branch": alpine.branch, "repositories": list(alpine.repositories), "base": list(alpine.base)},
        "packages": [f"{p.name}-{p.version} {p.checksum}" for p in closure],
        "keys": sorted(k.sha256 for k in alpine.keys),
        "guest_sha256": guest_sha,
        "source_date_epoch": epoch,
    }
    inputs = {
        **content_inputs,
        "headroom_mib": headroom,
        "e2fsprogs": ext4.version_text(),
        "mke2fs_input": ext4.method(),
    }
    image = out_dir / f"{runtime}.ext4"
    found = Plan(
        pins, runtime, arch, frozen, closure, guest, guest_sha, epoch, headroom, content_inputs, inputs, stamp,
        base, out_dir, image, out_dir / f"{runtime}.manifest.json", out_dir / f"{runtime}.spdx.json",
    )  # fmt: skip
    return found, stamps.outdated(stamp, inputs, base)


def _done(p: Plan) -> str:
    return f"rootfs {p.runtime} ({p.arch}): up to date: {p.image.relative_to(p.base)}"


def build(pins: Pins, runtime: str, arch: str, frozen: bool) -> Path:
    found = plan(pins, runtime, arch, frozen)
    assert found is not None  # only a dry plan can be None
    p, why = found
    if why is None:
        log.info(_done(p))
        return p.image
    log.info(f"rootfs {runtime} ({arch}): {why}")
    from .make import make

    return make(p)


def _parser() -> argparse.ArgumentParser:
    p = cli.parser("rootfs-RUNTIME", "Build the ext4 root filesystem image of one runtime (or all) into images/.")
    p.add_argument("--runtime", action="append", help="runtime from pins.json alpine.runtimes (repeatable)")
    p.add_argument("--all", action="store_true", help="every runtime in pins.json")
    return p


def _runtimes(pins: Pins, args: argparse.Namespace) -> list[str]:
    return list(pins.alpine.runtimes) if args.all or not args.runtime else list(args.runtime)


def up_to_date(argv: list[str]) -> str | None:
    """For the noxfile's in-process check: the log lines if nothing is to be done, else None."""
    args = _parser().parse_args(argv)
    pins = load_pins()
    lines = []
    for rt in _runtimes(pins, args):
        found = plan(pins, rt, args.arch, args.frozen, dry=True)
        if found is None or found[1] is not None:
            return None
        lines.append(_done(found[0]))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    pins = load_pins()
    args = _parser().parse_args(argv)
    for rt in _runtimes(pins, args):
        build(pins, rt, args.arch, args.frozen)
    return 0
