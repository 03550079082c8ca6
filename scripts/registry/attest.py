"""Signed statements about what is published: SLSA v1 provenance in DSSE envelopes.

An in-toto Statement v1 whose predicate is a SLSA v1 provenance, in a DSSE envelope
(securesystemslib's: the envelope of in-toto and of cosign's attestations), one per published
manifest, attached to it as a referrer.

The statement's ``subject`` is the manifest's digest: a valid signature by a trusted key over
a statement naming that digest is what a host requires before it uses what it pulled.
"""

from __future__ import annotations

import base64
import json
import os
import platform
from pathlib import Path
from typing import Any

from ..errors import VulcanError

STATEMENT = "https://in-toto.io/Statement/v1"
SLSA = "https://slsa.dev/provenance/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
BUILD_TYPE = "https://github.com/vulcan-sandbox/vulcan-images/build/v1"  # what `rootfs` + `download` do


class SignatureError(VulcanError):
    """A key cannot be used, or a signature does not verify against the trusted keys."""

    exit_code = 6


def load_private_key(pem: bytes, where: str) -> Any:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        return load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{where} is not an unencrypted PEM private key: {exc}",
                         hint="e.g. openssl genpkey -algorithm ed25519 -out signing.pem") from None  # fmt: skip


def load_public_keys(path: Path) -> list[Any]:
    """Every PEM public key in ``path`` (a host's trust file may hold several: key rotation)."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        text = path.read_text()
    except OSError as exc:
        raise SignatureError(
            f"trust file {path}: {exc.strerror or exc}", hint="pass --trust FILE or set VULCAN_TRUST"
        ) from None
    blocks = [b for b in text.split("-----END PUBLIC KEY-----") if "-----BEGIN PUBLIC KEY-----" in b]
    keys = []
    for b in blocks:
        pem = b[b.index("-----BEGIN PUBLIC KEY-----") :] + "-----END PUBLIC KEY-----\n"
        try:
            keys.append(load_pem_public_key(pem.encode()))
        except ValueError as exc:
            raise SignatureError(f"trust file {path}: a key that cannot be read: {exc}") from None
    if not keys:
        raise SignatureError(f"trust file {path} holds no PEM public key", hint="the publisher's public key: "
                         "openssl pkey -in signing.pem -pubout")  # fmt: skip
    return keys


def sign(statement: dict[str, Any], private_key: Any) -> bytes:
    """The statement in a DSSE envelope signed with ``private_key`` (JSON bytes)."""
    # securesystemslib here and below: 30 ms of imports, only where a statement is signed or checked
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined]

    payload = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()
    envelope = Envelope(payload=payload, payload_type=PAYLOAD_TYPE, signatures={})
    envelope.sign(CryptoSigner(private_key))
    return json.dumps(envelope.to_dict(), sort_keys=True).encode()


def verify(envelope_bytes: bytes, keys: list[Any], subject_digest: str) -> dict[str, Any]:
    """The statement of an envelope signed by one of ``keys`` whose subject is ``subject_digest``;
    SignatureError otherwise."""
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey  # type: ignore[attr-defined]

    try:
        envelope = Envelope.from_dict(json.loads(envelope_bytes))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise SignatureError(f"the signature is not a DSSE envelope: {str(exc)[:100] or type(exc).__name__}") from None
    if envelope.payload_type != PAYLOAD_TYPE:
        raise SignatureError(f"the envelope's payloadType is {envelope.payload_type!r}, not {PAYLOAD_TYPE!r}")
    try:
        envelope.verify([SSlibKey.from_crypto(k) for k in keys], 1)
    except Exception as exc:  # securesystemslib's VerificationError and what a bad signature raises
        raise SignatureError(f"not signed by a trusted key: {exc}") from None
    try:
        statement = json.loads(envelope.payload)
        subjects = statement.get("subject", [])
        digests = {f"sha256:{s.get('digest', {}).get('sha256')}" for s in subjects if isinstance(s, dict)}
    except (ValueError, AttributeError, RecursionError, TypeError):
        raise SignatureError("the signed payload is not an in-toto statement") from None
    if statement.get("_type") != STATEMENT or subject_digest not in digests:
        raise SignatureError(f"the signed statement is not about {subject_digest} (its subjects: {sorted(digests)})")
    return dict(statement)


def keyid(public_key: Any) -> str:
    from securesystemslib.signer import SSlibKey  # type: ignore[attr-defined]

    return str(SSlibKey.from_crypto(public_key).keyid)


def provenance(subject: str, digest: str, external: dict[str, Any], dependencies: list[dict[str, Any]],
               byproducts: list[dict[str, Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    """An in-toto Statement v1 with a SLSA v1 provenance predicate about one manifest."""
    builder = os.environ.get("GITHUB_WORKFLOW_REF")
    server = os.environ.get("GITHUB_SERVER_URL", "https://github.com")
    builder_id = f"{server}/{builder}" if builder else f"local:{platform.node() or 'unknown-host'}"
    run = os.environ.get("GITHUB_RUN_ID")
    repo = os.environ.get("GITHUB_REPOSITORY")
    metadata = {"invocationId": f"{server}/{repo}/actions/runs/{run}"} if run and repo else {}
    return {
        "_type": STATEMENT,
        "subject": [{"name": subject, "digest": {"sha256": digest.removeprefix("sha256:")}}],
        "predicateType": SLSA,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": external,
                "resolvedDependencies": dependencies,
            },
            "runDetails": {"builder": {"id": builder_id}, "metadata": metadata, "byproducts": byproducts or []},
        },
    }


def byproducts(statement: dict[str, Any]) -> dict[str, str]:
    """The files a statement vouches for besides its subject: name -> "sha256:<hex>"."""
    found: dict[str, str] = {}
    try:
        listed = statement["predicate"]["runDetails"]["byproducts"]
    except (KeyError, TypeError):
        return found
    for entry in listed if isinstance(listed, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("digest"), dict):
            sha = entry["digest"].get("sha256")
            if isinstance(sha, str):
                found[entry["name"]] = f"sha256:{sha}"
    return found


def q1_digest(checksum: str) -> dict[str, str]:
    """apk's ``Q1`` + base64(sha1) of a package's control part, as a digest set."""
    return {"sha1": base64.b64decode(checksum[2:]).hex()}
