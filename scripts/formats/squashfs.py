"""Writes read-only squashfs images (zstd) from the same tar stream, with tar2sqfs.

tar2sqfs (squashfs-tools-ng, Debian 12: 1.2.0) reads the tar on stdin: no root, no mount, and
the image depends only on the stream and the options below, whatever the number of jobs
(measured: the same sha256 with -j 1 and -j 2). Owners, modes, symlinks, hard links, device
nodes and xattrs come from the tar; mtimes are the tar's (already clamped to the epoch); the
root directory, which the stream has no entry for, gets 0:0 0755 and the epoch, as in ext4.

Firecracker's 6.1 guest kernels (resources/guest_configs/ci.config, x86_64 and aarch64) set
SQUASHFS=y, SQUASHFS_ZSTD=y and OVERLAY_FS=y, and leave EROFS_FS unset: hence squashfs and not
EROFS (a third record in formats/__init__.py can add it). Reading images back: squashfs_read.py.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..background import once
from ..errors import BuildError, ToolFailed, ToolMissing
from ..run import minimal_env, run_tool
from . import Job, Written
from .squashfs_read import entries

COMPRESSOR = "zstd"
# Level and block size by measurement (2 cores, tar2sqfs -j 2, a 277 MB tar of a Python stdlib
# and a Go toolchain, i.e. what our runtimes hold; docs/performance.md):
#   zstd level, block:  3/128K 84.4 MB 0.8 s | 6/128K 78.9 MB 1.8 s | 9/128K 77.9 MB 2.5 s |
#   12/128K 77.5 MB 7.0 s | 15/128K 73.4 MB 13.5 s | 19/128K 72.8 MB 37 s | 19/1M 66.9 MB 41 s
# Level 6 is 6.5% smaller than 3 for one more second; beyond it each percent costs many seconds
# of every rebuild. 128 KiB blocks (squashfs's default): 1 MiB blocks are ~5% smaller, but then
# every small random read in a sandbox decompresses a whole MiB.
LEVEL = 6
BLOCK_SIZE = 131072
HINT = "install squashfs-tools-ng (Debian 12: apt-get install squashfs-tools-ng), or drop squashfs from alpine.formats"


@once
def version_text() -> str:
    try:
        proc = run_tool(["tar2sqfs", "--version"], quiet=True, check=False, merge_stderr=True)
    except ToolMissing:
        raise ToolMissing("tar2sqfs not found: squashfs images need it", hint=HINT) from None
    m = re.search(r"tar2sqfs \(\S+\) (\S+)", proc.stdout.decode(errors="replace"))
    return m.group(1) if m else "unknown"


def options(epoch: int) -> list[str]:
    return [
        "-q", "-f", "-s",  # quiet, overwrite, abort (not skip) on a tar record it cannot read
        "-c", COMPRESSOR, "-X", f"level={LEVEL}", "-b", str(BLOCK_SIZE), "-j", "2",
        "-d", f"uid=0,gid=0,mode=0755,mtime={epoch}",
    ]  # fmt: skip


class SquashfsWriter:
    def tool_inputs(self) -> dict[str, Any]:
        return {"tar2sqfs": version_text(), "squashfs": {"compressor": COMPRESSOR, "level": LEVEL, "block": BLOCK_SIZE}}

    def write(self, job: Job, image: Path) -> Written:
        version_text()  # a missing tar2sqfs is said with the install hint
        run_tool(["tar2sqfs", *options(job.epoch), image], stdin=job.tar, env=minimal_env())
        return Written(
            image.stat().st_size,
            True,
            {"squashfs": {"compressor": COMPRESSOR, "level": LEVEL, "block_size": BLOCK_SIZE,
                          "tar2sqfs": version_text(), "content_bytes": job.shape.content_bytes}},
        )  # fmt: skip

    def check(self, image: Path, deep: bool = False) -> None:
        """After a build: read every inode and directory back (``rdsquashfs -d`` walks the whole
        tree: what e2fsck -fn is for ext4; 15 ms). ``deep`` (verify): also decompress every
        block (sqfs2tar), since squashfs has no checksums of its own to catch a flipped byte: the
        reader's one pass over the image, which verify's stat_many() then reuses."""
        try:
            if deep:
                entries(image)
            else:
                run_tool(["rdsquashfs", "-d", image], quiet=True, env=minimal_env(), capture=False, stdout_null=True)
        except ToolFailed as exc:
            raise BuildError(f"{image.name} cannot be read back: {exc.message[-2000:]}") from None

    def room(self, job: Job) -> int:
        """Compressed file data, inode and directory tables: never more than the tar itself."""
        return job.tar.stat().st_size


WRITER = SquashfsWriter()
