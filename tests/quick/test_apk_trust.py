"""The trust chain on real Alpine data: signed indexes, package checksums, tampering."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.apk.index import parse_index
from scripts.apk.package import read_index, verify_package
from scripts.apk.trust import Keyring, TrustError, fingerprint, has_fingerprint

APKO = "chainguard-dev-apko/pkg/apk/apk/testdata"
ALPINE_KEYS = "csmith-apkutils/keys"
REAL_PACKAGES = [
    "jdrouet-inapt/resources/busybox-1.37.0-r14.apk",
    "jdrouet-inapt/resources/alpine-keys-2.5-r0.apk",
    "martencassel-go-apkutils/testdata/curl-7.83.1-r1.apk",
    "martencassel-go-apkutils/testdata/strace-5.17-r0.apk",
    "jirutka-alpkit/fixtures/apk/rssh-2.3.4-r3.apk",
    f"{APKO}/alpine-316/alpine-baselayout-3.2.0-r23.apk",
]


@pytest.fixture
def alpine(shared: Path) -> Keyring:
    return Keyring.from_pems({p.name: p.read_bytes() for p in (shared / ALPINE_KEYS).iterdir()})


def test_key_fingerprints_match_the_pinned_ones(shared: Path) -> None:
    keys = shared / ALPINE_KEYS
    pinned = {
        "4a6a0840": "4e0c26751a474db486b0a8f37e37ff02e12465e8cea8ef08614ac173cb870f28",
        "5261cecb": "bb1f0937c138e81a838e0958c4c756547dac85794e38bf1a5536a0808dcf95f2",
        "6165ee59": "8a70fc55f1a6fb2a392ad5a3e71aff82a637b2b33659c046f6b6a909bb5d1ab7",
        "58199dcc": "635a0325ac8c11ec329698586cd2a8e54c18ba376d5d4bc215a489e1a774fb88",
        "616ae350": "479f16f4170a9ea0c65e1de854860949b1a549cfa1f43552f7a2e821c9e2f409",
    }
    for short, digest in pinned.items():
        pem = (keys / f"alpine-devel@lists.alpinelinux.org-{short}.rsa.pub").read_bytes()
        assert fingerprint(pem) == digest
        # PEM formatting cannot matter: re-wrapped lines give the same fingerprint
        body = b"".join(pem.split(b"\n")[1:-2])
        rewrapped = b"-----BEGIN PUBLIC KEY-----\n" + b"\n".join(body[i : i + 40] for i in range(0, len(body), 40))
        assert fingerprint(rewrapped + b"\n-----END PUBLIC KEY-----\n") == digest
        # the check a build makes of a cached key (without loading cryptography) says the same
        assert has_fingerprint(pem, digest) and has_fingerprint(rewrapped + b"\n-----END PUBLIC KEY-----\n", digest)
        assert not has_fingerprint(pem, digest[::-1])
        assert not has_fingerprint(b"#!/bin/sh\nrm -rf ~\n" + pem, digest)  # text before the block
    other = (keys / "alpine-devel@lists.alpinelinux.org-5261cecb.rsa.pub").read_bytes()
    assert not has_fingerprint(other, pinned["4a6a0840"])
    not_base64 = b"-----BEGIN PUBLIC KEY-----\nABCDE\n-----END PUBLIC KEY-----\n"  # a cache file gone bad
    assert not has_fingerprint(not_base64, pinned["4a6a0840"])  # refused, not a traceback


@pytest.mark.parametrize(
    ("path", "key", "count"),
    [("alpine-316", "6165ee59", 4929), ("alpine-317", "616ae350", 5004)],
)
def test_real_alpine_indexes_verify(shared: Path, alpine: Keyring, path: str, key: str, count: int) -> None:
    text, signer = read_index((shared / APKO / path / "APKINDEX.tar.gz").read_bytes(), alpine, path)
    assert signer == f"alpine-devel@lists.alpinelinux.org-{key}.rsa.pub"
    assert len(parse_index(text).packages) == count


def test_rsa256_and_multi_signature_test_indexes_verify(shared: Path) -> None:
    d = shared / APKO / "rsa256-signed"
    ring = Keyring.from_pems({"test-rsa256.rsa.pub": (d / "test-rsa256.rsa.pub").read_bytes()})
    assert read_index((d / "APKINDEX.tar.gz").read_bytes(), ring, "rsa256")[1] == "test-rsa256.rsa.pub"
    d = shared / APKO / "signing"
    ring = Keyring.from_pems({p.name: p.read_bytes() for p in (d / "keys").iterdir()})
    text, signer = read_index((d / "APKINDEX.tar.gz").read_bytes(), ring, "signing")
    assert signer in ring.keys and "P:7zip" in text


@pytest.mark.parametrize(
    "path",
    [
        f"{APKO}/APKINDEX.tar.gz",  # signature not first: cannot verify
        "martencassel-go-apkutils/testdata/APKINDEX.tar.gz",  # bogus key name
        "martencassel-go-apkutils/testdata/APKINDEX.unsigned.tar.gz",
    ],
)
def test_unverifiable_indexes_are_rejected(shared: Path, alpine: Keyring, path: str) -> None:
    with pytest.raises(TrustError):
        read_index((shared / path).read_bytes(), alpine, path)


def test_one_flipped_byte_anywhere_in_a_signed_index_is_rejected(shared: Path, alpine: Keyring) -> None:
    data = (shared / APKO / "alpine-316/APKINDEX.tar.gz").read_bytes()
    for pos in [10, 300, len(data) // 3, len(data) // 2, len(data) - 9]:
        bad = bytearray(data)
        bad[pos] ^= 0x01
        with pytest.raises(TrustError):
            read_index(bytes(bad), alpine, "flipped")


def test_index_signed_by_an_untrusted_key_names_the_key(shared: Path) -> None:
    data = (shared / APKO / "alpine-316/APKINDEX.tar.gz").read_bytes()
    only_other = Keyring.from_pems(
        {"k.rsa.pub": (shared / ALPINE_KEYS / "alpine-devel@lists.alpinelinux.org-4a6a0840.rsa.pub").read_bytes()}
    )
    with pytest.raises(TrustError, match=r"6165ee59\.rsa\.pub, which is not a trusted key"):
        read_index(data, only_other, "v3.16 main")


@pytest.mark.parametrize("path", REAL_PACKAGES)
def test_real_packages_pass_the_chain(shared: Path, alpine: Keyring, path: str) -> None:
    v = verify_package(shared / path, None, alpine, path)
    assert v.pkginfo["datahash"][0] == v.data_sha256


def test_index_checksums_vouch_for_real_packages(shared: Path) -> None:
    excerpt = parse_index((shared / "martencassel-go-apkutils/testdata/apkindex.txt").read_text()).packages
    records = {p.name: p for p in excerpt}
    for name in ("curl", "strace"):
        path = next((shared / "martencassel-go-apkutils/testdata").glob(f"{name}-*.apk"))
        v = verify_package(path, records[name], None, path.name)
        assert v.checksum == records[name].checksum


@pytest.mark.parametrize("where", ["control", "data", "signature"])
def test_tampered_packages_fail_and_say_which_link(shared: Path, alpine: Keyring, tmp_path: Path, where: str) -> None:
    src = shared / "martencassel-go-apkutils/testdata/curl-7.83.1-r1.apk"
    record = {p.name: p for p in parse_index((src.parent / "apkindex.txt").read_text()).packages}["curl"]
    good = verify_package(src, record, None, "curl")
    data = bytearray(src.read_bytes())
    pos = {"signature": 40, "control": good.data_offset - 30, "data": good.data_offset + 5000}[where]
    data[pos] ^= 0x01
    bad = tmp_path / "curl.apk"
    bad.write_bytes(bytes(data))
    with pytest.raises(TrustError) as info:
        verify_package(bad, record, None, "curl")
        verify_package(bad, None, alpine, "curl")  # signature flips break the package's own signature
    if where == "data":
        assert "control -> data" in str(info.value)
    elif where == "control":
        assert "index -> control" in str(info.value) or "corrupt" in str(info.value)


def test_package_with_wrong_size_is_rejected(shared: Path) -> None:
    src = shared / "martencassel-go-apkutils/testdata/strace-5.17-r0.apk"
    record = {p.name: p for p in parse_index((src.parent / "apkindex.txt").read_text()).packages}["strace"]
    from dataclasses import replace

    with pytest.raises(TrustError, match="differs from the index's S:"):
        verify_package(src, replace(record, size=record.size + 1), None, "strace")
