"""Reads squashfs images without mounting them (sqfs2tar, rdsquashfs): stat, cat and unpack.

The same three calls as debugfs.py, so verify.py reads either format the same way.
"""

from __future__ import annotations

import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .debugfs import Inode
from .errors import ToolFailed
from .run import minimal_env, run_tool, which

_KINDS = {
    tarfile.REGTYPE: "regular",
    tarfile.AREGTYPE: "regular",
    tarfile.LNKTYPE: "regular",
    tarfile.DIRTYPE: "directory",
    tarfile.SYMTYPE: "symlink",
    tarfile.CHRTYPE: "character special",
    tarfile.BLKTYPE: "block special",
    tarfile.FIFOTYPE: "FIFO",
}


@dataclass(frozen=True)
class Entry:
    """One path as the image stores it (what a test compares with the ext4 image)."""

    path: str
    inode: Inode
    devices: tuple[int, int]
    xattrs: tuple[tuple[str, str], ...]
    hardlink_to: str  # the first path of its hard-link group, "" if none


def _name(tar_name: str) -> str:
    """A tar member's path as the image's (``./usr/bin`` -> ``usr/bin``; ``.vulcan`` stays)."""
    return tar_name.removeprefix("./").strip("/")


def entries(image: Path) -> dict[str, Entry]:
    """Every path in the image, with owners, modes, sizes, link targets, devices and xattrs."""
    proc = subprocess.Popen([which("sqfs2tar"), str(image)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=minimal_env())  # fmt: skip
    assert proc.stdout is not None
    out: dict[str, Entry] = {}
    sizes: dict[str, int] = {}
    links: dict[str, int] = {}
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            members = list(tar)
    except tarfile.TarError as exc:
        proc.kill()
        proc.wait()
        raise ToolFailed(f"sqfs2tar cannot read {image}: {exc}") from None
    for m in members:
        path = _name(m.name)
        size = sizes.get(_name(m.linkname), 0) if m.islnk() else m.size
        if m.isreg():
            sizes[path] = m.size
        target = _name(m.linkname) if m.islnk() else ""
        key = target or path
        links[key] = links.get(key, 0) + 1
        xattrs = tuple(sorted((k[len("SCHILY.xattr.") :], v) for k, v in m.pax_headers.items()
                              if k.startswith("SCHILY.xattr.")))  # fmt: skip
        inode = Inode(_KINDS.get(m.type, "unknown"), m.mode, m.uid, m.gid, size, 1,
                      m.linkname if m.issym() else "")  # fmt: skip
        out[path] = Entry(path, inode, (m.devmajor, m.devminor), xattrs, target)
    err = proc.stderr.read() if proc.stderr else b""
    if proc.wait() != 0:
        raise ToolFailed(f"sqfs2tar {image} failed: {err.decode(errors='replace')[-500:]}")
    for e in out.values():  # link counts, as stat reports them
        n = links.get(e.hardlink_to or e.path, 1)
        if e.inode.kind == "regular" and n > 1:
            out[e.path] = Entry(e.path, Inode(**{**e.inode.__dict__, "links": n}), e.devices, e.xattrs, e.hardlink_to)
    return out


def stat_many(image: Path, paths: list[str]) -> dict[str, Inode | None]:
    found = entries(image)
    return {p: (found[p].inode if p in found else None) for p in paths}


def cat(image: Path, path: str) -> bytes:
    proc = run_tool(["rdsquashfs", "-c", "/" + path.lstrip("/"), image], quiet=True, env=minimal_env(), check=False)
    return proc.stdout if proc.returncode == 0 else b""


def rdump(image: Path, dirs: list[str], root: Path) -> list[str]:
    """Unpack each directory of ``dirs`` to ``root/<dir>`` in one pass over the image; returns
    the ones that did not arrive. (squashfs-tools-ng 1.2.0 fails to unpack some subdirectories
    on their own: rdsquashfs -u /lib, sqfs2tar -d lib: "invalid argument"; so the whole image's
    tar stream is filtered.)"""
    wanted = [d.strip("/") for d in dirs]
    found: set[str] = set()

    def inside(name: str) -> str | None:
        return next((d for d in wanted if name.startswith(d + "/")), None)

    proc = subprocess.Popen([which("sqfs2tar"), str(image)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=minimal_env())  # fmt: skip
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for m in tar:
                m.name = _name(m.name)
                top = inside(m.name)
                if top is None:
                    continue
                if m.islnk():
                    m.linkname = _name(m.linkname)
                    if inside(m.linkname) is None:
                        continue
                tar.extract(m, root, filter="tar")  # our own image; "tar" keeps paths inside root
                found.add(top)
    except (tarfile.TarError, OSError):
        proc.kill()
        found.clear()
    finally:
        proc.wait()
    return [d for d in dict.fromkeys(wanted) if d not in found or proc.returncode != 0]
