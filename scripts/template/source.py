"""An OCI image's documents and layers: from its registry, by digest, into the content-addressed cache.

What a registry serves is checked as it streams: a manifest or config against the digest that
named it (bounded in size), a layer against its descriptor's digest and size; nothing that fails
is kept. Cached entries (``$VULCAN_CACHE/sha256/XX/HEX``, shared with every other download) are
re-hashed on use, so a build from a warm cache needs no registry at all. OCI and Docker media
types both: image indexes and Docker manifest lists, OCI and Docker schema 2 manifests, layers
uncompressed, gzip or zstd.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import log, paths, settings
from ..arch import GOARCH
from ..errors import BuildError, UsageError
from ..fetch import cache_entry, file_lock, writable
from ..hashing import sha256_file

DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEXES = (OCI_INDEX, DOCKER_LIST)
MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
CONFIGS = ("application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json")
# layer media type -> its compression ("" uncompressed)
LAYERS = {
    "application/vnd.oci.image.layer.v1.tar": "",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
}
MAX_DOCUMENT = 4 << 20  # a manifest, index or config (distribution refuses manifests over 4 MiB)
# Docker Hub's names (docker.io/library/python) and the host its API is served from
API_HOSTS = {"docker.io": "registry-1.docker.io", "index.docker.io": "registry-1.docker.io"}
LOCK_HINT = "run 'nox -s lock' (it resolves the reference for each architecture) and commit alpine.lock.json"


class TemplateError(BuildError):
    """An image that cannot be a template as it is (the input, not the network)."""

    exit_code = 4


class NoPlatform(TemplateError):
    """The image has no build for an architecture."""


@dataclass(frozen=True)
class Layer:
    digest: str
    size: int
    media_type: str

    @property
    def compression(self) -> str:
        return LAYERS[self.media_type]


@dataclass(frozen=True)
class LockedImage:
    """What the lock records of a template for one architecture."""

    reference: str  # as pins.json has it
    index: str  # the index or manifest list the reference named ("" when it named a manifest)
    manifest: str  # this architecture's manifest digest
    config: str
    created: int  # the config's "created", in seconds (0 when it has none)
    layers: tuple[Layer, ...]

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["layers"] = [asdict(layer) for layer in self.layers]
        return doc

    @classmethod
    def from_json(cls, doc: Any, where: str) -> LockedImage:
        from ..apk.lockfile import RELOCK_HINT, LockError

        try:
            layers = tuple(Layer(str(x["digest"]), int(x["size"]), str(x["media_type"])) for x in doc["layers"])
            image = cls(
                str(doc["reference"]),
                str(doc["index"]),
                str(doc["manifest"]),
                str(doc["config"]),
                int(doc["created"]),
                layers,
            )
        except (KeyError, TypeError, ValueError):
            raise LockError(f"{where}: not a template entry this tool writes", hint=RELOCK_HINT) from None
        for d in (image.manifest, image.config, *(x.digest for x in layers), *([image.index] if image.index else [])):
            if not _digest_ok(d):
                raise LockError(f"{where}: {d!r} is not a sha256 digest", hint=RELOCK_HINT)
        for x in layers:
            if x.media_type not in LAYERS:
                raise LockError(
                    f"{where}: layer {x.digest}: media type {x.media_type!r} not supported", hint=RELOCK_HINT
                )
        return image


def _digest_ok(d: str) -> bool:
    return d.startswith("sha256:") and len(d) == 71 and all(c in "0123456789abcdef" for c in d[7:])


@dataclass(frozen=True)
class Source:
    """Where a template's bytes come from: the registry (connected on first need) and repository."""

    reference: str

    @property
    def parsed(self) -> Any:
        from ..registry.client import Reference

        return Reference.parse(self.reference, "image.reference")

    @property
    def api(self) -> tuple[str, str]:
        """The host that serves the registry API, and the repository's name there."""
        ref = self.parsed
        host = API_HOSTS.get(ref.registry, ref.registry)
        if host == "registry-1.docker.io" and "/" not in ref.repository:
            return host, f"library/{ref.repository}"  # docker.io/python is docker.io/library/python
        return host, ref.repository

    @contextlib.contextmanager
    def registry(self) -> Iterator[tuple[Any, str]]:
        from ..registry import auth
        from ..registry.client import Registry

        ref = self.parsed
        host, repo = self.api
        # Docker's config.json only, by host (Docker Hub's key is index.docker.io): the
        # VULCAN_REGISTRY_USER of publish and pull names no registry, and a build may reach several
        login = "index.docker.io" if ref.registry in API_HOSTS else ref.registry
        reg = Registry(
            host,
            credentials=auth.credentials_for(login, environment=False),
            ca=settings.registry_ca(),
            insecure=ref.registry in settings.registry_insecure(),
            timeout=settings.registry_timeout(),
            deadline=settings.registry_deadline(),
        )
        try:
            yield reg, repo
        finally:
            reg.transport.close()


def upstream_urls(image: LockedImage) -> dict[str, str]:
    """digest -> the registry URL that serves it (``https://HOST/v2/REPO/{manifests,blobs}/D``):
    where ``nox -s mirror`` puts a template's documents and layers, and VULCAN_MIRROR finds them."""
    host, repo = Source(image.reference).api
    base = f"https://{host}/v2/{repo}"
    urls = {image.manifest: f"{base}/manifests/{image.manifest}", image.config: f"{base}/blobs/{image.config}"}
    urls.update({x.digest: f"{base}/blobs/{x.digest}" for x in image.layers})
    return urls


def cache_path(digest: str) -> Path:
    hexd = digest.split(":", 1)[1]
    return paths.cache_dir() / "sha256" / hexd[:2] / hexd


def _cached(digest: str) -> Path | None:
    path = cache_path(digest)
    if path.is_file():
        if sha256_file(path) == digest[7:]:
            return path
        if writable(path):
            log.warn(f"cache entry {path} is corrupt; fetching {digest} again")
            path.unlink(missing_ok=True)
    return None


def document(source: Source, reg: Any, repo: str, ref: str, what: str) -> tuple[dict[str, Any], str, str]:
    """(JSON, media type, digest) of a manifest or index: from the cache by digest, else the registry."""
    from ..registry.client import parse_json

    hit = _cached(ref) if ref.startswith("sha256:") else None
    if hit is not None:
        body, served = hit.read_bytes(), ""
    else:
        body, served, _ = reg.manifest(repo, ref)  # a digest reference is checked by the client
        if ref.startswith("sha256:"):
            _store(ref, body)
    doc = parse_json(body, f"{source.reference}: {what}")
    media = doc.get("mediaType") or served  # schema 2 and OCI documents name their own type
    return doc, str(media or ""), "sha256:" + hashlib.sha256(body).hexdigest()


def _store(digest: str, data: bytes) -> None:
    path = cache_path(digest)
    if not writable(path):
        return
    paths.claim_cache()
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path):
        part = path.with_name(path.name + ".part")
        part.write_bytes(data)
        os.replace(part, path)


def _platform_ok(entry: dict[str, Any], arch: str) -> bool:
    p = entry.get("platform") or {}
    if p.get("os") != "linux" or p.get("architecture") != GOARCH[arch]:
        return False
    return arch != "aarch64" or p.get("variant") in (None, "", "v8")


def resolve(reference: str, arch: str) -> LockedImage:
    """The reference (a tag or digest) resolved for ``arch``: what ``nox -s lock`` records."""
    source = Source(reference)
    ref = source.parsed
    with source.registry() as (reg, repo):
        doc, media, digest = document(source, reg, repo, ref.ref, "the manifest")
        if ref.digest and digest != ref.digest:
            from ..registry.client import Refused

            raise Refused(f"{reference}: the registry served a document with digest {digest}: refused")
        index = ""
        if media in INDEXES or (not media and "manifests" in doc):
            index = digest
            entries = [e for e in doc.get("manifests", []) if isinstance(e, dict) and _platform_ok(e, arch)]
            if not entries:
                have = sorted(
                    {
                        f"{(e.get('platform') or {}).get('os')}/{(e.get('platform') or {}).get('architecture')}"
                        for e in doc.get("manifests", [])
                        if isinstance(e, dict)
                    }
                )
                raise NoPlatform(
                    f"{reference}: no linux/{GOARCH[arch]} image in its index (it has {', '.join(have) or 'none'})",
                    hint=f"pick an image built for {arch}, or leave {arch} out of the build",
                )
            doc, media, digest = document(source, reg, repo, entries[0]["digest"], f"the {arch} manifest")
            if digest != entries[0]["digest"]:
                raise AssertionError("checked by document()")
        return _locked(source, reg, repo, reference, index, doc, media, digest, arch)


def _locked(
    source: Source,
    reg: Any,
    repo: str,
    reference: str,
    index: str,
    doc: dict[str, Any],
    media: str,
    digest: str,
    arch: str,
) -> LockedImage:
    if media not in MANIFESTS and not (not media and "layers" in doc):
        raise TemplateError(
            f"{reference}: {digest} is a {media or 'document without a media type'}, not an image "
            "manifest (OCI or Docker schema 2)",
            hint="name an image (Docker schema 1 images are not supported: push them again)",
        )
    config = doc.get("config") or {}
    if config.get("mediaType") not in CONFIGS or not _digest_ok(str(config.get("digest", ""))):
        raise TemplateError(
            f"{reference}: {digest}: its config ({config.get('mediaType')}) is not an image config",
            hint="an artifact (a Helm chart, a signature) is not an image",
        )
    layers = []
    for i, d in enumerate(doc.get("layers") or []):
        if not isinstance(d, dict) or d.get("mediaType") not in LAYERS or not _digest_ok(str(d.get("digest", ""))):
            kind = d.get("mediaType") if isinstance(d, dict) else d
            raise TemplateError(
                f"{reference}: layer {i} ({kind}) is not a layer this tool applies",
                hint=f"layers may be {', '.join(sorted(LAYERS))}",
            )
        if not isinstance(d.get("size"), int) or d["size"] < 0:
            raise TemplateError(f"{reference}: layer {d['digest']} has no size")
        layers.append(Layer(d["digest"], d["size"], d["mediaType"]))
    cfg = config_json(source, reg, repo, config["digest"], int(config.get("size", 0)))
    os_arch = (cfg.get("os"), cfg.get("architecture"))
    if os_arch != ("linux", GOARCH[arch]):
        raise NoPlatform(f"{reference}: its config says {os_arch[0]}/{os_arch[1]}, not linux/{GOARCH[arch]}")
    return LockedImage(reference, index, digest, config["digest"], created(cfg), tuple(layers))


def config_json(source: Source, reg: Any, repo: str, digest: str, size: int) -> dict[str, Any]:
    from ..registry.client import parse_json

    hit = _cached(digest)
    if hit is not None:
        body = hit.read_bytes()
    else:
        if not 0 < size <= MAX_DOCUMENT:
            raise TemplateError(f"{source.reference}: config {digest} of {size} bytes: refused")
        body = reg.small_blob(repo, {"digest": digest, "size": size}, "the image config", MAX_DOCUMENT)
        _store(digest, body)
    return parse_json(body, f"{source.reference}: config {digest}")


def created(cfg: dict[str, Any]) -> int:
    """The config's ``created`` (RFC 3339) in whole seconds; 0 without one."""
    text = cfg.get("created")
    if not isinstance(text, str) or not text:
        return 0
    try:
        when = datetime.datetime.fromisoformat(text)  # Go's nanoseconds and "Z" too (Python 3.11)
    except ValueError:
        return 0
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(0, int(when.timestamp()))


def layer(source: Source, reg: Any, repo: str, x: Layer) -> Path:
    """The layer's cache entry, fetched now if it is not cached (checked as it streams)."""
    return cache_entry(x.digest.removeprefix("sha256:"), lambda path: _download(source, reg, repo, x, path),
                       f"{source.reference} layer {x.digest}")  # fmt: skip


def _download(source: Source, reg: Any, repo: str, x: Layer, path: Path) -> None:
    """The layer from the registry into ``path`` (through ``.part``), only if it is its digest."""
    from ..registry.blobs import BlobError

    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    h = hashlib.sha256()
    n = 0
    with reg.blob(repo, x.digest) as resp, open(part, "wb") as out:
        for chunk in reg.chunks(resp, x.size, f"layer {x.digest}"):
            h.update(chunk)
            out.write(chunk)
            n += len(chunk)
    reg.received += n
    if n != x.size or "sha256:" + h.hexdigest() != x.digest:
        part.unlink(missing_ok=True)
        raise BlobError(
            f"{source.reference}: layer {x.digest} was served as {n:,} bytes with sha256 "
            f"{h.hexdigest()}: refused, nothing kept"
        )
    os.replace(part, path)


def check_pinned(reference: str) -> None:
    """A build with no lock entry may resolve a digest reference (its bytes are pinned); a tag
    is for ``nox -s lock`` alone."""
    if "@sha256:" not in reference:
        raise UsageError(f"image.reference {reference!r} names a tag, which a build does not resolve", hint=LOCK_HINT)


def config_of(image: LockedImage) -> dict[str, Any]:
    """The cached config (the build fetched it); its runtime part (``config``)."""
    path = cache_path(image.config)
    cfg = json.loads(path.read_bytes())
    inner = cfg.get("config") or {}
    return inner if isinstance(inner, dict) else {}
