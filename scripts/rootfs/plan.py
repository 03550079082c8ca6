"""What one runtime's images are built from, decided once: the single source of truth.

A Plan holds the locked closure and everything derived from it (epoch, stream digest, stamp
inputs). Whoever changes the closure (a re-lock after a package left the mirror) makes a new
Plan: nothing downstream recomputes any of it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .. import TOOL_VERSION, paths, settings, stamps
from ..apk import lockfile
from ..apk.lockfile import Locked
from ..errors import BuildError, SettingError, UsageError
from ..formats import Format, Writer, Written
from ..formats import get as get_format
from ..hashing import sha256_file
from ..pins import Pins, Runtime
from ..step import Check, Unsure

if TYPE_CHECKING:
    from ..template.source import LockedImage


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


class Output(NamedTuple):
    """One image file of the plan, in one format."""

    fmt: Format
    image: Path

    @property
    def format(self) -> str:
        return self.fmt.name

    @property
    def writer(self) -> Writer:
        return self.fmt.writer


class Image(NamedTuple):
    """One image as built: its output (format, path), what its writer wrote, and its sha256."""

    output: Output
    written: Written
    sha256: str

    @property
    def format(self) -> str:
        return self.output.format


class Plan:
    """What an image is built from (pins, runtime, arch, the locked closure) and everything
    derived from it, computed once: where it goes, the agent and its sha256, the epoch, the
    stream's and the stamp's inputs."""

    def __init__(self, pins: Pins, runtime: str, arch: str, frozen: bool, closure: list[Locked],
                 image: LockedImage | None = None) -> None:  # fmt: skip
        self.pins, self.runtime, self.arch, self.frozen, self.closure = pins, runtime, arch, frozen, closure
        self.image = image  # a template's image (its closure is empty)

    @property
    def rt(self) -> Runtime:
        return self.pins.alpine.runtimes[self.runtime]

    @property
    def what(self) -> str:
        return f"rootfs {self.runtime} ({self.arch})"

    @property
    def guest(self) -> Path:
        return paths.agent(self.arch)

    @functools.cached_property
    def guest_sha(self) -> str:
        if not self.guest.is_file():
            raise BuildError(f"{self.guest} is missing", hint=f"run 'nox -s guest -- --arch {self.arch}' first")
        return sha256_file(self.guest)

    @functools.cached_property
    def outputs(self) -> tuple[Output, ...]:
        formats = self.pins.alpine.formats_of(self.runtime)
        return tuple(Output(get_format(f), paths.image(self.runtime, f, self.arch)) for f in formats)

    @functools.cached_property
    def epoch(self) -> int:
        if self.image is not None:
            return template_epoch(self.image, tuple(o.fmt for o in self.outputs))
        return source_date_epoch(self.closure, tuple(o.fmt for o in self.outputs))

    @property
    def headroom_mib(self) -> int:
        own = self.rt.headroom_mib
        return own if own is not None else self.pins.alpine.headroom_mib

    @functools.cached_property
    def content_inputs(self) -> dict[str, Any]:
        """What the image's bytes depend on (keys the stream cache)."""
        alpine, rt = self.pins.alpine, self.rt
        if self.image is not None:
            return {
                "arch": self.arch,
                "runtime": {"check": list(rt.check), "binary": rt.binary},
                "image": {"reference": self.image.reference, "manifest": self.image.manifest,
                          "config": self.image.config, "layers": [x.digest for x in self.image.layers]},
                "guest_sha256": self.guest_sha,
                "source_date_epoch": self.epoch,
            }  # fmt: skip
        return {
            "arch": self.arch,
            "runtime": {"world": list(rt.world), "check": list(rt.check), "binary": rt.binary},
            "alpine": {"branch": alpine.branch, "repositories": list(alpine.repositories), "base": list(alpine.base)},
            **self._extra_inputs(),
            "packages": [f"{p.name}-{p.version} {p.checksum}" + (f" @{p.tag}" if p.tag else "") for p in self.closure],
            "keys": sorted(k.sha256 for k in alpine.keys),
            "guest_sha256": self.guest_sha,
            "source_date_epoch": self.epoch,
        }

    def _extra_inputs(self) -> dict[str, Any]:
        """Extra repositories: their /etc/apk/repositories lines and keys are in the image (absent
        without any, so the stream cache of pins without extra repositories stays valid)."""
        alpine = self.pins.alpine
        extra = alpine.extra_repositories + self.rt.extra_repositories
        if not extra:
            return {}
        return {
            "extra_repositories": [r.line for r in extra],
            "extra_keys": sorted(f"{k.name} {k.sha256}" for r in extra for k in r.keys),
        }

    @functools.cached_property
    def inputs(self) -> dict[str, Any]:
        """The stamp's inputs: content, sizing and the writers' tool versions."""
        inputs: dict[str, Any] = {**self.content_inputs, "headroom_mib": self.headroom_mib}
        for o in self.outputs:
            inputs.update(o.writer.tool_inputs())
        return inputs

    @property
    def base(self) -> Path:
        return paths.out_root()

    @property
    def out_dir(self) -> Path:
        return paths.images_dir(self.arch)

    @property
    def stamp(self) -> Path:
        return paths.stamp_path(self.out_dir, f"rootfs-{self.runtime}")

    @property
    def manifest(self) -> Path:
        return paths.manifest(self.runtime, self.arch)

    @property
    def spdx(self) -> Path:
        return paths.sbom(self.runtime, self.arch)

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
        if self.image is not None:
            return hashlib.sha256(json.dumps(self.image.to_json(), sort_keys=True).encode()).hexdigest()
        return hashlib.sha256(json.dumps(self.content_inputs["packages"]).encode()).hexdigest()

    def files(self) -> list[Path]:
        return [*(o.image for o in self.outputs), self.manifest, self.spdx]

    def check(self, why: str | None) -> Check[Plan]:
        return Check(self.what, self.stamp, self.inputs, self.files(), why, self.base, self)


def template_epoch(image: LockedImage, formats: tuple[Format, ...]) -> int:
    """SOURCE_DATE_EPOCH, else the image config's ``created`` (at most what every format stores)."""
    env = settings.source_date_epoch()
    epoch = env if env is not None else image.created
    for w in formats:
        if epoch > w.max_epoch:
            raise SettingError(f"{'SOURCE_DATE_EPOCH' if env is not None else 'the image config created'} {epoch}: "
                               f"later than {w.name} images can store (at most {w.max_epoch})",
                               hint=f"set SOURCE_DATE_EPOCH to at most {w.max_epoch}")  # fmt: skip
    return epoch


def make_plan(pins: Pins, runtime: str, arch: str, frozen: bool, closure: list[Locked],
              image: LockedImage | None = None) -> Plan:  # fmt: skip
    """A Plan, its derived parts computed now: a missing agent or an epoch no format can store
    is said before anything is built."""
    plan = Plan(pins, runtime, arch, frozen, closure, image)
    plan.inputs  # noqa: B018 - computes guest_sha, epoch and the tool versions, raising what is wrong
    return plan


def check(pins: Pins, runtime: str, arch: str, frozen: bool, dry: bool) -> Check[Plan]:
    """The plan and why its outputs are out of date. ``dry`` never resolves or writes the lock."""
    alpine = pins.alpine
    if runtime not in alpine.runtimes:
        raise UsageError(
            f"unknown runtime {runtime!r}",
            hint=f"runtimes in {pins.path.name}: {', '.join(alpine.runtimes)} (add one under alpine.runtimes)",
        )
    if alpine.runtimes[runtime].image is not None:
        from ..template import lock as template_lock

        image = template_lock.locked(pins, runtime, arch) if dry else template_lock.ensure(pins, runtime, arch, frozen)
        if image is None:
            raise Unsure("the lock has no fresh entry")
        plan = make_plan(pins, runtime, arch, frozen, [], image)
        return plan.check(stamps.outdated(plan.stamp, plan.inputs, plan.base))
    if dry:
        closure = lockfile.locked_entry(pins, runtime, arch)
        if closure is None:
            raise Unsure("the lock has no fresh entry")
    else:
        closure = lockfile.ensure_locked(pins, runtime, arch, frozen)
    plan = make_plan(pins, runtime, arch, frozen, closure)
    return plan.check(stamps.outdated(plan.stamp, plan.inputs, plan.base))
