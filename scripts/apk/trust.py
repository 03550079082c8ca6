"""Trusted keys and signatures: APKINDEX.tar.gz and .apk signature members.

An APKINDEX.tar.gz is a gzip member holding a tar entry ``.SIGN.RSA.<key name>`` (RSA PKCS#1
v1.5 over SHA-1) or ``.SIGN.RSA256.<key name>`` (over SHA-256), followed by the gzip
member(s) of the index; the signature covers the raw bytes of everything after the first
member (apk-tools src/adb... v2 format: abuild-sign, apk_sign_ctx in src/package.c).
Keys are trusted by the SHA-256 of their DER SubjectPublicKeyInfo, so PEM formatting cannot
matter. RSA is done by the ``cryptography`` library, never by hand.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import tarfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

from ..errors import VulcanError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import rsa

# cryptography is imported where it is used: builds from a cached stream never load it (22 ms).


class TrustError(VulcanError):
    """A signature or checksum link of the trust chain is broken."""

    exit_code = 6


# One PEM public key block and nothing else (RFC 7468's strict form, with optional trailing
# white space): cryptography accepts text before "-----BEGIN", so a key URL serving a shell
# script followed by a key would otherwise pass, and the file would be kept as it was served.
_PEM = re.compile(rb"-----BEGIN PUBLIC KEY-----\r?\n(?:[A-Za-z0-9+/=]{1,76}\r?\n)+-----END PUBLIC KEY-----\s*")


def fingerprint(pem: bytes) -> str:
    """SHA-256 of the key's DER SubjectPublicKeyInfo; ValueError unless ``pem`` is exactly one
    PEM public key block."""
    from cryptography.hazmat.primitives import serialization

    if not _PEM.fullmatch(pem):
        raise ValueError("not exactly one PEM public key block (text before or after it, or another format)")
    key = serialization.load_pem_public_key(pem)
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def has_fingerprint(pem: bytes, sha256: str) -> bool:
    """``fingerprint(pem) == sha256``; without loading cryptography (~12 ms of a build's start)
    when the block's own DER is the pinned one, as in every key OpenSSL writes: bytes with the
    pinned SHA-256 are the pinned key's DER. Otherwise cryptography reads the key and says."""
    if not _PEM.fullmatch(pem):
        return False
    try:
        if hashlib.sha256(base64.b64decode(b"".join(pem.split(b"-----")[2].split()))).hexdigest() == sha256:
            return True
        return fingerprint(pem) == sha256
    except ValueError:  # not base64 (binascii.Error), or not a key cryptography reads
        return False


class Keyring(NamedTuple):
    keys: Mapping[str, rsa.RSAPublicKey]  # key file name -> key

    @classmethod
    def from_pems(cls, pems: Mapping[str, bytes]) -> Keyring:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        loaded = {}
        for name, pem in pems.items():
            key = serialization.load_pem_public_key(pem)
            if not isinstance(key, rsa.RSAPublicKey):
                raise TrustError(f"key {name} is not an RSA public key")
            loaded[name] = key
        return cls(loaded)


class Signature(NamedTuple):
    algorithm: str  # "RSA" (SHA-1) or "RSA256"
    key_name: str
    blob: bytes


def read_signatures(sig_member: bytes) -> list[Signature]:
    """The ``.SIGN.*`` entries of a decompressed signature tar (no end-of-archive blocks)."""
    sigs = []
    try:
        with tarfile.open(fileobj=io.BytesIO(sig_member), mode="r:") as tar:
            for m in tar:
                if not m.isfile() or not m.name.startswith(".SIGN."):
                    continue
                kind, _, key = m.name[len(".SIGN.") :].partition(".")
                if kind not in ("RSA", "RSA256") or not key:
                    continue
                f = tar.extractfile(m)
                assert f is not None
                sigs.append(Signature(kind, key, f.read()))
    except tarfile.TarError:
        return []
    return sigs


def verify(sigs: list[Signature], digests: Mapping[str, bytes], keyring: Keyring, what: str) -> str:
    """Accept if any signature by a trusted key verifies; return that key's name.

    ``digests`` maps "RSA"/"RSA256" to the SHA-1/SHA-256 digest of the signed bytes (hashed
    while streaming, so a large file is never held in memory).
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    if not sigs:
        raise TrustError(f"{what}: not signed (no .SIGN.RSA or .SIGN.RSA256 entry in the first gzip member)")
    trusted = [s for s in sigs if s.key_name in keyring.keys]
    if not trusted:
        names = ", ".join(sorted({s.key_name for s in sigs}))
        raise TrustError(
            f"{what}: signed by {names}, which is not a trusted key",
            hint="only the keys pinned for the repository it comes from are trusted (alpine.keys, or the "
            "repository's keys in pins.json): pin it there with its fingerprint if you mean to",
        )
    for sig in sorted(trusted, key=lambda s: s.algorithm != "RSA256"):  # prefer SHA-256
        algo: hashes.HashAlgorithm = hashes.SHA256() if sig.algorithm == "RSA256" else hashes.SHA1()
        try:
            keyring.keys[sig.key_name].verify(sig.blob, digests[sig.algorithm], padding.PKCS1v15(), Prehashed(algo))
            return sig.key_name
        except InvalidSignature:
            continue
    raise TrustError(f"{what}: the signature by {trusted[0].key_name} does not verify (the file was altered)")
