"""The stream writer's bytes against tarfile's: Python 3.11's tarfile in PAX format writing the
same members (the writer the stream had before, kept here as the reference) must give the very
same stream, on a tree of real packages and on members of every kind and shape."""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.apk.package import verify_package
from scripts.rootfs.inflate import inflate
from scripts.rootfs.tree import Node, Tree
from tests.support import realapk


class _Reader(io.RawIOBase):
    def __init__(self, chunks: Iterator[bytes | memoryview]) -> None:
        self._data = b"".join(chunks)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size < 0 else self._pos + size
        out, self._pos = self._data[self._pos : end], min(end, len(self._data))
        return out


def tarfile_stream(tree: Tree, epoch: int) -> bytes:
    """The reference: the stream as tarfile wrote it (tree.write_tar before it wrote headers itself)."""
    out = io.BytesIO()
    paths = sorted(tree.nodes)
    group_first: dict[str, str] = {}
    for p in paths:
        n = tree.nodes[p]
        target = n.linkname if n.kind == "hardlink" else p if n.kind == "file" else None
        if target is not None and target not in group_first:
            group_first[target] = p
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for p in paths:
            n = tree.nodes[p]
            info = tarfile.TarInfo(p)
            info.mode, info.uid, info.gid = n.mode, n.uid, n.gid
            info.uname = info.gname = ""
            info.mtime = min(n.mtime, epoch) if n.mtime else epoch
            if n.xattrs:
                info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in sorted(n.xattrs.items())}
            data = None
            if n.kind in ("file", "hardlink"):
                content = tree.nodes[n.linkname] if n.kind == "hardlink" else n
                first = group_first[n.linkname if n.kind == "hardlink" else p]
                if first != p:
                    info.type, info.linkname = tarfile.LNKTYPE, first
                else:
                    info.size = content.size
                    data = _Reader(tree._chunks(content))
                    if n.kind == "hardlink":
                        info.mode, info.uid, info.gid = content.mode, content.uid, content.gid
            elif n.kind == "dir":
                info.type = tarfile.DIRTYPE
            elif n.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, n.linkname
            elif n.kind in ("char", "block"):
                info.type = tarfile.CHRTYPE if n.kind == "char" else tarfile.BLKTYPE
                info.devmajor, info.devminor = n.devmajor, n.devminor
            elif n.kind == "fifo":
                info.type = tarfile.FIFOTYPE
            tar.addfile(info, data)
    return out.getvalue()


def ours(tree: Tree, epoch: int) -> bytes:
    out = io.BytesIO()
    tree.write_tar(out, epoch)
    return out.getvalue()


def test_a_tree_of_real_packages_streams_as_tarfile_wrote_it(tmp_path: Path) -> None:
    if not realapk.ISO_INDEX.is_file():
        pytest.skip(f"the real Alpine repository is absent ({realapk.ISO})")
    tree = Tree(tmp_path)
    for p in realapk.index(realapk.ISO_INDEX, "x86_64"):
        apk = realapk.ISO / "x86_64" / f"{p.name}-{p.version}.apk"
        v = verify_package(apk, p, None, p.name)
        data = inflate(apk, v.data_offset, tmp_path / f"{p.name}.tar")
        tree.add_package(p.name, data, {"*"})  # every package may replace: all 100 in one tree
    try:
        a, b = ours(tree, 1_700_000_000), tarfile_stream(tree, 1_700_000_000)
    finally:
        tree.close()
    assert len(tree.nodes) > 2000
    assert hashlib.sha256(a).hexdigest() == hashlib.sha256(b).hexdigest()


NODES = [
    Node("bin", "dir", 0o755),
    Node("bin/tool", "file", 0o4755, source=b"x" * 513, size=513, xattrs={"security.capability": "\x01\x00"}),
    Node("bin/same", "hardlink", 0o755, linkname="bin/tool"),
    Node("bin/link", "symlink", 0o777, linkname="tool"),
    Node("bin/" + "long-link-" * 12, "symlink", 0o777, linkname="/usr/lib/" + "t" * 120),
    Node("dev", "dir", 0o755),
    Node("dev/console", "char", 0o600, devmajor=5, devminor=1),
    Node("dev/sda", "block", 0o660, gid=6, devmajor=8, devminor=0),
    Node("dev/fifo", "fifo", 0o644),
    Node("usr/share/" + "a-long-directory-name/" * 6 + "file.txt", "file", 0o644, source=b"long", size=4),
    Node("usr/share/" + "d" * 95, "dir", 0o755),  # a directory whose name with its "/" is 106 bytes
    Node("usr/share/ünïcödé", "file", 0o644, source=b"u", size=1),
    Node("usr/share/bytes-\udcff", "file", 0o644, source=b"b", size=1),  # a name that is not UTF-8
    Node("home/big", "file", 0o640, uid=3_000_000, gid=2_097_152, source=b"", size=0),
    Node("srv/empty", "file", 0o600, uid=1000, gid=1000, source=b"", size=0, mtime=1),
    Node("srv/xattrs", "dir", 0o755, xattrs={"user.b": "2", "user.a": "1", "user.ünï": "é"}),
]


@pytest.mark.parametrize("epoch", [0, 1_700_000_000, 4_294_967_295])
def test_members_of_every_kind_and_shape_stream_as_tarfile_wrote_them(epoch: int, tmp_path: Path) -> None:
    tree = Tree(tmp_path)
    for n in NODES:
        tree.nodes[n.path] = Node(**{k: getattr(n, k) for k in Node.__slots__} | {"mtime": n.mtime or 1_600_000_000})
    assert ours(tree, epoch) == tarfile_stream(tree, epoch)


def test_isa_l_inflates_real_packages_to_the_stream_zlib_gives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The merge inflates with ISA-L (python-isal, in requirements.txt: half zlib's time), in
    memory while the budget lasts and into scratch files past it; the stream of the real
    packages is the one zlib's inflate gives, byte for byte, either way."""
    import zlib

    from isal import isal_zlib

    from scripts.rootfs import inflate

    if not realapk.ISO_INDEX.is_file():
        pytest.skip(f"the real Alpine repository is absent ({realapk.ISO})")
    assert inflate.inflater is isal_zlib  # installed, and what the merge uses
    streams, spilled = [], []
    for inflater, budget in ((isal_zlib, 64 << 20), (zlib, 64 << 20), (isal_zlib, 2 << 20), (zlib, 0)):
        monkeypatch.setattr(inflate, "inflater", inflater)
        monkeypatch.setattr(inflate, "BUDGET", inflate._Budget(budget))
        tree = Tree(tmp_path / f"{inflater.__name__}-{budget}")
        tree.scratch.mkdir()
        for p in realapk.index(realapk.ISO_INDEX, "x86_64"):
            apk = realapk.ISO / "x86_64" / f"{p.name}-{p.version}.apk"
            offset = verify_package(apk, p, None, p.name).data_offset
            tree.add_package(p.name, inflate.inflate(apk, offset, tree.scratch / f"{p.name}.tar"), {"*"})
        try:
            streams.append(hashlib.sha256(ours(tree, 1_700_000_000)).hexdigest())
        finally:
            tree.close()
        spilled.append(len(list(tree.scratch.iterdir())))
        assert inflate.BUDGET.left == budget  # all of it given back
    assert len(set(streams)) == 1
    assert spilled[0] == 0 and 0 < spilled[2] < len(realapk.index(realapk.ISO_INDEX, "x86_64")) == spilled[3]
