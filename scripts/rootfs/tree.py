"""The merged root tree of an image, and its normalised tar stream (pure logic + scratch files).

Each package's data member is decompressed once (inflate.py: in memory, or into a scratch
tar); the tree keeps only metadata and where each file's bytes are. The output stream is
sorted by path, with owners, modes, links, device nodes and xattrs from the package tars
(never from the host) and mtimes clamped to SOURCE_DATE_EPOCH, so the same packages give the
same bytes.

Safety: entry names with ``..`` or a leading ``/`` are rejected, and so are entries whose
path goes through a symlink that leads out of the root; a path through a symlink that stays
inside is written where the link points, as apk would. Nothing from a package is ever
extracted onto the host file system.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, BinaryIO

from ..apk.package import CHUNK
from ..errors import BuildError
from . import pkgtar
from .inflate import Data

# A PAX header apk-tools writes per file: not file metadata, so it is not copied.
APK_CHECKSUM_PAX = "APK-TOOLS.checksum.SHA1"


class UnsafePackage(BuildError):
    """A package tries to write outside the image root."""

    exit_code = 6


class Node:
    """One path of the tree. Plain classes, here and below: the merge's records are not
    dataclasses, whose import and class building cost the assembly ~9 ms (docs/architecture.md)."""

    __slots__ = ("devmajor", "devminor", "gid", "kind", "linkname", "mode", "mtime", "owner", "path", "pkg", "sha1",
                 "size", "source", "uid", "xattrs")  # fmt: skip

    def __init__(
        self,
        path: str,  # "usr/bin/python3" (no leading "/" or "./")
        kind: str,  # file, dir, symlink, hardlink, char, block, fifo
        mode: int,
        uid: int = 0,
        gid: int = 0,
        mtime: int = 0,
        size: int = 0,
        linkname: str = "",
        devmajor: int = 0,
        devminor: int = 0,
        xattrs: dict[str, str] | None = None,
        owner: str = "",  # package name, or "vulcan" for what we generate
        pkg: str = "",  # the package apk records as its owner (kept when we generate over its file)
        source: tuple[int, int] | bytes | None = None,  # (package index, data offset) or literal bytes
        sha1: str = "",  # hex, from the package's APK-TOOLS.checksum.SHA1 header when present
    ) -> None:
        self.path, self.kind, self.mode, self.uid, self.gid, self.mtime = path, kind, mode, uid, gid, mtime
        self.size, self.linkname, self.devmajor, self.devminor = size, linkname, devmajor, devminor
        self.xattrs = xattrs if xattrs is not None else {}
        self.owner, self.pkg, self.source, self.sha1 = owner, pkg, source, sha1

    def __repr__(self) -> str:
        return f"Node({self.path!r}, {self.kind!r}, {self.mode:#o}, owner={self.owner!r})"


class _Pkg:
    __slots__ = ("data", "name", "replaces")

    def __init__(self, name: str, replaces: frozenset[str], data: Data) -> None:
        self.name, self.replaces, self.data = name, replaces, data


class DirRecord:
    """One directory of a package's apk database record (``F:``), and its files (``R:``)."""

    __slots__ = ("acl", "files", "path")

    def __init__(self, path: str) -> None:
        self.path = path
        self.acl: tuple[int, int, int] | None = None  # (uid, gid, mode) of an explicit entry; None: the default
        self.files: list[tuple[str, tuple[int, int, int], str]] = []  # (name, acl, sha1 hex)


class Tree:
    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.nodes: dict[str, Node] = {}
        self.packages: list[_Pkg] = []
        # What apk records per package, in its order: a directory once, when first seen in the
        # package's tar (explicitly or as a file's parent), its files in tar order (apk-tools
        # 2.14 src/database.c apk_db_install_archive_entry / apk_db_write_fdb).
        self.records: dict[str, dict[str, DirRecord]] = {}
        self._files: dict[int, BinaryIO] = {}

    # -- paths --------------------------------------------------------------------------------

    # What the tree is merged from, in messages ("package NAME"; a layer tree says "layer DIGEST"),
    # and whether a path may go through an absolute symlink (apk resolves it inside the root)
    UNIT = "package"
    ABSOLUTE_LINKS = True

    def _refuse(self, pkg: str, problem: str) -> UnsafePackage:
        return UnsafePackage(f"{self.UNIT} {pkg}: {problem}", hint=f"refusing the {self.UNIT}")

    def clean_name(self, name: str, pkg: str) -> str:
        raw = name
        if name.startswith("/"):
            raise self._refuse(pkg, f"absolute path {raw!r} in its data")
        while name.startswith("./"):
            name = name[2:]
        name = name.rstrip("/")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if any(p == ".." for p in parts):
            raise self._refuse(pkg, f"path {raw!r} contains '..'")
        return "/".join(parts)

    def resolve_parent(self, path: str, pkg: str) -> str:
        """``path`` with its directory part resolved through symlinks of the tree."""
        parent, _, base = path.rpartition("/")
        if not parent:
            return path
        resolved: list[str] = []
        todo = parent.split("/")
        hops = 0
        while todo:
            part = todo.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if not resolved:
                    raise self._refuse(pkg, f"{path!r} goes through a symlink that leads out of the root")
                resolved.pop()
                continue
            here = "/".join([*resolved, part])
            node = self.nodes.get(here)
            if node is not None and node.kind == "symlink":
                hops += 1
                if hops > 40:
                    raise self._refuse(pkg, f"{path!r}: too many levels of symlinks")
                target = node.linkname
                if target.startswith("/"):
                    if not self.ABSOLUTE_LINKS:
                        raise self._refuse(
                            pkg,
                            f"{path!r} goes through /{here}, a symlink to the absolute path "
                            f"{target} (where it leads depends on who follows it)",
                        )
                    resolved = []
                todo = [p for p in target.split("/") if p] + todo
                continue
            if node is not None and node.kind != "dir":
                raise BuildError(f"{self.UNIT} {pkg}: {path!r}: {here} is a {node.kind}, not a directory")
            resolved.append(part)
        return "/".join([*resolved, base])

    # -- adding packages ----------------------------------------------------------------------

    def add_package(self, name: str, data: Data, replaces: set[str]) -> None:
        """Merge the entries of a package's data tar (the tree keeps it until ``close()``)."""
        index = len(self.packages)
        self.packages.append(_Pkg(name, frozenset(replaces), data))
        source = data.buf if data.buf is not None else data.path
        assert source is not None
        try:
            members: list[pkgtar.Member] | None = pkgtar.members(source)  # a third of tarfile's time
        except pkgtar.Unusual:
            members = None  # something only tarfile reads: it reads the whole package
        if members is not None:
            for member in members:
                self._add_entry(member, index, name)
            return
        source_file = io.BytesIO(data.buf) if data.buf is not None else None
        with tarfile.open(data.path, "r:", fileobj=source_file) as tar:
            for info in tar:
                self._add_entry(info, index, name)

    def _add_entry(self, info: tarfile.TarInfo | pkgtar.Member, index: int, pkg: str) -> None:
        # An entry whose name begins with "." is package metadata, never installed: apk-tools 2.14
        # (src/database.c, apk_db_install_archive_entry: "APK 2.0 format") reads .PKGINFO and the
        # scripts and skips every other such name, e.g. the .dummy of meta packages (alpine-base,
        # libc-utils, build-base): two of them in one world are no file conflict for apk. ("." and
        # ".." are not such names: a path through them is judged, and refused, by clean_name.)
        first = info.name.split("/", 1)[0]
        if first.startswith(".") and first not in (".", ".."):
            return
        self._add_member(info, index, pkg)

    def _add_member(self, info: tarfile.TarInfo | pkgtar.Member, index: int, pkg: str) -> None:
        path = self.clean_name(info.name, pkg)
        if not path:
            return  # the root itself: ours, not the package's
        path = self.resolve_parent(path, pkg)
        xattrs = {k[len("SCHILY.xattr.") :]: v for k, v in info.pax_headers.items() if k.startswith("SCHILY.xattr.")}
        node = Node(
            path=path,
            kind="file",
            mode=info.mode & 0o7777,
            uid=info.uid,
            gid=info.gid,
            mtime=int(info.mtime),
            xattrs=xattrs,
            owner=pkg,
            sha1=info.pax_headers.get(APK_CHECKSUM_PAX, ""),
        )
        if info.isreg():
            node.size, node.source = info.size, (index, info.offset_data)
        elif info.isdir():
            node.kind = "dir"
        elif info.issym():
            node.kind, node.linkname = "symlink", info.linkname
        elif info.islnk():
            target = self.resolve_parent(self.clean_name(info.linkname, pkg), pkg)
            found = self.nodes.get(target)
            if found is not None and found.kind == "hardlink":
                target, found = found.linkname, self.nodes.get(found.linkname)
            if found is None or found.kind != "file":
                raise BuildError(f"{self.UNIT} {pkg}: hard link {path!r} to {info.linkname!r}, which is not a file")
            node.kind, node.linkname = "hardlink", target
        elif info.ischr() or info.isblk():
            node.kind = "char" if info.ischr() else "block"
            node.devmajor, node.devminor = info.devmajor, info.devminor
        elif info.isfifo():
            node.kind = "fifo"
        else:
            raise BuildError(f"{self.UNIT} {pkg}: unsupported tar entry type for {path!r}")
        self._parents(path, pkg)
        self._put(node)
        self._record(pkg, node)

    def _record(self, pkg: str, node: Node) -> None:
        dirs = self.records.setdefault(pkg, {})
        acl = (node.uid, node.gid, node.mode)
        if node.kind == "dir":
            dirs.setdefault(node.path, DirRecord(node.path)).acl = acl
            return
        parent, _, base = node.path.rpartition("/")
        dirs.setdefault(parent, DirRecord(parent)).files.append((base, acl, node.sha1))

    def _parents(self, path: str, owner: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.nodes:
                self.nodes[d] = Node(d, "dir", 0o755, owner=owner)

    def _put(self, node: Node) -> None:
        node.pkg = node.owner
        old = self.nodes.get(node.path)
        if old is None:
            self.nodes[node.path] = node
            return
        if old.kind == "dir" and node.kind == "dir":
            return  # first owner's metadata wins, as with apk
        if old.kind == "dir" or node.kind == "dir":
            raise BuildError(f"{node.path}: a {node.kind} in {node.owner} and a {old.kind} in {old.owner}")
        pkg = next((p for p in self.packages if p.name == node.owner), None)
        if old.owner == node.owner or (pkg is not None and old.owner in pkg.replaces):
            self.nodes[node.path] = node
            return
        raise BuildError(
            f"file conflict: {node.path} is in both {old.owner} and {node.owner}",
            hint=f"apk would refuse this too unless {node.owner} declares 'replaces = {old.owner}'",
        )

    # -- what we add --------------------------------------------------------------------------

    def put_generated(self, path: str, kind: str, mode: int, data: bytes = b"", **kw: object) -> None:
        """Add or replace an entry we generate (config files, links, the agent). Over a package's
        file, the package stays its owner in apk's database, as after an edit (apk audit: U)."""
        self._parents(path, "vulcan")
        old = self.nodes.get(path)
        node = Node(path, kind, mode, owner="vulcan", pkg=old.pkg if old else "", **kw)  # type: ignore[arg-type]
        if kind == "file":
            node.size, node.source = len(data), data
        self.nodes[path] = node

    def read(self, path: str) -> bytes | None:
        node = self.nodes.get(path)
        if node is None or node.kind != "file":
            return None
        return b"".join(self._chunks(node))

    def _chunks(self, node: Node) -> Iterator[bytes | memoryview]:
        if isinstance(node.source, bytes):
            yield node.source
            return
        assert node.source is not None
        index, offset = node.source
        data = self.packages[index].data
        if data.buf is not None:
            if offset + node.size > len(data.buf):
                raise BuildError(f"{node.path}: package {node.owner} is truncated")
            view = memoryview(data.buf)
            for start in range(offset, offset + node.size, CHUNK):
                yield view[start : min(start + CHUNK, offset + node.size)]
            return
        f = self._files.get(index)
        if f is None:
            assert data.path is not None
            f = self._files[index] = open(data.path, "rb")  # noqa: SIM115 - closed in close()
        f.seek(offset)
        left = node.size
        while left:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                raise BuildError(f"{node.path}: package {node.owner} is truncated")
            left -= len(chunk)
            yield chunk

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        for p in self.packages:
            p.data.release()

    # -- the stream ---------------------------------------------------------------------------

    def content_size(self) -> int:
        return sum(n.size for n in self.nodes.values() if n.kind == "file")

    def write_tar(self, out: IO[bytes], epoch: int) -> None:
        """The normalised stream: sorted paths, numeric owners only, clamped mtimes, PAX. The
        bytes are those of Python 3.11's tarfile in PAX format writing the same members (a test
        holds the two equal); written here, a header at a time, in half tarfile's time."""
        paths = sorted(self.nodes)
        # A hard link must follow the file it names: in sorted order the first path of each
        # link group carries the bytes, the others link to it.
        group_first: dict[str, str] = {}
        for p in paths:
            n = self.nodes[p]
            target = n.linkname if n.kind == "hardlink" else p if n.kind == "file" else None
            if target is not None and target not in group_first:
                group_first[target] = p
        offset = 0
        write = out.write
        for p in paths:
            n = self.nodes[p]
            mode, uid, gid, size, linkname = n.mode, n.uid, n.gid, 0, ""
            mtime = min(n.mtime, epoch) if n.mtime else epoch
            pax = {f"SCHILY.xattr.{k}": v for k, v in sorted(n.xattrs.items())} if n.xattrs else {}
            content: Node | None = None
            kind = TAR_TYPES.get(n.kind, tarfile.REGTYPE)
            if n.kind in ("file", "hardlink"):
                named = self.nodes[n.linkname] if n.kind == "hardlink" else n
                first = group_first[n.linkname if n.kind == "hardlink" else p]
                if first != p:
                    kind, linkname = tarfile.LNKTYPE, first
                else:
                    kind, size, content = tarfile.REGTYPE, named.size, named
                    if n.kind == "hardlink":  # its bytes, its own metadata
                        mode, uid, gid = named.mode, named.uid, named.gid
            elif n.kind == "symlink":
                linkname = n.linkname
            dev = (n.devmajor, n.devminor) if n.kind in ("char", "block") else None
            header = pax_header(p + "/" if kind == tarfile.DIRTYPE else p, mode, uid, gid, size, mtime, kind,
                                linkname, dev, pax)  # fmt: skip
            write(header)
            offset += len(header)
            if content is not None:
                written = 0
                for chunk in self._chunks(content):
                    write(chunk)
                    written += len(chunk)
                if written % 512:
                    write(b"\0" * (512 - written % 512))
                offset += (written + 511) // 512 * 512
        write(b"\0" * 1024)  # the end of the archive, then zeros to a whole record (as tarfile)
        offset += 1024
        if offset % tarfile.RECORDSIZE:
            write(b"\0" * (tarfile.RECORDSIZE - offset % tarfile.RECORDSIZE))


TAR_TYPES = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "char": tarfile.CHRTYPE,
             "block": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE}  # fmt: skip
_NO_DEVICE = b"\0" * 16


def _ustar(name: str, mode: int, uid: int, gid: int, size: int, mtime: int, kind: bytes, linkname: str,
           dev: tuple[int, int] | None) -> bytes:  # fmt: skip
    """One ustar header block, as tarfile's ``_create_header(info, USTAR_FORMAT, "ascii", "replace")``."""
    devices = b"%07o\0%07o\0" % dev if dev is not None else _NO_DEVICE
    buf = b"".join((
        name.encode("ascii", "replace")[:100].ljust(100, b"\0"),
        b"%07o\0%07o\0%07o\0%011o\0%011o\0" % (mode & 0o7777, uid, gid, size, mtime),
        b"        ", kind,
        linkname.encode("ascii", "replace")[:100].ljust(100, b"\0"),
        tarfile.POSIX_MAGIC, b"\0" * 64, devices, b"\0" * 155,
    )).ljust(512, b"\0")  # fmt: skip
    chksum = 256 + sum(buf[:148]) + sum(buf[156:])
    return buf[:148] + b"%06o\0" % chksum + buf[155:]


def pax_header(name: str, mode: int, uid: int, gid: int, size: int, mtime: int, kind: bytes, linkname: str,
               dev: tuple[int, int] | None, pax: dict[str, str]) -> bytes:  # fmt: skip
    """A member's header as tarfile writes it in PAX format (``TarInfo.create_pax_header``): a
    pax extended header first when a name is not ASCII or too long, a number does not fit, or
    there are records (xattrs)."""
    records = dict(pax)
    for text, key, length in ((name, "path", 100), (linkname, "linkpath", 100)):
        if key not in records and (not text.isascii() or len(text) > length):
            records[key] = text
    numbers = {"uid": (uid, 8), "gid": (gid, 8), "size": (size, 12), "mtime": (mtime, 12)}
    fixed = {}
    for key, (value, digits) in numbers.items():
        if not 0 <= value < 8 ** (digits - 1):
            fixed[key] = 0
            records.setdefault(key, str(value))
    uid, gid, size, mtime = (fixed.get(k, v) for k, (v, _) in numbers.items())
    header = _ustar(name, mode, uid, gid, size, mtime, kind, linkname, dev)
    if not records:
        return header
    return _pax_records(records) + header


def _pax_records(records: dict[str, str]) -> bytes:
    """tarfile's ``_create_pax_generic_header(records, XHDTYPE, "utf-8")``."""
    binary = False
    for value in records.values():
        try:
            value.encode("utf-8", "strict")
        except UnicodeEncodeError:
            binary = True
            break
    body = b"21 hdrcharset=BINARY\n" if binary else b""
    for keyword, value in records.items():
        k, v = keyword.encode("utf-8"), value.encode("utf-8", "surrogateescape" if binary else "strict")
        n = len(k) + len(v) + 3
        p = 0
        while (m := n + len(str(p))) != p:
            p = m
        body += b"%d %s=%s\n" % (p, k, v)
    head = _ustar("././@PaxHeader", 0, 0, 0, len(body), 0, tarfile.XHDTYPE, "", None)
    return head + body + b"\0" * (-len(body) % 512)
