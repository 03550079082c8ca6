"""`nox -s publish -- --to REGISTRY/REPOSITORY`: what is built, to an OCI registry, signed.

For every runtime and architecture that has images: an image manifest (artifactType
``application/vnd.vulcan.rootfs.v1``, the empty config, a layer per file: the ext4 image
zstd-compressed, the squashfs image as it is, the image manifest.json), and per runtime an
image index whose entries carry their platform, tagged ``<runtime>-<pins id>``. Per
architecture a host manifest (Firecracker, the jailer, the kernel, the agent) and a host index,
tagged ``host-<pins id>``. Each manifest and index gets referrers (``subject``): a DSSE-signed
SLSA v1 provenance and, for a runtime, its SPDX SBOM; through the referrers API where the
registry has it, else the referrers tag schema (an index tagged ``sha256-<hex>``).

The pins id is the first 12 hex digits of the sha256 of pins.json and alpine.lock.json: the same
pins and lock build the same bytes, so a tag names one content; a new pin or lock gets a new tag
and the old ones stay valid. Hosts pin digests, which ``publish`` prints and writes
(``--digests FILE``, default images/published.json).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import atomic, formats, log, paths, settings, workspace
from ..arch import ARCHES, host_arch
from ..errors import VulcanError
from ..hashing import sha256_file
from ..pins import Pins
from ..pins import load as load_pins
from ..steps import prog
from . import attest, auth, oci
from .client import Reference, Registry, RegistryError, parse_json

# Single-threaded: the same image compresses to the same bytes, so the same digest. Level 3 (zstd's
# default): 2-3x faster than 9 on these images for a few percent more bytes on the wire.
ZSTD_LEVEL = 3


@dataclass
class Published:
    """What one publish pushed, for the digests file and the log."""

    repository: str
    entries: dict[str, Any] = field(default_factory=dict)
    uploaded: int = 0  # blob bytes sent
    payload: int = 0  # the size of every blob published (compressed where it travels compressed)


def pins_id(pins_file: Path) -> str:
    h = hashlib.sha256(pins_file.read_bytes())
    lock = pins_file.with_name("alpine.lock.json")
    h.update(lock.read_bytes() if lock.is_file() else b"")
    return h.hexdigest()[:12]


class Fingerprints:
    """sha256 of files already hashed, by (device, inode, size, mtime): a second publish of
    unchanged files hashes and compresses nothing (kept in the cache's oci/ directory)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.known: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            self.known = {}

    def key(self, f: Path) -> str:
        st = os.stat(f)
        return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"

    def get(self, f: Path, what: str) -> Any:
        return self.known.get(f"{what}:{self.key(f)}")

    def put(self, f: Path, what: str, value: Any) -> None:
        self.known[f"{what}:{self.key(f)}"] = value
        atomic.write_text(self.path, json.dumps(self.known, indent=0))

    def sha256(self, f: Path) -> str:
        digest = self.get(f, "sha256")
        if digest is None:
            digest = "sha256:" + sha256_file(f)
            self.put(f, "sha256", digest)
        return str(digest)


def as_built(image: Path, digest: str, doc: dict[str, Any], man: Path) -> None:
    """``image`` is the one its manifest names (sha256 and size): a writable ext4 booted in place,
    or a file copied over it, is not what the build measured, and a host would be sent bytes
    that its signed manifest does not describe."""
    named = {e.get("image"): e for e in doc.get("images", []) if isinstance(e, dict)}.get(image.name, {})
    if (named.get("sha256"), named.get("size")) != (digest.removeprefix("sha256:"), image.stat().st_size):
        raise VulcanError(f"{paths.rel(image)} is not the image {paths.rel(man)} names (sha256 "
                          f"{named.get('sha256')}): it changed after it was built, nothing was published",
                          hint=f"build it again (nox -s rootfs-{doc.get('runtime', '<runtime>')}), then publish; "
                          "boot a copy, not the image itself")  # fmt: skip


def compressed(image: Path, media_type: str, cache: Path, prints: Fingerprints) -> oci.Blob:
    """The image zstd-compressed (kept in the cache by the image's fingerprint), as a blob."""
    import tempfile

    import zstandard

    known, content = prints.get(image, "zstd"), prints.get(image, "sha256")
    if known is not None and content is not None and (cache / known["digest"].replace(":", "-")).is_file():
        return oci.Blob(media_type, known["digest"], known["size"], path=str(cache / known["digest"].replace(":", "-")),
                        title=image.name, content=content)  # fmt: skip
    cache.mkdir(parents=True, exist_ok=True)
    with workspace.directory_lock(cache):  # a publish killed while compressing left its file: swept here
        for dead in cache.glob(".zstd-*.tmp"):
            workspace.remove_if_abandoned(dead, 0, lambda p: p.unlink(missing_ok=True))
        fd, name = tempfile.mkstemp(prefix=".zstd-", suffix=".tmp", dir=cache)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held while this run writes it: another run's sweep leaves it
    h, raw = hashlib.sha256(), hashlib.sha256()  # the blob's digest; the image's, read in the same pass
    try:
        with open(image, "rb") as src, os.fdopen(fd, "wb") as out:
            cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=0, write_checksum=True)
            sink: Any = _Hashing(out, h)
            with cctx.stream_writer(sink, closefd=False, size=os.fstat(src.fileno()).st_size) as w:
                while chunk := src.read(1 << 20):
                    raw.update(chunk)
                    w.write(chunk)
            out.flush()
            digest = "sha256:" + h.hexdigest()
            size = os.fstat(out.fileno()).st_size
            os.rename(name, cache / digest.replace(":", "-"))  # while its flock is held
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    content = "sha256:" + raw.hexdigest()
    prints.put(image, "sha256", content)
    prints.put(image, "zstd", {"digest": digest, "size": size})
    return oci.Blob(media_type, digest, size, path=str(cache / digest.replace(":", "-")), title=image.name,
                    content=content)  # fmt: skip


class _Hashing:
    def __init__(self, out: Any, h: Any) -> None:
        self.out, self.h = out, h

    def write(self, data: bytes) -> int:
        self.h.update(data)
        return int(self.out.write(data))

    def flush(self) -> None:
        self.out.flush()


def file_blob(media_type: str, f: Path, prints: Fingerprints, title: str | None = None) -> oci.Blob:
    return oci.Blob(media_type, prints.sha256(f), f.stat().st_size, path=str(f), title=title or f.name)


class Publisher:
    def __init__(self, reg: Registry, repo: str, key: Any, mount_from: str | None) -> None:
        self.reg, self.repo, self.key, self.mount_from = reg, repo, key, mount_from
        self.result = Published(f"{reg.name}/{repo}")
        self.public = key.public_key() if key is not None else None

    def blob(self, b: oci.Blob) -> None:
        self.result.payload += b.size
        if (
            self.mount_from
            and not self.reg.has_blob(self.repo, b.digest)
            and self.reg.mount(self.repo, b.digest, self.mount_from)
        ):
            log.info(f"{b.title or b.digest}: mounted from {self.mount_from}")
            return
        sent = self.reg.push_blob(self.repo, b)
        self.result.uploaded += sent
        if sent:
            log.info(f"{b.title or b.digest}: uploaded {log.human(sent)}")

    def manifest(self, body: bytes, media_type: str, tag: str | None = None) -> dict[str, Any]:
        """Push a manifest (by digest, and by ``tag``); its descriptor."""
        digest = oci.digest_of(body)
        ref = tag or digest
        if self.reg.manifest_digest(self.repo, ref) != digest:
            resp = self.reg.put_manifest(self.repo, ref, body, media_type)
            subject = json.loads(body).get("subject")
            if subject is not None and not resp.headers.get("OCI-Subject"):
                self._tag_schema(subject["digest"], body)
        return {"mediaType": media_type, "digest": digest, "size": len(body)}

    def _tag_schema(self, subject: str, referrer: bytes) -> None:
        """Add a referrer to its subject's ``sha256-<hex>`` index (the registry has no referrers API)."""
        tag = oci.referrers_tag(subject)
        try:
            doc = json.loads(self.reg.manifest(self.repo, tag)[0])
            entries = list(doc.get("manifests", []))
        except RegistryError:
            entries = []
        doc_r = json.loads(referrer)
        entry = oci.descriptor_of(oci.MANIFEST, referrer, artifactType=doc_r.get("artifactType"))
        if any(e.get("digest") == entry["digest"] for e in entries):
            return
        entries.append(entry)
        self.reg.put_manifest(self.repo, tag, oci.index(entries), oci.INDEX)

    def referrers(self, digest: str) -> list[dict[str, Any]]:
        return self.reg.referrers_of(self.repo, digest)

    def attach(self, subject: dict[str, Any], artifact_type: str, blob: oci.Blob) -> None:
        self.blob(blob)
        body = oci.manifest(artifact_type, [blob], subject=subject)
        self.manifest(body, oci.MANIFEST)

    def index(self, name: str, tag: str, artifact_type: str, entries: list[dict[str, Any]], where: str,
              external: dict[str, Any]) -> None:  # fmt: skip
        """An index of one manifest per platform, tagged and signed; recorded as ``name``."""
        idx = self.manifest(oci.index(entries, artifact_type), oci.INDEX, tag)
        self.sign(idx, attest.provenance(f"{where}:{tag}", idx["digest"], external, _members(entries)))
        self.result.entries[name] = {"tag": tag, "digest": idx["digest"], "reference": f"{where}@{idx['digest']}",
                                     "manifests": {arch_of(e): e["digest"] for e in entries}}  # fmt: skip

    def sign(self, subject: dict[str, Any], statement: dict[str, Any]) -> None:
        """Attach a signed provenance unless one by this key is attached already (signatures
        may be randomised: a second publish must not add another)."""
        if self.key is None:
            return
        for r in self.referrers(subject["digest"]):
            if r.get("artifactType") != oci.ATTESTATION:
                continue
            try:
                layers = parse_json(self.reg.manifest(self.repo, r["digest"])[0], "a signature").get("layers", [])
                envelope = self.reg.small_blob(self.repo, layers[0], "a signature")
                signed = attest.verify(envelope, [self.public], subject["digest"])
            except (RegistryError, attest.SignatureError, IndexError, KeyError, TypeError, AttributeError):
                continue
            if attest.byproducts(signed) == attest.byproducts(statement):
                return  # signed by us already, naming the same files
        envelope = attest.sign(statement, self.key)
        self.attach(subject, oci.ATTESTATION, oci.Blob(oci.DSSE, oci.digest_of(envelope), len(envelope), envelope,
                                                        title="provenance.dsse.json"))  # fmt: skip


def publish(pins: Pins, pins_file: Path, target: Reference, reg: Registry, key: Any, mount_from: str | None,
            arches: list[str]) -> Published:  # fmt: skip
    p = Publisher(reg, target.repository, key, mount_from)
    where = f"{target.registry}/{target.repository}"
    ident = pins_id(pins_file)
    cache = paths.cache_dir() / "oci"
    prints = Fingerprints(cache / "fingerprints.json")
    config = oci.empty_config()
    external = {"pins": {"sha256": sha256_file(pins_file)}, "pins_id": ident}
    lock = pins_file.with_name("alpine.lock.json")
    if lock.is_file():
        external["lock"] = {"sha256": sha256_file(lock)}
    for runtime in pins.alpine.runtimes:  # every image the one its manifest names, before anything is pushed
        for arch in arches:
            man = paths.manifest(runtime, arch)
            for f in formats.NAMES if man.is_file() else ():
                img = paths.image(runtime, f, arch)
                if img.is_file():
                    if oci.FORMAT_LAYER[f] in oci.COMPRESSED:  # measured while it is compressed (kept for the push)
                        compressed(img, oci.FORMAT_LAYER[f], cache / "blobs", prints)
                    as_built(img, prints.sha256(img), json.loads(man.read_text()), man)
    for runtime in pins.alpine.runtimes:
        platforms = []
        for arch in arches:
            man = paths.manifest(runtime, arch)
            images = [
                (f, paths.image(runtime, f, arch)) for f in formats.NAMES if paths.image(runtime, f, arch).is_file()
            ]
            if not images or not man.is_file():
                continue
            p.blob(config)
            media = {f: oci.FORMAT_LAYER[f] for f, _ in images}
            layers = [compressed(img, media[f], cache / "blobs", prints) if media[f] in oci.COMPRESSED
                      else file_blob(media[f], img, prints) for f, img in images]  # fmt: skip
            layers.append(file_blob(oci.IMAGE_MANIFEST, man, prints))
            for b in layers:
                p.blob(b)
            annotations = {"vnd.vulcan.runtime": runtime, "vnd.vulcan.arch": arch}
            body = oci.manifest(oci.RUNTIME_ARTIFACT, layers, annotations=annotations)
            desc = p.manifest(body, oci.MANIFEST)
            manifest_doc = json.loads(man.read_text())
            deps = _template_deps(manifest_doc["template"]) if isinstance(manifest_doc.get("template"), dict) else [
                _package(pkg) for pkg in manifest_doc.get("packages", [])]  # fmt: skip
            guest = manifest_doc.get("guest", {})
            if guest.get("sha256"):
                deps.append({"name": "vulcan-guest", "digest": {"sha256": guest["sha256"]}})
            sbom = paths.sbom(runtime, arch)
            data = sbom.read_bytes() if sbom.is_file() else None
            sbom_blob = oci.Blob(oci.SBOM, oci.digest_of(data), len(data), data, title=sbom.name) if data else None
            # the SBOM is named in the signed statement: a host places it only with that digest
            signed_files = _files(layers + ([sbom_blob] if sbom_blob else []))
            p.sign(desc, attest.provenance(where, desc["digest"], {**external, "runtime": runtime, "arch": arch}, deps,
                                           signed_files))  # fmt: skip
            if sbom_blob is not None:
                p.attach(desc, oci.SBOM, sbom_blob)
            platforms.append({**desc, "platform": oci.PLATFORM[arch]})
        if platforms:
            p.index(runtime, f"{runtime}-{ident}", oci.RUNTIME_ARTIFACT, platforms, where, external)
    host = []
    for arch in arches:
        files = [paths.bin_dir(arch) / n for n in oci.HOST_LAYER]
        if not all(f.is_file() for f in files):
            continue
        p.blob(config)
        layers = [file_blob(oci.HOST_LAYER[f.name], f, prints) for f in files]
        for b in layers:
            p.blob(b)
        body = oci.manifest(oci.HOST_ARTIFACT, layers, annotations={"vnd.vulcan.arch": arch})
        desc = p.manifest(body, oci.MANIFEST)
        fc, kernel = pins.firecracker, pins.kernel
        deps = [{"name": a.name, "uri": a.url_for(arch), "digest": {"sha256": a.sha256_for(arch)},
                 "annotations": {"version": a.version}} for a in (fc, kernel)]  # fmt: skip
        p.sign(desc, attest.provenance(where, desc["digest"], {**external, "arch": arch}, deps, _files(layers)))
        host.append({**desc, "platform": oci.PLATFORM[arch]})
    if host:
        p.index("host", f"host-{ident}", oci.HOST_ARTIFACT, host, where, external)
    return p.result


def _package(pkg: dict[str, Any]) -> dict[str, Any]:
    """A package as a resolved dependency: its download, its control checksum (Q1: sha1), and
    its repository (a local repository's package has no download: its path is annotated)."""
    annotations = {"version": pkg["version"], **({"repository": pkg["repository"]} if "repository" in pkg else {})}
    entry = {"name": pkg["name"], "digest": attest.q1_digest(pkg["checksum"]), "annotations": annotations}
    return {"uri": pkg["download"], **entry} if pkg.get("download") else entry


def _template_deps(template: dict[str, Any]) -> list[dict[str, Any]]:
    """A template's resolved dependencies: the image it was made from and each of its layers, by
    digest (its OS packages have none: they are in the SBOM, as the image's database lists them)."""
    image = {"name": template["reference"], "uri": f"oci://{template['reference'].split('@')[0]}",
             "digest": {"sha256": template["manifest"].removeprefix("sha256:")}}  # fmt: skip
    layers = [
        {"name": f"layer {i}", "digest": {"sha256": x["digest"].removeprefix("sha256:")},
         "annotations": {"mediaType": x["media_type"]}}
        for i, x in enumerate(template.get("layers", []))
    ]  # fmt: skip
    return [image, *layers]


def _files(layers: list[oci.Blob]) -> list[dict[str, Any]]:
    return [{"name": b.title, "digest": {"sha256": b.digest.removeprefix("sha256:")}} for b in layers]


def _members(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"name": arch_of(e), "digest": {"sha256": e["digest"].removeprefix("sha256:")}} for e in entries]


def arch_of(entry: dict[str, Any]) -> str:
    return next(a for a, plat in oci.PLATFORM.items() if plat == entry["platform"])


def main(argv: list[str]) -> int:
    pins = load_pins()
    ap = argparse.ArgumentParser(prog=prog("publish"), description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--to", required=True, metavar="REGISTRY/REPOSITORY", help="e.g. ghcr.io/acme/vulcan-images")
    ap.add_argument("--key", type=Path, help="the PEM private key to sign with (else VULCAN_SIGNING_KEY)")
    ap.add_argument("--no-sign", action="store_true", help="publish unsigned (hosts refuse it unless --no-verify)")
    ap.add_argument("--arch", action="append", choices=ARCHES, help="only this architecture (default: all built)")
    ap.add_argument("--ca", type=Path, help="a CA file for the registry's TLS certificate")
    ap.add_argument("--insecure", action="store_true", help="plain HTTP (a registry on a trusted network only)")
    ap.add_argument("--mount-from", metavar="REPOSITORY", help="a repository of the same registry to mount blobs from")
    ap.add_argument("--digests", type=Path, help="write the digests here (default images/published.json)")
    ap.add_argument("--frozen", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    target = Reference.parse(args.to, "--to")
    if target.tag or target.digest:
        raise RegistryError(f"--to {args.to}: a repository, without a tag or digest",
                            hint="tags are derived from the pins (see --help)")  # fmt: skip
    pem = args.key.read_bytes() if args.key else settings.signing_key()
    if pem is None and not args.no_sign:
        raise attest.SignatureError("no signing key: hosts accept only what a key they trust signed",
                                hint="pass --key FILE or set VULCAN_SIGNING_KEY (or --no-sign, for tests)")  # fmt: skip
    key = attest.load_private_key(pem, str(args.key or "VULCAN_SIGNING_KEY")) if pem is not None else None
    if key is None:
        log.warn("!!! publishing UNSIGNED: hosts will refuse it unless they pull with --no-verify !!!")
    reg = Registry(target.registry, credentials=auth.credentials_for(target.registry),
                   insecure=args.insecure, ca=args.ca, state_dir=paths.cache_dir() / "oci" / "uploads",
                   timeout=settings.registry_timeout(), deadline=settings.registry_deadline())  # fmt: skip
    arches = args.arch or [a for a in ARCHES if a == host_arch()] + [a for a in ARCHES if a != host_arch()]
    result = publish(pins, settings.pins_path(), target, reg, key, args.mount_from, arches)
    if not result.entries:
        raise RegistryError("nothing to publish: no images or host files are built",
                            hint="run 'nox -s download rootfs_all' first")  # fmt: skip
    doc = {"repository": result.repository, "signed_by": attest.keyid(key.public_key()) if key else None,
           "published": result.entries, "uploaded_bytes": result.uploaded, "payload_bytes": result.payload,
           "requests": reg.requests}  # fmt: skip
    out = args.digests or paths.images_dir(host_arch()) / "published.json"
    atomic.write_text(out, json.dumps(doc, indent=1) + "\n")
    for name, e in result.entries.items():
        print(f"{name}\t{e['reference']}\t(tag {e['tag']})")
    log.info(f"publish: uploaded {log.human(result.uploaded)} of {log.human(result.payload)} "
             f"({reg.requests} requests); digests in {out}")  # fmt: skip
    return 0
