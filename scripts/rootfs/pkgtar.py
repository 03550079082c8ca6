"""Reading a package's data tar: its members, as tarfile would read them, in a third of the time.

A package's data member is a pax (or ustar) tar as abuild and melange write it: regular files
(each with abuild's ``APK-TOOLS.checksum.SHA1`` pax record), directories, symbolic and hard
links, device nodes, FIFOs, xattrs as ``SCHILY.xattr.*``. ``members()`` reads exactly those and
gives what the merge reads of a ``tarfile.TarInfo`` (the same values: a test compares the two on
every real package); for anything else in a tar (GNU long names or sparse files, base-256
numbers, a header whose checksum is wrong, pax records it does not know) it raises ``Unusual``
and the caller reads that package with tarfile instead. The bytes were verified already (the
data member's sha256 is the package's ``datahash``): this only has to read them as tarfile does.
"""

from __future__ import annotations

import mmap
import tarfile
from pathlib import Path

from .tarwalk import pax_records

ZERO = b"\0" * 512
KNOWN_PAX = frozenset({"path", "linkpath", "size", "uid", "gid", "mtime", "atime", "ctime", "uname", "gname"})
TYPES = {b"0": tarfile.REGTYPE, b"\0": tarfile.REGTYPE, b"1": tarfile.LNKTYPE, b"2": tarfile.SYMTYPE,
         b"3": tarfile.CHRTYPE, b"4": tarfile.BLKTYPE, b"5": tarfile.DIRTYPE, b"6": tarfile.FIFOTYPE,
         b"7": tarfile.REGTYPE}  # fmt: skip


class Unusual(Exception):
    """Something this reader leaves to tarfile."""


class Member:
    """What the merge reads of a member (tarfile.TarInfo's names, so either can be merged).
    A plain class: the merge's records are not dataclasses (see docs/architecture.md)."""

    __slots__ = ("devmajor", "devminor", "gid", "linkname", "mode", "mtime", "name", "offset_data", "pax_headers",
                 "size", "type", "uid")  # fmt: skip

    def __init__(
        self, name: str, type: bytes, mode: int, uid: int, gid: int, mtime: float, size: int, linkname: str,
        devmajor: int, devminor: int, offset_data: int, pax_headers: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        self.name, self.type, self.mode, self.uid, self.gid, self.mtime = name, type, mode, uid, gid, mtime
        self.size, self.linkname, self.devmajor, self.devminor = size, linkname, devmajor, devminor
        self.offset_data, self.pax_headers = offset_data, pax_headers if pax_headers is not None else {}

    def __repr__(self) -> str:
        return f"Member({self.name!r}, {self.type!r}, size={self.size})"

    def isreg(self) -> bool:
        return self.type == tarfile.REGTYPE

    def isdir(self) -> bool:
        return self.type == tarfile.DIRTYPE

    def issym(self) -> bool:
        return self.type == tarfile.SYMTYPE

    def islnk(self) -> bool:
        return self.type == tarfile.LNKTYPE

    def ischr(self) -> bool:
        return self.type == tarfile.CHRTYPE

    def isblk(self) -> bool:
        return self.type == tarfile.BLKTYPE

    def isfifo(self) -> bool:
        return self.type == tarfile.FIFOTYPE


def _octal(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):
        raise Unusual("a base-256 number")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise Unusual("a number field that is not octal") from None


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax(data: bytes) -> dict[str, str]:
    try:
        records = pax_records(data)
    except ValueError:
        raise Unusual("a malformed pax record") from None
    for name in records:
        if name not in KNOWN_PAX and not name.startswith(("SCHILY.xattr.", "APK-TOOLS.")):
            raise Unusual(f"pax record {name}")
    return records


def _checksum_ok(header: bytes) -> bool:
    stored = _octal(header[148:156])
    unsigned = sum(header[:148]) + 256 + sum(header[156:])  # the checksum field counts as 8 spaces
    return stored == unsigned


def members(source: Path | bytes) -> list[Member]:
    """Every member of the tar at ``source`` (a file, or its bytes), in order (or ``Unusual``)."""
    if isinstance(source, bytes):
        return _members(source, len(source))
    with open(source, "rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            return []
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            return _members(m, size)


def _members(m: bytes | mmap.mmap, size: int) -> list[Member]:
    out: list[Member] = []
    pos = 0
    pax: dict[str, str] = {}
    while pos + 512 <= size:
        header = m[pos : pos + 512]
        if header == ZERO:
            break
        if not _checksum_ok(header):
            raise Unusual("a header checksum that does not match")
        kind = header[156:157]
        length = _octal(header[124:136])
        data = pos + 512
        if kind == b"x":
            if pax:
                raise Unusual("two pax headers in a row")
            pax = _pax(m[data : data + length])
            pos = data + (length + 511) // 512 * 512
            continue
        if kind not in TYPES:
            raise Unusual(f"member type {kind!r}")
        typ = TYPES[kind]
        name = _text(header[:100])
        if kind == b"\0" and name.endswith("/"):
            typ = tarfile.DIRTYPE  # as tarfile reads an old-style (V7) directory
        if typ == tarfile.DIRTYPE:
            name = name.rstrip("/")
        if prefix := _text(header[345:500]):
            name = f"{prefix}/{name}"
        linkname = _text(header[157:257])
        uid, gid, mtime = _octal(header[108:116]), _octal(header[116:124]), float(_octal(header[136:148]))
        if pax:
            name = pax["path"].rstrip("/") if "path" in pax else name
            linkname = pax.get("linkpath", linkname)
            try:
                length = int(pax.get("size", length))
                uid, gid = int(pax.get("uid", uid)), int(pax.get("gid", gid))
                mtime = float(pax.get("mtime", mtime))
            except ValueError:
                raise Unusual("a pax number that is not a number") from None
        devmajor = devminor = 0
        if typ in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            devmajor, devminor = _octal(header[329:337]), _octal(header[337:345])
        has_data = typ == tarfile.REGTYPE
        out.append(Member(name, typ, _octal(header[100:108]), uid, gid, mtime, length if has_data else 0,
                          linkname, devmajor, devminor, data, pax))  # fmt: skip
        pax = {}
        pos = data + ((length + 511) // 512 * 512 if has_data or kind == b"7" else 0)
    return out
