"""Image formats: what turns the normalised tar stream into an image file.

Every format is one writer module with the same shape (``Writer``); the rootfs build knows
formats only through it. ext4 (ext4.py) is the default. A second format (squashfs) is a
second module in ``WRITERS``, not a branch in the build.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

WRITERS = {"ext4": "ext4", "squashfs": "squashfs"}  # format name -> scripts.<module> exporting WRITER
READERS = {"ext4": "debugfs", "squashfs": "squashfs_read"}  # stat_many(), cat(), rdump() without mounting
DEFAULT = ("ext4",)


@dataclass(frozen=True)
class Shape:
    """What the tar stream holds, as far as sizing an image needs (recomputed from the tar)."""

    file_blocks: int  # 4 KiB blocks of regular-file data
    dirs: int
    entries: int
    content_bytes: int


@dataclass(frozen=True)
class Job:
    tar: Path
    tar_sha256: str
    shape: Shape
    epoch: int
    label: str
    headroom_mib: int


@dataclass(frozen=True)
class Written:
    size: int  # the image file's size in bytes
    reproducible: bool  # bit-identical on any host
    manifest: Mapping[str, Any] = field(default_factory=dict)  # format-specific manifest fields


class Writer(Protocol):
    name: str  # "ext4": the file suffix and the manifest's "format"
    max_epoch: int  # the latest timestamp (SOURCE_DATE_EPOCH) the writer can store

    def tool_inputs(self) -> dict[str, Any]:
        """What the image bytes depend on besides the stream (tool versions): stamp inputs."""
        ...

    def write(self, job: Job, image: Path) -> Written:
        """Write ``image`` (in scratch) from the stream; raise VulcanError on failure."""
        ...

    def check(self, image: Path, deep: bool = False) -> None:
        """Check a written image (fsck); raise BuildError naming the problem. ``deep`` (verify):
        also read every file's data where the format has no checksums of its own."""
        ...

    def room(self, job: Job) -> int:
        """At most how many bytes the image takes (to write it in RAM first when it fits)."""
        ...


def writer(name: str) -> Writer:
    module = importlib.import_module(f"{__package__}.{WRITERS[name]}")
    w: Writer = module.WRITER
    return w


def reader(name: str) -> ModuleType:
    """The module that reads an image of this format: stat_many(), cat(), rdump()."""
    return importlib.import_module(f"{__package__}.{READERS[name]}")
