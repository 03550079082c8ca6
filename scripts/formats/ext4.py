"""Writes ext4 images from a tar stream with e2fsprogs, without mount, loop device or root.

Preferred: ``mke2fs -d rootfs.tar`` (e2fsprogs >= 1.47.1, which reads tar through libarchive,
loaded at run time, and honours SOURCE_DATE_EPOCH): the image bytes depend only on the tar,
the size, the UUID/hash seed and our mke2fs.conf, so it is bit-identical on any host.
Fallback for older e2fsprogs (Debian 12 and Ubuntu 24.04 ship 1.47.0): extract the same
stream into a staging directory (as root, or under fakeroot; ext4_stage.py) and
``mke2fs -d DIR``; that image is correct but not guaranteed bit-identical across hosts.

Features are pinned in our own mke2fs.conf (never the host's /etc/mke2fs.conf), without
``orphan_file`` and ``metadata_csum_seed``, which 5.10 guest kernels cannot mount read-write.
Reading images back (debugfs) is ext4_read.py.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, NamedTuple

from .. import settings
from ..background import once
from ..errors import BuildError, ToolFailed, ToolMissing
from ..run import minimal_env, run_tool, which
from . import Job, Written

BLOCK = 4096
INODE_SIZE = 256
MKE2FS_CONF = """\
# Pinned by vulcan-images: the host's /etc/mke2fs.conf must not change our images.
[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tdefault_mntopts = acl,user_xattr
\tenable_periodic_fsck = 0
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384
\treserved_ratio = 0

[fs_types]
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t}
\tsmall = {
\t\tinode_ratio = 16384
\t}
\tfloppy = {
\t\tinode_ratio = 16384
\t}
"""
TAR_INPUT_VERSION = (1, 47, 1)


@once
def e2fsprogs_version() -> tuple[int, int, int]:
    proc = run_tool(["mke2fs", "-V"], quiet=True, check=False, merge_stderr=True)
    m = re.search(r"mke2fs (\d+)\.(\d+)(?:\.(\d+))?", proc.stdout.decode(errors="replace"))
    if not m:
        raise ToolMissing("cannot tell the version of mke2fs", hint="install e2fsprogs >= 1.47.1")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def version_text() -> str:
    return ".".join(map(str, e2fsprogs_version()))


def method() -> str:
    """``tar`` (reproducible) or ``dir`` (staging directory); VULCAN_MKE2FS_INPUT forces one."""
    forced = settings.mke2fs_input()
    if forced:
        return forced
    return "tar" if e2fsprogs_version() >= TAR_INPUT_VERSION else "dir"


class Layout(NamedTuple):
    size_bytes: int
    inodes: int


def layout(file_blocks: int, dirs: int, entries: int, headroom_mib: int) -> Layout:
    """Image size: file data in whole blocks, a block per directory (more for big ones),
    inode tables and journal, plus headroom."""
    headroom = headroom_mib << 20
    inodes = entries + headroom // 16384 + 256
    inodes = (inodes + 255) // 256 * 256
    dir_blocks = dirs + (entries * 48) // BLOCK + 1  # ~48 bytes per directory entry
    meta = inodes * INODE_SIZE + dir_blocks * BLOCK
    data = file_blocks * BLOCK
    base = int((data + meta) * 1.04) + (4 << 20)  # bitmaps, group descriptors, slack
    blocks = (base + headroom) // BLOCK
    journal = 1024 if blocks < 32768 else 4096 if blocks < 262144 else 8192 if blocks < 524288 else 16384
    size = base + headroom + journal * BLOCK
    size = max(size, 16 << 20)
    return Layout((size + (1 << 20) - 1) >> 20 << 20, inodes)


def derived_uuid(seed: str, purpose: str) -> str:
    """A UUID from the stream's inputs (Job.seed): same pins, lock and agent -> same file system
    UUID and hash seed, known before the stream is written, so mke2fs need not wait for its hash."""
    raw = bytearray(hashlib.sha256(f"{purpose}:{seed}".encode()).digest()[:16])
    raw[6] = raw[6] & 0x0F | 0x40  # version 4 (what uuid.UUID(bytes=..., version=4) sets; the
    raw[8] = raw[8] & 0x3F | 0x80  # uuid module imports platform: 3 ms of every build's start)
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _mke2fs_args(source: Path, image: Path, lay: Layout, uuid: str, hash_seed: str, label: str) -> list[str]:
    return [
        "mke2fs", "-q", "-F", "-t", "ext4", "-b", str(BLOCK), "-I", str(INODE_SIZE), "-N", str(lay.inodes),
        "-L", label, "-U", uuid,
        "-E", f"hash_seed={hash_seed},root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0",
        "-O", "^orphan_file,^metadata_csum_seed",
        "-d", str(source), str(image), f"{lay.size_bytes // 1024}k",
    ]  # fmt: skip


def make_image(tar: Path, image: Path, lay: Layout, uuid: str, hash_seed: str, epoch: int, label: str) -> str:
    """Write ``image`` from the tar stream; return the method used ("tar" or "dir")."""
    conf = image.with_name("mke2fs.conf")
    conf.write_text(MKE2FS_CONF)
    # C.UTF-8 (glibc >= 2.35 always has it): libarchive converts a pax path or link name to the
    # locale's charset, and in plain C refuses non-ASCII ones (Debian's ca-certificates
    # has "NetLock_Arany_=Class_Gold=_Főtanúsítvány"); ASCII names give the same bytes either way.
    # Cost: mke2fs of a 2,906-entry tree, medians of 6 alternating runs, 380 ms in C, 386 in C.UTF-8
    env = minimal_env(MKE2FS_CONFIG=str(conf), SOURCE_DATE_EPOCH=str(epoch), E2FSPROGS_FAKE_TIME=str(epoch),
                      LC_ALL="C.UTF-8")  # fmt: skip
    with open(image, "wb") as f:  # sparse: only written blocks take space
        f.truncate(lay.size_bytes)
    how = method()
    if how == "tar":
        from .ext4_preload import preload

        fast = preload()  # the same bytes, sooner (ext4_preload.py); never under fakeroot's own LD_PRELOAD
        if fast:
            env = {**env, "LD_PRELOAD": ":".join(map(str, fast))}
        run_tool(_mke2fs_args(tar, image, lay, uuid, hash_seed, label), env=env)
        return how
    staging = image.with_name("staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    args = _mke2fs_args(staging, image, lay, uuid, hash_seed, label)
    helper = [sys.executable, "-m", f"{__package__}.ext4_stage", str(tar), str(staging), "--", *args]
    helper_env = {**env, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    if os.getuid() == 0:
        run_tool(helper, env=helper_env)
    else:
        try:
            which("fakeroot")
        except ToolMissing:
            raise ToolMissing(
                f"e2fsprogs {version_text()} cannot read tar (needs >= 1.47.1), and the staging-directory "
                "fallback needs root or fakeroot to keep file owners",
                hint="install e2fsprogs >= 1.47.1 (Debian 12: bookworm-backports) or fakeroot",
            ) from None
        run_tool(["fakeroot", "--", *helper], env=helper_env)
    shutil.rmtree(staging, ignore_errors=True)
    return how


def blank(path: Path, size: int) -> None:
    """An empty ext4 file system in a sparse file of ``size`` bytes (a read-only boot's upper
    layer), with the features every guest kernel mounts read-write."""
    with open(path, "wb") as f:
        f.truncate(size)
    run_tool(["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^orphan_file,^metadata_csum_seed", path],
             env=minimal_env(), quiet=True)  # fmt: skip


def fsck(image: Path) -> None:
    """e2fsck -fn, as e2fsprogs is (never with ext4_preload.py's helper: it judges what it wrote)."""
    try:
        run_tool(["e2fsck", "-fn", str(image)], env=minimal_env(), quiet=True, merge_stderr=True)
    except ToolFailed as exc:
        raise BuildError(f"e2fsck -fn {image.name} found problems:\n{exc.message[-3000:]}") from None


class Ext4Writer:
    def tool_inputs(self) -> dict[str, Any]:
        return {"e2fsprogs": version_text(), "mke2fs_input": method()}

    def write(self, job: Job, image: Path) -> Written:
        s = job.shape
        lay = layout(s.file_blocks, s.dirs, s.entries, job.headroom_mib)
        fs_uuid, hash_seed = derived_uuid(job.seed, "uuid"), derived_uuid(job.seed, "hash_seed")
        used = make_image(job.tar, image, lay, fs_uuid, hash_seed, job.epoch, job.label[:16])
        reproducible = used == "tar"
        return Written(
            lay.size_bytes,
            reproducible,
            {
                "filesystem": {"uuid": fs_uuid, "hash_seed": hash_seed, "inodes": lay.inodes,
                               "content_bytes": s.content_bytes},
                "e2fsprogs": version_text(),
                "mke2fs_input": "tar stream" if reproducible else "staging directory",
                "reproducible_note": "bit-identical on any host with e2fsprogs >= 1.47.1"
                if reproducible
                else f"e2fsprogs {version_text()} cannot read tar: built from a staging directory, so the image "
                "is not guaranteed bit-identical across hosts (the tar stream still is: see tar_sha256)",
            },
        )  # fmt: skip

    def check(self, image: Path, deep: bool = False) -> None:
        fsck(image)  # every inode, directory, bitmap and metadata checksum, build or verify

    def room(self, job: Job) -> int:
        s = job.shape
        return layout(s.file_blocks, s.dirs, s.entries, job.headroom_mib).size_bytes


WRITER = Ext4Writer()
