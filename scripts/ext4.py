"""Writes ext4 images from a tar stream with e2fsprogs, without mount, loop device or root.

Preferred: ``mke2fs -d rootfs.tar`` (e2fsprogs >= 1.47.1, which reads tar through libarchive,
loaded at run time, and honours SOURCE_DATE_EPOCH): the image bytes depend only on the tar,
the size, the UUID/hash seed and our mke2fs.conf, so it is bit-identical on any host.
Fallback for older e2fsprogs (Debian 12 and Ubuntu 24.04 ship 1.47.0): extract the same
stream into a staging directory (as root, or under fakeroot) and ``mke2fs -d DIR``; that
image is correct but not guaranteed bit-identical across hosts (timestamps, directory order).

Features are pinned in our own mke2fs.conf (never the host's /etc/mke2fs.conf), without
``orphan_file`` and ``metadata_csum_seed``, which 5.10 guest kernels cannot mount read-write.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from . import log
from .errors import BuildError, ToolMissing
from .run import minimal_env, run, which

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


@lru_cache(maxsize=1)
def e2fsprogs_version() -> tuple[int, int, int]:
    proc = subprocess.run([which("mke2fs"), "-V"], capture_output=True, text=True)
    m = re.search(r"mke2fs (\d+)\.(\d+)(?:\.(\d+))?", proc.stderr + proc.stdout)
    if not m:
        raise ToolMissing("cannot tell the version of mke2fs", hint="install e2fsprogs >= 1.47.1")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def version_text() -> str:
    return ".".join(map(str, e2fsprogs_version()))


def method() -> str:
    """``tar`` (reproducible) or ``dir`` (staging directory); VULCAN_MKE2FS_INPUT forces one."""
    forced = os.environ.get("VULCAN_MKE2FS_INPUT")
    if forced in ("tar", "dir"):
        return forced
    if forced:
        raise BuildError(f"VULCAN_MKE2FS_INPUT={forced!r}: expected 'tar' or 'dir'")
    return "tar" if e2fsprogs_version() >= TAR_INPUT_VERSION else "dir"


@dataclass(frozen=True)
class Layout:
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


def _mke2fs_args(source: Path, image: Path, lay: Layout, uuid: str, hash_seed: str, label: str) -> list[str]:
    return [
        "mke2fs",
        "-q",
        "-F",
        "-t",
        "ext4",
        "-b",
        str(BLOCK),
        "-I",
        str(INODE_SIZE),
        "-N",
        str(lay.inodes),
        "-L",
        label,
        "-U",
        uuid,
        "-E",
        f"hash_seed={hash_seed},root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0",
        "-O",
        "^orphan_file,^metadata_csum_seed",
        "-d",
        str(source),
        str(image),
        f"{lay.size_bytes // 1024}k",
    ]


def make_image(tar: Path, image: Path, lay: Layout, uuid: str, hash_seed: str, epoch: int, label: str) -> str:
    """Write ``image`` from the tar stream; return the method used ("tar" or "dir")."""
    conf = image.with_name("mke2fs.conf")
    conf.write_text(MKE2FS_CONF)
    env = minimal_env(MKE2FS_CONFIG=str(conf), SOURCE_DATE_EPOCH=str(epoch), E2FSPROGS_FAKE_TIME=str(epoch))
    with open(image, "wb") as f:  # sparse: only written blocks take space
        f.truncate(lay.size_bytes)
    how = method()
    if how == "tar":
        run(_mke2fs_args(tar, image, lay, uuid, hash_seed, label), env=env)
        return how
    staging = image.with_name("staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    args = _mke2fs_args(staging, image, lay, uuid, hash_seed, label)
    helper = [sys.executable, "-m", "scripts.ext4", "stage", str(tar), str(staging), "--", *args]
    if os.getuid() == 0:
        run(helper, env={**env, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    else:
        try:
            which("fakeroot")
        except ToolMissing:
            raise ToolMissing(
                f"e2fsprogs {version_text()} cannot read tar (needs >= 1.47.1), and the staging-directory "
                "fallback needs root or fakeroot to keep file owners",
                hint="install e2fsprogs >= 1.47.1 (Debian 12: bookworm-backports) or fakeroot",
            ) from None
        run(["fakeroot", "--", *helper], env={**env, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    shutil.rmtree(staging, ignore_errors=True)
    return how


def fsck(image: Path) -> None:
    proc = subprocess.run([which("e2fsck"), "-fn", str(image)], capture_output=True, text=True, env=minimal_env())
    if proc.returncode != 0:
        raise BuildError(f"e2fsck -fn {image.name} found problems:\n{proc.stdout[-2000:]}{proc.stderr[-1000:]}")


def _stage(tar_path: str, dest: str, mke2fs: list[str]) -> int:
    """Inside root/fakeroot: extract our (already validated) stream, then run mke2fs."""
    import tarfile  # the fallback path only

    root = os.path.realpath(dest)
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            parent = os.path.realpath(os.path.join(root, os.path.dirname(member.name)))
            if parent != root and not parent.startswith(root + os.sep):
                raise SystemExit(f"refusing {member.name}: outside the staging directory")
            # our own, already validated stream (filter= exists from Python 3.11.4 on)
            extra = {"filter": "fully_trusted"} if hasattr(tarfile, "data_filter") else {}
            tar.extract(member, root, numeric_owner=True, **extra)  # type: ignore[arg-type]
            for key, value in member.pax_headers.items():
                if key.startswith("SCHILY.xattr."):
                    try:
                        os.setxattr(
                            os.path.join(root, member.name),
                            key[len("SCHILY.xattr.") :],
                            value.encode("utf-8", "surrogateescape"),
                            follow_symlinks=False,
                        )
                    except OSError as exc:
                        log.warn(f"{member.name}: cannot set xattr {key}: {exc}")
    return subprocess.call([which(mke2fs[0]), *mke2fs[1:]])


if __name__ == "__main__":
    if len(sys.argv) > 4 and sys.argv[1] == "stage" and sys.argv[4] == "--":
        sys.exit(_stage(sys.argv[2], sys.argv[3], sys.argv[5:]))
    sys.exit("usage: python -m scripts.ext4 stage TAR DIR -- mke2fs ARGS")


# -- reading images without mounting them (debugfs) -------------------------------------------


@dataclass(frozen=True)
class Inode:
    kind: str  # regular, directory, symlink, character special, block special, FIFO, socket
    mode: int
    uid: int
    gid: int
    size: int
    links: int
    target: str  # symlink destination


_STAT_RE = re.compile(r"Type: (.+?)\s+Mode:\s+(\d+)")
_OWNER_RE = re.compile(r"User:\s+(\d+)\s+Group:\s+(\d+).*?Size: (\d+)")
_LINKS_RE = re.compile(r"Links: (\d+)")
_FAST_LINK_RE = re.compile(r'Fast link dest: "(.*)"')


def _quote(path: str) -> str:
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def stat_many(image: Path, paths: list[str]) -> dict[str, Inode | None]:
    """``stat`` every path in one debugfs process (None: not in the image)."""
    if not paths:
        return {}
    script = image.with_name(f".{image.name}.debugfs")
    script.write_text("".join(f"stat {_quote('/' + p.lstrip('/'))}\n" for p in paths))
    try:
        proc = subprocess.run(
            [which("debugfs"), "-f", str(script), str(image)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=minimal_env(),
        )
    finally:
        script.unlink(missing_ok=True)
    text = proc.stdout.decode("utf-8", "surrogateescape")
    blocks = text.split("\ndebugfs: stat ")[1:]
    out: dict[str, Inode | None] = {}
    for path, block in zip(paths, blocks, strict=False):
        m, o = _STAT_RE.search(block), _OWNER_RE.search(block)
        if not m or not o:
            out[path] = None
            continue
        links = _LINKS_RE.search(block)
        fast = _FAST_LINK_RE.search(block)
        out[path] = Inode(
            m.group(1).strip(),
            int(m.group(2), 8),
            int(o.group(1)),
            int(o.group(2)),
            int(o.group(3)),
            int(links.group(1)) if links else 0,
            fast.group(1) if fast else "",
        )
    for path in paths[len(blocks) :]:
        out[path] = None
    return out


def cat(image: Path, path: str) -> bytes:
    """A file's bytes (``debugfs cat``); slow symlink targets are read the same way."""
    proc = subprocess.run(
        [which("debugfs"), "-R", f"cat {_quote('/' + path.lstrip('/'))}", str(image)],
        capture_output=True,
        env=minimal_env(),
    )
    return proc.stdout
