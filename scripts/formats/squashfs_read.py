"""Reads squashfs images without mounting them (sqfs2tar, rdsquashfs): stat, cat and unpack.

The same three calls as ext4_read.py (the squashfs record's reader), so verify.py reads either
format the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ToolFailed
from ..run import minimal_env, run_tool, which
from . import Inode

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


# tarfile's "tar" filter (paths kept inside the destination, no setuid bits) exists from Python
# 3.11.4 on; Debian 12's 3.11.2 lacks it, so the names are also checked here before extracting.
EXTRACT: dict[str, Any] = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}


def _name(tar_name: str) -> str:
    """A tar member's path as the image's (``./usr/bin`` -> ``usr/bin``; ``.vulcan`` stays)."""
    return tar_name.removeprefix("./").strip("/")


@contextlib.contextmanager
def _tar_stream(image: Path) -> Iterator[tarfile.TarFile]:
    """sqfs2tar's tar stream of the whole image, read to its very end, with its stderr kept in a
    file: a full pipe on either side would have sqfs2tar wait for us while we wait for it (seen:
    a verify that hung after the end-of-archive blocks). ToolFailed if sqfs2tar fails."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([which("sqfs2tar"), str(image)], stdout=subprocess.PIPE, stderr=err,
                                env=minimal_env())  # fmt: skip
        assert proc.stdout is not None
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                yield tar
            while proc.stdout.read(1 << 16):  # what follows the end-of-archive blocks
                pass
        except BaseException:
            proc.kill()
            raise
        finally:
            proc.stdout.close()
            code = proc.wait()
        if code != 0:
            err.seek(0)
            raise ToolFailed(f"sqfs2tar {image} failed: {err.read().decode(errors='replace')[-500:]}")


def entries(image: Path) -> dict[str, Entry]:
    """Every path in the image, with owners, modes, sizes, link targets, devices and xattrs. The
    pass decompresses every block (sqfs2tar fails on a corrupt one): verify's deep check is this
    pass, and its stat_many() the same one, kept for the image as it is (device, inode, size, mtime)."""
    st = image.stat()
    key = (str(image), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _passes:
        _passes.clear()  # one image at a time is what verify reads
        _passes[key] = _entries(image)
    return _passes[key]


_passes: dict[tuple[str, int, int, int, int], dict[str, Entry]] = {}


def _entries(image: Path) -> dict[str, Entry]:
    out: dict[str, Entry] = {}
    sizes: dict[str, int] = {}
    links: dict[str, int] = {}
    try:
        with _tar_stream(image) as tar:
            members = list(tar)
    except tarfile.TarError as exc:
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
    for e in out.values():  # link counts, as stat reports them
        n = links.get(e.hardlink_to or e.path, 1)
        if e.inode.kind == "regular" and n > 1:
            out[e.path] = Entry(e.path, e.inode._replace(links=n), e.devices, e.xattrs, e.hardlink_to)
    return out


def digests(image: Path, paths: set[str]) -> dict[str, str]:
    """Every regular file is hashed: a wanted hard link's target comes before it in the stream,
    and may not be wanted itself."""
    out: dict[str, str] = {}
    with _tar_stream(image) as tar:
        for m in tar:
            name = _name(m.name)
            if m.islnk() and _name(m.linkname) in out:
                out[name] = out[_name(m.linkname)]
            elif m.isreg():
                f = tar.extractfile(m)
                out[name] = hashlib.file_digest(f, "sha256").hexdigest() if f else ""  # type: ignore[arg-type]
    return {p: d for p, d in out.items() if p in paths}


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

    try:
        with _tar_stream(image) as tar:
            for m in tar:
                m.name = _name(m.name)
                if m.name in wanted and m.isdir():  # there, even if empty (a node image's /usr/lib)
                    (root / m.name).mkdir(parents=True, exist_ok=True)
                    found.add(m.name)
                    continue
                top = inside(m.name)
                if top is None:
                    continue
                if m.islnk():
                    m.linkname = _name(m.linkname)
                    if inside(m.linkname) is None:
                        continue
                if m.name.startswith("/") or ".." in m.name.split("/"):
                    continue  # our own image has no such path; never written outside root
                tar.extract(m, root, **EXTRACT)
                found.add(top)
    except (tarfile.TarError, OSError, ToolFailed):
        found.clear()
    return [d for d in dict.fromkeys(wanted) if d not in found]
