"""What one runtime's images are built from, decided once: the single source of truth.

A Plan holds the locked closure and everything derived from it (epoch, stream digest, stamp
inputs). Whoever changes the closure (a re-lock after a package left the mirror) makes a new
Plan: nothing downstream recomputes any of it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import TOOL_VERSION, paths, settings, stamps
from ..apk import lockfile
from ..apk.lockfile import Locked
from ..errors import BuildError, PinError, SettingError
from ..formats import Format, Writer
from ..formats import get as get_format
from ..hashing import sha256_file
from ..pins import Pins, Runtime
from ..step import Check, Unsure


def source_date_epoch(closure: list[Locked], formats: tuple[Format, ...] = ()) -> int:
    """SOURCE_DATE_EPOCH, else the newest package's build time; at most what every format of
    the image can store (squashfs: 2038-01-19, through tar2sqfs)."""
    env = settings.source_date_epoch()
    epoch = env if env is not None else max((p.build_time for p in closure), default=0)
    for w in formats:
        if epoch > w.max_epoch:
            source = f"SOURCE_DATE_EPOCH={env}" if env is not None else f"the newest package's build time {epoch}"
            raise SettingError(
                f"{source}: later than {w.name} images can store (at most {w.max_epoch})",
                hint=f"set SOURCE_DATE_EPOCH to at most {w.max_epoch}, or leave {w.name} out of alpine.formats",
            )
    return epoch


@dataclass(frozen=True)
class Output:
    """One image file of the plan, in one format."""

    fmt: Format
    image: Path

    @property
    def format(self) -> str:
        return self.fmt.name

    @property
    def writer(self) -> Writer:
        return self.fmt.writer


@dataclass(frozen=True)
class Plan:
    """What an image is built from, and where it goes."""

    pins: Pins
    runtime: str
    arch: str
    frozen: bool
    closure: list[Locked]
    guest: Path
    guest_sha: str
    epoch: int
    headroom_mib: int
    content_inputs: dict[str, Any]  # what the image's bytes depend on (keys the stream cache)
    inputs: dict[str, Any]  # the stamp's inputs: content + sizing + tool versions
    stamp: Path
    base: Path
    out_dir: Path
    outputs: tuple[Output, ...]
    manifest: Path
    spdx: Path

    @property
    def rt(self) -> Runtime:
        return self.pins.alpine.runtimes[self.runtime]

    @property
    def what(self) -> str:
        return f"rootfs {self.runtime} ({self.arch})"

    @property
    def stream_digest(self) -> str:
        return hashlib.sha256(json.dumps([TOOL_VERSION, self.content_inputs], sort_keys=True).encode()).hexdigest()

    @property
    def base_digest(self) -> str:
        """The stream's inputs but the agent: streams that differ only in the agent share it."""
        rest = {k: v for k, v in self.content_inputs.items() if k != "guest_sha256"}
        return hashlib.sha256(json.dumps([TOOL_VERSION, rest], sort_keys=True).encode()).hexdigest()

    @property
    def lock_sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.content_inputs["packages"]).encode()).hexdigest()

    def files(self) -> list[Path]:
        return [*(o.image for o in self.outputs), self.manifest, self.spdx]


def make_plan(pins: Pins, runtime: str, arch: str, frozen: bool, closure: list[Locked]) -> Plan:
    alpine = pins.alpine
    rt = alpine.runtimes[runtime]
    base = paths.out_root()
    out_dir = paths.images_dir(arch)
    guest = paths.agent(arch)
    if not guest.is_file():
        raise BuildError(f"{guest} is missing", hint=f"run 'nox -s guest -- --arch {arch}' first")
    guest_sha = sha256_file(guest)
    formats = alpine.formats_of(runtime)
    outputs = tuple(Output(get_format(f), paths.image(runtime, f, arch)) for f in formats)
    epoch = source_date_epoch(closure, tuple(o.fmt for o in outputs))
    headroom = rt.headroom_mib if rt.headroom_mib is not None else alpine.headroom_mib
    content_inputs = {
        "arch": arch,
        "runtime": {"world": list(rt.world), "check": list(rt.check), "binary": rt.binary},
        "alpine": {"branch": alpine.branch, "repositories": list(alpine.repositories), "base": list(alpine.base)},
        "packages": [f"{p.name}-{p.version} {p.checksum}" for p in closure],
        "keys": sorted(k.sha256 for k in alpine.keys),
        "guest_sha256": guest_sha,
        "source_date_epoch": epoch,
    }
    inputs: dict[str, Any] = {**content_inputs, "headroom_mib": headroom}
    for o in outputs:
        inputs.update(o.writer.tool_inputs())
    return Plan(
        pins, runtime, arch, frozen, closure, guest, guest_sha, epoch, headroom, content_inputs, inputs,
        paths.stamp_path(out_dir, f"rootfs-{runtime}"), base, out_dir, outputs,
        paths.manifest(runtime, arch), paths.sbom(runtime, arch),
    )  # fmt: skip


def check(pins: Pins, runtime: str, arch: str, frozen: bool, dry: bool) -> Check:
    """The plan and why its outputs are out of date. ``dry`` never resolves or writes the lock."""
    alpine = pins.alpine
    if runtime not in alpine.runtimes:
        raise PinError(
            f"unknown runtime {runtime!r}",
            hint=f"runtimes in {pins.path.name}: {', '.join(alpine.runtimes)} (add one under alpine.runtimes)",
        )
    if dry:
        closure = lockfile.locked_entry(pins, runtime, arch)
        if closure is None:
            raise Unsure("the lock has no fresh entry")
    else:
        closure = lockfile.ensure_locked(pins, runtime, arch, frozen)
    plan = make_plan(pins, runtime, arch, frozen, closure)
    why = stamps.outdated(plan.stamp, plan.inputs, plan.base)
    return Check(plan.what, plan.stamp, plan.inputs, plan.files(), why, plan.base, plan)
