"""Image formats: one ``Format`` record each, the only place that knows a format by name.

A record says everything the rest of the tool asks of a format: its writer (turns the normalised
tar stream into an image file) and its reader (stat, cat and copy out, without mounting), the
kernel options a guest needs to mount it, the name of its deep check in ``verify``'s table, the
latest timestamp it stores, and whether a VM may write it in place (otherwise it is booted
read-only, under an overlay). One module per writer and per reader in this package; adding a
format (EROFS, say) is one writer module, one reader module and one line in ``FORMATS``. The
rootfs build, verify, boot and the kernel check ask the record; none of them names a format.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol, cast


class Shape(NamedTuple):
    """What the tar stream holds, as far as sizing an image needs (recomputed from the tar)."""

    file_blocks: int  # 4 KiB blocks of regular-file data
    dirs: int
    entries: int
    content_bytes: int


class Job(NamedTuple):
    tar: Path
    seed: str  # the file system's UUID and hash seed derive from it: the stream's inputs (Plan.stream_digest)
    shape: Shape
    epoch: int
    label: str
    headroom_mib: int


class Written(NamedTuple):
    size: int  # the image file's size in bytes
    reproducible: bool  # bit-identical on any host
    manifest: Mapping[str, Any] = MappingProxyType({})  # format-specific manifest fields


class Inode(NamedTuple):
    """One path of an image as its reader reports it (the same for every format)."""

    kind: str  # regular, directory, symlink, character special, block special, FIFO, socket
    mode: int
    uid: int
    gid: int
    size: int
    links: int
    target: str  # symlink destination


class Writer(Protocol):
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


class Reader(Protocol):  # a reader module's three functions
    def stat_many(self, image: Path, paths: list[str]) -> dict[str, Inode | None]:
        """Every path's inode (None: not in the image), in one pass where the tool allows."""
        ...

    def cat(self, image: Path, path: str) -> bytes:
        """A file's bytes (b"" when it is not there)."""
        ...

    def rdump(self, image: Path, dirs: list[str], root: Path) -> list[str]:
        """Copy each directory out to ``root/<dir>``; returns those that did not arrive."""
        ...

    def digests(self, image: Path, paths: set[str]) -> dict[str, str]:
        """The sha256 (hex) of each of ``paths`` that is a regular file in the image (a hard
        link's is its target's), in one pass; a path that is not there, or not a file, is left out."""
        ...


class Format(NamedTuple):
    name: str  # the file suffix, the manifest's "format" and the kernel's rootfstype=
    writer_module: str  # scripts.formats.<module>, exporting WRITER
    reader_module: str  # scripts.formats.<module>: stat_many(), cat(), rdump(), digests() (the Reader protocol)
    kernel_needs: tuple[str, ...]  # CONFIG_ options built in (=y: no initramfs to load modules from)
    check_name: str  # what verify's table calls the writer's deep check
    writable: bool  # a VM may write the image (a copy of it); else it is booted read-only + overlay
    max_epoch: int  # the latest timestamp (SOURCE_DATE_EPOCH) its writer stores
    sparse: bool = False  # mostly holes, uncompressed: it travels compressed (publish) and lands sparse (pull)

    @property
    def writer(self) -> Writer:
        w: Writer = importlib.import_module(f"{__package__}.{self.writer_module}").WRITER
        return w

    @property
    def reader(self) -> Reader:
        return cast(Reader, importlib.import_module(f"{__package__}.{self.reader_module}"))


# What a read-only root needs besides its own format: the writable layer on top (overlay-init)
OVERLAY_NEEDS = ("OVERLAY_FS", "TMPFS")

FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        # 256-byte inodes keep extra epoch bits; 2106 is what tar and every other part store
        Format("ext4", "ext4", "ext4_read", ("EXT4_FS",), "e2fsck -fn", writable=True, max_epoch=2**32 - 1,
               sparse=True),
        # squashfs stores u32 mtimes, but tar2sqfs (1.2) reads the root's "-d mtime=" as a signed
        # 32-bit number: "mtime: value too large" from 2038-01-19 on
        Format("squashfs", "squashfs", "squashfs_read", ("SQUASHFS", "SQUASHFS_ZSTD"), "sqfs2tar reads it all",
               writable=False, max_epoch=2**31 - 1),
    )
}  # fmt: skip
DEFAULT = ("ext4",)
NAMES = tuple(FORMATS)
# What a sandbox fleet shares: the first read-only format (every sandbox attaches the one image in
# place); snapshots are made of it unless told otherwise.
SHARED = next(f.name for f in FORMATS.values() if not f.writable)


def get(name: str) -> Format:
    return FORMATS[name]
