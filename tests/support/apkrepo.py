"""Writes real APK-format repositories for tests: packages (signature, control, data gzip
members) and a signed APKINDEX.tar.gz, with a test key made here. Bytes follow the upstream
format exactly (abuild: tar segments without end-of-archive blocks, signature over the
control member; datahash over the data member), so our reader is exercised as on Alpine."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from dataclasses import dataclass, field
from functools import cache

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from scripts.apk.package import q1

KEY_NAME = "vulcan-test-4242.rsa.pub"


@cache
def test_key(name: str = KEY_NAME) -> rsa.RSAPrivateKey:
    """A signing key per name (the test key, or another repository's: a team's, a developer's)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(name: str = KEY_NAME) -> bytes:
    return (
        test_key(name)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def key_fingerprint(name: str = KEY_NAME) -> str:
    der = (
        test_key(name)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return hashlib.sha256(der).hexdigest()


@dataclass
class Entry:
    path: str
    data: bytes = b""
    mode: int = 0o644
    kind: str = "file"  # file, dir, symlink, hardlink, char
    target: str = ""  # symlink/hardlink target
    uid: int = 0
    gid: int = 0
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, str] = field(default_factory=dict)
    checksum: bool = False  # carry abuild's APK-TOOLS.checksum.SHA1 (as every real package does)


def _tar_segment(entries: list[tuple[tarfile.TarInfo, bytes | None]], pax: bool = True) -> bytes:
    """A tar stream without end-of-archive blocks (abuild cuts them so segments concatenate)."""
    buf = io.BytesIO()
    # not a context manager: closing would append the end-of-archive blocks we must leave out
    tar = tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT if pax else tarfile.USTAR_FORMAT)  # noqa: SIM115
    for info, data in entries:
        tar.addfile(info, io.BytesIO(data) if data is not None else None)
    end = tar.offset
    return buf.getvalue()[:end]


def _gz(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


def _info(e: Entry, mtime: int) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(e.path)
    info.mode, info.uid, info.gid, info.mtime = e.mode, e.uid, e.gid, mtime
    info.uname = info.gname = ""
    data: bytes | None = None
    if e.kind == "file":
        info.size, data = len(e.data), e.data
    elif e.kind == "dir":
        info.type = tarfile.DIRTYPE
    elif e.kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, e.target
    elif e.kind == "hardlink":
        info.type, info.linkname = tarfile.LNKTYPE, e.target
    elif e.kind == "char":
        info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, e.devmajor, e.devminor
    if e.xattrs:
        info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in e.xattrs.items()}
    if e.checksum and e.kind in ("file", "symlink"):  # abuild's SHA-1 (of a link: its target; apk's Z: lines)
        digest = hashlib.sha1(e.data if e.kind == "file" else e.target.encode()).hexdigest()
        info.pax_headers = {**info.pax_headers, "APK-TOOLS.checksum.SHA1": digest}
    return info, data


@dataclass
class Pkg:
    name: str
    version: str
    arch: str = "x86_64"
    entries: list[Entry] = field(default_factory=list)
    depends: list[str] = field(default_factory=list)
    provides: list[str] = field(default_factory=list)
    install_if: list[str] = field(default_factory=list)
    scripts: dict[str, bytes] = field(default_factory=dict)  # ".post-install": b"#!/bin/sh..."
    license: str = "MIT"
    origin: str = ""
    build_time: int = 1_700_000_000
    provider_priority: int | None = None
    key: str = KEY_NAME  # the key that signs it (abuild-sign's)

    def build(self) -> tuple[bytes, str]:
        """The .apk bytes and its index record (the same package is built once per run: the
        bytes are deterministic, and most tests publish the same test repository)."""
        key = hashlib.sha256(repr(self).encode("utf-8", "surrogateescape")).digest()
        if key not in _BUILT:
            _BUILT[key] = self._build()
        return _BUILT[key]

    def _build(self) -> tuple[bytes, str]:
        data_gz = _gz(_tar_segment([_info(e, self.build_time) for e in self.entries]) + b"\0" * 1024)
        size = sum(len(e.data) for e in self.entries)
        lines = [
            f"pkgname = {self.name}",
            f"pkgver = {self.version}",
            "pkgdesc = test package",
            "url = https://example.invalid/",
            f"builddate = {self.build_time}",
            f"size = {size}",
            f"arch = {self.arch}",
            f"origin = {self.origin or self.name}",
            f"license = {self.license}",
            *(f"depend = {d}" for d in self.depends),
            *(f"provides = {p}" for p in self.provides),
            *(f"install_if = {' '.join(self.install_if)}" for _ in [0] if self.install_if),
            *(f"provider_priority = {self.provider_priority}" for _ in [0] if self.provider_priority is not None),
            f"datahash = {hashlib.sha256(data_gz).hexdigest()}",
        ]
        control = [(".PKGINFO", ("\n".join(lines) + "\n").encode()), *sorted(self.scripts.items())]
        infos = []
        for name, body in control:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(body), 0o755 if name != ".PKGINFO" else 0o644, self.build_time
            infos.append((info, body))
        control_gz = _gz(_tar_segment(infos, pax=False))
        signature = test_key(self.key).sign(control_gz, padding.PKCS1v15(), hashes.SHA1())
        sig_info = tarfile.TarInfo(f".SIGN.RSA.{self.key}")
        sig_info.size, sig_info.mode = len(signature), 0o644
        apk = _gz(_tar_segment([(sig_info, signature)], pax=False)) + control_gz + data_gz
        record = [
            f"C:{q1(hashlib.sha1(control_gz).digest())}",
            f"P:{self.name}",
            f"V:{self.version}",
            f"A:{self.arch}",
            f"S:{len(apk)}",
            f"I:{size}",
            "T:test package",
            "U:https://example.invalid/",
            f"L:{self.license}",
            f"o:{self.origin or self.name}",
            f"t:{self.build_time}",
        ]
        if self.depends:
            record.append("D:" + " ".join(self.depends))
        if self.provides:
            record.append("p:" + " ".join(self.provides))
        if self.install_if:
            record.append("i:" + " ".join(self.install_if))
        if self.provider_priority is not None:
            record.append(f"k:{self.provider_priority}")
        return apk, "\n".join(record) + "\n"


_BUILT: dict[bytes, tuple[bytes, str]] = {}


def index(records: list[str], sha256: bool = False, key: str = KEY_NAME) -> bytes:
    """A signed APKINDEX.tar.gz (RSA/SHA-1 by default, as Alpine's; RSA256 if asked), by ``key``."""
    text = "\n".join(records).encode()
    info = tarfile.TarInfo("APKINDEX")
    info.size, info.mode = len(text), 0o644
    desc = tarfile.TarInfo("DESCRIPTION")
    desc.size = 4
    body = _gz(_tar_segment([(desc, b"test"), (info, text)], pax=False) + b"\0" * 1024)
    algo, kind = (hashes.SHA256(), "RSA256") if sha256 else (hashes.SHA1(), "RSA")
    signature = test_key(key).sign(body, padding.PKCS1v15(), algo)
    sig = tarfile.TarInfo(f".SIGN.{kind}.{key}")
    sig.size, sig.mode = len(signature), 0o644
    return _gz(_tar_segment([(sig, signature)], pax=False)) + body


BRANCH = "v3.24"
CDN = "https://dl-cdn.alpinelinux.org/alpine"


def alpine_pins(runtimes: dict[str, dict[str, object]], base: list[str], repos: list[str]) -> dict[str, object]:
    """An alpine section for pins.json that trusts the test key."""
    return {
        "mirror": CDN,
        "branch": BRANCH,
        "repositories": repos,
        "keys": {KEY_NAME: {"url": f"https://alpinelinux.org/keys/{KEY_NAME}", "sha256": key_fingerprint()}},
        "base": base,
        "headroom_mib": 16,
        "runtimes": runtimes,
    }


def publish(mirror: object, repos: dict[str, list[Pkg]], arch: str = "x86_64", sha256_sig: bool = False) -> dict:  # type: ignore[type-arg]
    """Serve packages and signed indexes, upstream-shaped, on the test mirror.

    Returns {filename: apk bytes}."""
    files = {}
    mirror.add(f"https://alpinelinux.org/keys/{KEY_NAME}", public_pem())  # type: ignore[attr-defined]
    for repo, pkgs in repos.items():
        records = []
        for p in pkgs:
            apk, record = p.build()
            files[f"{p.name}-{p.version}.apk"] = apk
            mirror.add(f"{CDN}/{BRANCH}/{repo}/{arch}/{p.name}-{p.version}.apk", apk)  # type: ignore[attr-defined]
            records.append(record)
        mirror.add(f"{CDN}/{BRANCH}/{repo}/{arch}/APKINDEX.tar.gz", index(records, sha256_sig))  # type: ignore[attr-defined]
    return files


def repository(pkgs: list[Pkg], key: str = KEY_NAME) -> dict[str, bytes]:
    """A whole repository's files for one arch, as abuild and ``apk index`` + ``abuild-sign``
    leave them: ``{file name: bytes}`` with APKINDEX.tar.gz signed by ``key``."""
    files, records = {}, []
    for p in pkgs:
        apk, record = p.build()
        files[f"{p.name}-{p.version}.apk"] = apk
        records.append(record)
    files["APKINDEX.tar.gz"] = index(records, key=key)
    return files
