"""OCI 1.1 artifacts: our media types, descriptors, image manifests and indexes.

Every document is written as compact JSON with sorted keys: the same files give the same bytes,
hence the same digest, so publishing twice changes nothing (image-spec manifest.md, artifacts
guidance: ``artifactType``, the empty config, ``subject``; ORAS names each layer's file with
``org.opencontainers.image.title``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from ..formats import FORMATS

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_DATA = b"{}"
TITLE = "org.opencontainers.image.title"
# On a compressed layer: the sha256 of what it decompresses to, measured by publish from the bytes
# it compressed (what containerd's "containerd.io/uncompressed" label says of a layer); a pull
# that finds it in a signed manifest, equal to the sha256 manifest.json names, need not hash the
# image it decompresses (registry/blobs.py)
CONTENT = "vnd.vulcan.content.digest"

# Ours (vnd.vulcan.*). An image manifest per runtime and architecture holds the images and their
# manifest; a host manifest per architecture holds Firecracker, the jailer and the kernel.
RUNTIME_ARTIFACT = "application/vnd.vulcan.rootfs.v1"
HOST_ARTIFACT = "application/vnd.vulcan.host.v1"
IMAGE_MANIFEST = "application/vnd.vulcan.rootfs.manifest.v1+json"  # images/<runtime>.manifest.json
# a layer's media type per image format: ext4 is sparse (mostly holes), so it travels zstd-compressed
# and is written back sparse; squashfs is compressed already and travels as it is
FORMAT_LAYER = {f.name: f"application/vnd.vulcan.rootfs.{f.name}.v1" + ("+zstd" if f.sparse else "")
                for f in FORMATS.values()}  # fmt: skip
HOST_LAYER = {
    "firecracker": "application/vnd.vulcan.host.firecracker.v1",
    "jailer": "application/vnd.vulcan.host.jailer.v1",
    "vmlinux": "application/vnd.vulcan.host.kernel.v1",
    "vulcan-guest": "application/vnd.vulcan.host.agent.v1",  # the agent the images hold (verify compares)
}
SBOM = "application/spdx+json"
DSSE = "application/vnd.dsse.envelope.v1+json"
ATTESTATION = "application/vnd.in-toto+json"  # a referrer's artifactType: a signed in-toto statement
COMPRESSED = {media for media in FORMAT_LAYER.values() if media.endswith("+zstd")}
PLATFORM = {"x86_64": {"architecture": "amd64", "os": "linux"}, "aarch64": {"architecture": "arm64", "os": "linux"}}
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def sized(desc: dict[str, Any]) -> bool:
    """A descriptor with a sha256 digest and a size: what a download needs to check the bytes."""
    digest, size = desc.get("digest"), desc.get("size")
    return isinstance(digest, str) and bool(DIGEST.fullmatch(digest)) and isinstance(size, int) and size >= 0


def canonical(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Blob:
    """A blob to push: its descriptor fields, and where its bytes are (``data``, or a file)."""

    media_type: str
    digest: str
    size: int
    data: bytes | None = None
    path: str | None = None
    title: str | None = None
    content: str | None = None  # a compressed blob: "sha256:<hex>" of what it decompresses to

    def descriptor(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        notes = {**({TITLE: self.title} if self.title else {}), **({CONTENT: self.content} if self.content else {})}
        if notes:
            d["annotations"] = notes
        return d


def empty_config() -> Blob:
    return Blob(EMPTY, digest_of(EMPTY_DATA), len(EMPTY_DATA), EMPTY_DATA)


def manifest(artifact_type: str, layers: list[Blob], subject: dict[str, Any] | None = None,
             annotations: dict[str, str] | None = None) -> bytes:  # fmt: skip
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "artifactType": artifact_type,
        "config": {**empty_config().descriptor(), "data": base64.b64encode(EMPTY_DATA).decode()},
        "layers": [b.descriptor() for b in layers],
    }
    if subject is not None:
        doc["subject"] = subject
    if annotations:
        doc["annotations"] = annotations
    return canonical(doc)


def index(entries: list[dict[str, Any]], artifact_type: str | None = None,
          annotations: dict[str, str] | None = None) -> bytes:  # fmt: skip
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": INDEX, "manifests": entries}
    if artifact_type:
        doc["artifactType"] = artifact_type
    if annotations:
        doc["annotations"] = annotations
    return canonical(doc)


def descriptor_of(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": digest_of(data), "size": len(data), **extra}


def referrers_tag(digest: str) -> str:
    """The referrers tag schema's tag for a subject (distribution-spec: ``sha256-<hex>``)."""
    return digest.replace(":", "-")
