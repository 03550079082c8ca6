"""The fast package-tar reader against tarfile, on every real package in ../shared and on
generated ones with every kind of member the merge takes (xattrs, links, devices, long names)."""

from __future__ import annotations

import tarfile
import zlib
from pathlib import Path

import pytest

from scripts.apk.package import verify_package
from scripts.apk.trust import Keyring
from scripts.rootfs import pkgtar
from tests.support import realapk
from tests.support.apkrepo import KEY_NAME, Entry, Pkg, public_pem

FIELDS = ("name", "mode", "uid", "gid", "size", "linkname", "devmajor", "devminor", "offset_data", "pax_headers")


def data_tar(apk: Path, offset: int, dest: Path) -> Path:
    with open(apk, "rb") as f:
        f.seek(offset)
        dest.write_bytes(zlib.decompressobj(31).decompress(f.read()))
    return dest


def same_as_tarfile(tar: Path) -> int:
    """Compare every member; return how many there were."""
    ours = pkgtar.members(tar)
    with tarfile.open(tar, "r:") as t:
        theirs = list(t)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        for name in FIELDS:
            if name in ("size", "devmajor", "devminor") and not b.isreg() and not (b.ischr() or b.isblk()):
                continue  # tarfile keeps a header's size for a directory; the merge reads it of files only
            assert getattr(a, name) == getattr(b, name), (b.name, name)
        assert int(a.mtime) == int(b.mtime), b.name
        kinds = ("isreg", "isdir", "issym", "islnk", "ischr", "isblk", "isfifo")
        assert [getattr(a, k)() for k in kinds] == [getattr(b, k)() for k in kinds], b.name
    return len(ours)


def test_every_real_package_reads_as_tarfile_reads_it(tmp_path: Path) -> None:
    if not realapk.ISO_INDEX.is_file():
        pytest.skip(f"the real Alpine repository is absent ({realapk.ISO})")
    n = 0
    for p in realapk.index(realapk.ISO_INDEX, "x86_64"):
        apk = realapk.ISO / "x86_64" / f"{p.name}-{p.version}.apk"
        v = verify_package(apk, p, None, p.name)
        n += same_as_tarfile(data_tar(apk, v.data_offset, tmp_path / f"{p.name}.tar"))
    assert n > 2000


def test_every_kind_of_member_reads_as_tarfile_reads_it(tmp_path: Path) -> None:
    long = "usr/share/" + "/".join(["a-rather-long-directory-name"] * 6) + "/file.txt"
    pkg = Pkg("kinds", "1-r0", entries=[
        Entry("usr", kind="dir", mode=0o755), Entry("usr/bin", kind="dir", mode=0o755),
        Entry("usr/bin/tool", b"x" * 1000, 0o4755, checksum=True, xattrs={"security.capability": "cap"}),
        Entry("usr/bin/link", kind="symlink", target="tool"),
        Entry("usr/bin/hard", kind="hardlink", target="usr/bin/tool"),
        Entry("dev/console", kind="char", mode=0o600, devmajor=5, devminor=1), Entry(long, b"long", checksum=True),
        Entry("srv/owned", b"", 0o640, uid=1000, gid=1000),
    ])  # fmt: skip
    apk, _ = pkg.build()
    (tmp_path / "kinds.apk").write_bytes(apk)
    v = verify_package(tmp_path / "kinds.apk", None, Keyring.from_pems({KEY_NAME: public_pem()}), "kinds")
    assert same_as_tarfile(data_tar(tmp_path / "kinds.apk", v.data_offset, tmp_path / "kinds.tar")) == 8


@pytest.mark.parametrize(
    "edit",
    [
        lambda b: b[:148] + b"0000000\0" + b[156:],  # a wrong header checksum
        lambda b: b[:156] + b"L" + b[157:],  # a GNU long name
    ],
)
def test_what_it_does_not_know_is_left_to_tarfile(edit: object, tmp_path: Path) -> None:
    tar = tmp_path / "t.tar"
    with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as t:
        info = tarfile.TarInfo("a")
        t.addfile(info)
    raw = tar.read_bytes()
    tar.write_bytes(edit(raw[:512]) + raw[512:])  # type: ignore[operator]
    with pytest.raises(pkgtar.Unusual):
        pkgtar.members(tar)
