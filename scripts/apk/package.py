"""The APK v2 file formats: gzip members, the signed index, and the package trust chain.

An .apk is three concatenated gzip members: signature tar, control tar (``.PKGINFO`` and
install scripts), data tar. The chain we verify (apk-tools src/package.c, abuild's abuild-sign):
  1. the APKINDEX signature (trust.py) vouches for each record's ``C:`` field;
  2. ``C:`` = ``Q1`` + base64(SHA-1 of the compressed control member);
  3. ``.PKGINFO``'s ``datahash`` = SHA-256 of the compressed data member;
  and the file size equals the index's ``S:``. Files are streamed: a 100 MB package is never
held in memory, and the data member is hashed, not decompressed.
"""

from __future__ import annotations

import base64
import hashlib
import io
import tarfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NamedTuple

from .trust import Keyring, TrustError, read_signatures, verify

if TYPE_CHECKING:
    from .index import Package
    from .lockfile import Locked

CHUNK = 1 << 20


class _Member:
    __slots__ = ("end", "out", "sha1", "sha256", "start")

    def __init__(self, start: int, sha1: hashlib._Hash | None = None, sha256: hashlib._Hash | None = None,
                 out: io.BytesIO | None = None) -> None:  # fmt: skip
        self.start, self.end, self.sha1, self.sha256, self.out = start, 0, sha1, sha256, out


def _scan(f: BinaryIO, decompress: int, what: str, rest_sha1: bool = True) -> list[_Member]:
    """Walk gzip members: the first ``decompress`` are decompressed (kept) and hashed; the
    remainder of the file is hashed raw as one last member (SHA-256 of its raw bytes, and
    SHA-1 unless ``rest_sha1`` is false: a package's data member needs only the SHA-256)."""
    members: list[_Member] = []
    pos = 0
    d = zlib.decompressobj(31)
    cur = _Member(0, sha1=hashlib.sha1(), sha256=hashlib.sha256(), out=io.BytesIO())
    pending = b""
    while True:
        # the members to decompress (a signature, a control tar: a few KiB) are read 64 KiB at a
        # time: what follows the end of one is copied out of zlib (unused_data), a MiB was 13 ms
        # of a real 83-package build
        chunk = pending or f.read(CHUNK if len(members) >= decompress else 1 << 16)
        pending = b""
        if not chunk:
            break
        if len(members) >= decompress:  # the rest: raw hashing only
            assert cur.sha256
            if cur.sha1 is not None:
                cur.sha1.update(chunk)
            cur.sha256.update(chunk)
            pos += len(chunk)
            continue
        try:
            out = d.decompress(chunk)
        except zlib.error as exc:
            raise TrustError(
                f"{what}: gzip member {len(members) + 1} is corrupt ({exc})",
                hint="the file is damaged (a broken download or a broken mirror file): run again to fetch it "
                "afresh; if it persists, the mirror (VULCAN_MIRROR) serves a broken file",
            ) from None
        used = len(chunk) - len(d.unused_data) if d.eof else len(chunk)
        assert cur.sha1 and cur.sha256 and cur.out
        cur.sha1.update(chunk[:used])
        cur.sha256.update(chunk[:used])
        cur.out.write(out)
        if cur.out.tell() > 64 << 20:
            raise TrustError(f"{what}: gzip member {len(members) + 1} is implausibly large for a control/signature")
        pos += used
        if d.eof:
            cur.end = pos
            members.append(cur)
            last = len(members) == decompress
            cur = _Member(pos, sha1=None if last and not rest_sha1 else hashlib.sha1(), sha256=hashlib.sha256(),
                          out=io.BytesIO())  # fmt: skip
            pending = d.unused_data
            d = zlib.decompressobj(31)
    if len(members) < decompress:
        if pos > cur.start:
            raise TrustError(f"{what}: truncated (gzip member {len(members) + 1} does not end)")
        raise TrustError(f"{what}: expected at least {decompress + 1} gzip members, found {len(members)}")
    cur.end = pos
    if cur.end > cur.start:
        members.append(cur)
    return members


def _digests(m: _Member) -> dict[str, bytes]:
    assert m.sha1 and m.sha256
    return {"RSA": m.sha1.digest(), "RSA256": m.sha256.digest()}


def read_index(data: bytes, keyring: Keyring | None, what: str) -> tuple[str, str | None]:
    """Verify a signed APKINDEX.tar.gz; return (APKINDEX text, signing key name).

    ``keyring=None`` skips the signature (only for indexes that are already trusted)."""
    members = _scan(io.BytesIO(data), 1, what)
    if len(members) < 2:
        raise TrustError(f"{what}: no index after the signature member")
    sig, rest = members[0], members[1]
    key = None
    if keyring is not None:
        assert sig.out is not None
        key = verify(read_signatures(sig.out.getvalue()), _digests(rest), keyring, what)
    try:
        with tarfile.open(fileobj=io.BytesIO(data[rest.start :]), mode="r:gz") as tar:
            member = tar.getmember("APKINDEX")
            f = tar.extractfile(member)
            assert f is not None
            return f.read().decode("utf-8"), key
    except (tarfile.TarError, KeyError, EOFError, zlib.error, OSError) as exc:
        raise TrustError(f"{what}: signed, but no readable APKINDEX inside ({exc})") from None


class Verified(NamedTuple):
    """A package whose chain held: where its data member starts, and what .PKGINFO says."""

    path: Path
    checksum: str  # Q1...
    pkginfo: dict[str, list[str]]
    data_offset: int
    data_sha256: str
    size: int
    files: dict[str, bytes]  # the control tar's files (.PKGINFO, install scripts), read once


def parse_pkginfo(text: str) -> dict[str, list[str]]:
    """``.PKGINFO``: ``key = value`` lines; keys like depend/provides repeat."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or " = " not in line:
            continue
        key, value = line.split(" = ", 1)
        out.setdefault(key.strip(), []).append(value)
    return out


def q1(sha1_digest: bytes) -> str:
    return "Q1" + base64.b64encode(sha1_digest).decode()


def verify_package(path: Path, expected: Package | Locked | None, keyring: Keyring | None, what: str) -> Verified:
    """Check one .apk: control checksum against the index's C:, data against .PKGINFO datahash,
    size against S:; and its own signature with ``keyring`` when one is given (the keys of its
    repository; without an index record, a keyring is required)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        members = _scan(f, 2, what, rest_sha1=False)
    if len(members) != 3:
        raise TrustError(f"{what}: expected 3 gzip members (signature, control, data), found {len(members)}")
    sig, control, data = members
    assert control.sha1 and control.out and data.sha256 and sig.out
    checksum = q1(control.sha1.digest())
    if expected is not None:
        if expected.checksum and expected.checksum != checksum:
            raise TrustError(
                f"{what}: control checksum {checksum} does not match the index's C:{expected.checksum} "
                "(chain link index -> control broken)"
            )
        if expected.size and expected.size != size:
            raise TrustError(f"{what}: size {size} differs from the index's S:{expected.size}")
        if not expected.checksum:
            raise TrustError(f"{what}: the index record has no C: checksum to check the package against")
        if keyring is not None:  # and its own signature, by a key of the repository it comes from
            verify(read_signatures(sig.out.getvalue()), _digests(control), keyring, what)
    elif keyring is not None:
        verify(read_signatures(sig.out.getvalue()), _digests(control), keyring, what)
    else:
        raise TrustError(f"{what}: nothing to verify it against (no index record, no keys)")
    control_tar = control.out.getvalue()
    files = _control_files(control_tar, what)
    pkginfo = parse_pkginfo(files[".PKGINFO"].decode("utf-8", "replace"))
    datahash = (pkginfo.get("datahash") or [""])[0]
    actual = data.sha256.hexdigest()
    if not datahash:
        raise TrustError(f"{what}: .PKGINFO has no datahash (chain link control -> data missing)")
    if datahash != actual:
        raise TrustError(
            f"{what}: data sha256 {actual} does not match .PKGINFO datahash {datahash} "
            "(chain link control -> data broken)"
        )
    return Verified(path, checksum, pkginfo, data.start, actual, size, files)


def _control_files(control_tar: bytes, what: str) -> dict[str, bytes]:
    """The control tar's files: .PKGINFO (required), .pre-install, .post-install, .trigger, ..."""
    files = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(control_tar), mode="r:") as tar:
            for m in tar:
                if m.isfile():
                    f = tar.extractfile(m)
                    assert f is not None
                    files[m.name] = f.read()
    except tarfile.TarError:
        files = {}
    if ".PKGINFO" not in files:
        raise TrustError(f"{what}: control member has no .PKGINFO")
    return files
