"""`nox -s pull -- REFERENCE`: what a Vulcan host runs to get images (or its host files) from a registry.

``REGISTRY/REPOSITORY@sha256:...`` (a tag works, with a warning: tags move). An index gives
the entry of this host's architecture (``--arch``); its manifest must carry a DSSE-signed
statement about its digest by a key in the host's trust file (``--trust FILE`` or
``VULCAN_TRUST``; none configured: refused, unless ``--no-verify``, said loudly). Every blob is
checked against its digest and size while it streams; an ext4 image is decompressed and written
back sparse. The files are staged next to their places and moved in only once all of them are
verified: ``images/`` and ``bin/`` of the output root (or ``--dest DIR``), where ``verify`` and
``boot`` find them. A pull records what it placed (``.stamps/pull.json``): a second pull of the
same digest asks the registry nothing and rewrites nothing; pulls at once on one host take turns
(an flock) and the second finds the first's files; an interrupted download resumes (Range).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .. import atomic, log, names, paths, settings, workspace
from ..pins import ARCHES, host_arch
from ..steps import prog
from . import attest, oci
from .client import Reference, Registry, RegistryError

STAMP = "pull.json"
ZERO = bytes(1 << 16)


class PullError(RegistryError):
    """What was asked for cannot be pulled as it is."""


def _stamp(directory: Path) -> Path:
    return paths.stamp_path(directory, "pull")


def _record(directory: Path) -> dict[str, Any]:
    try:
        doc = json.loads(_stamp(directory).read_text())
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def _fingerprint(f: Path) -> list[int]:
    st = os.stat(f)
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def up_to_date(directory: Path, record: dict[str, Any], digest: str) -> bool:
    """Every file a pull of ``digest`` placed (``record``: the directory's pull record) is still
    there, untouched since (its fingerprint)."""
    entry = record.get("pulls", {}).get(digest)
    if not entry:
        return False
    outputs = record.get("outputs", {})
    try:
        return all(
            outputs.get(name, {}).get("fingerprint") == _fingerprint(directory / name) for name in entry["files"]
        )
    except OSError:
        return False


class Puller:
    def __init__(self, reg: Registry, ref: Reference, keys: list[Any] | None, arch: str) -> None:
        self.reg, self.ref, self.keys, self.arch = reg, ref, keys, arch
        self.repo = ref.repository

    def resolve(self) -> tuple[str, dict[str, Any], str]:
        """(the manifest's digest, the manifest, the digest asked for) for this architecture."""
        body, media, digest = self.reg.manifest(self.repo, self.ref.ref)
        doc = json.loads(body)
        if media == oci.INDEX or doc.get("mediaType") == oci.INDEX:
            want = oci.PLATFORM[self.arch]
            entry = next((m for m in doc.get("manifests", []) if m.get("platform", {}).get("architecture")
                          == want["architecture"] and m.get("platform", {}).get("os") == want["os"]), None)  # fmt: skip
            if entry is None:
                have = sorted(f"{m.get('platform', {}).get('os')}/{m.get('platform', {}).get('architecture')}"
                              for m in doc.get("manifests", []))  # fmt: skip
                raise PullError(f"{self.ref} has no {want['os']}/{want['architecture']} entry "
                                f"(it has {', '.join(have)})",
                                hint=f"pull on a {self.arch} host for a published architecture, or --arch")  # fmt: skip
            mbody, _, mdigest = self.reg.manifest(self.repo, entry["digest"])
            return mdigest, json.loads(mbody), digest
        if doc.get("mediaType") != oci.MANIFEST:
            raise PullError(f"{self.ref} is a {doc.get('mediaType') or media!r}, not an OCI image manifest or index")
        return digest, doc, digest

    def referrers(self, digest: str) -> list[dict[str, Any]]:
        return self.reg.referrers_of(self.repo, digest)

    def verify(self, digest: str) -> str:
        """Who signed ``digest``: the key id of a trusted key; PullError when none did."""
        assert self.keys is not None
        why = []
        for r in self.referrers(digest):
            if r.get("artifactType") != oci.ATTESTATION:
                continue
            try:
                layers = json.loads(self.reg.manifest(self.repo, r["digest"])[0]).get("layers", [])
                envelope = self.small_blob(layers[0])
            except RegistryError as exc:
                why.append(exc.message)
                continue
            except (IndexError, KeyError, ValueError) as exc:
                why.append(f"a malformed signature artifact {r.get('digest')}: {exc}")
                continue
            for key in self.keys:
                try:
                    attest.verify(envelope, [key], digest)
                    return attest.keyid(key)
                except attest.TrustError as exc:
                    failed = exc.message
            why.append(failed)
        raise PullError(f"{self.ref}: {'no signature is attached' if not why else 'no valid signature'} "
                        f"for {digest} by a trusted key{': ' + '; '.join(dict.fromkeys(why)) if why else ''}",
                        hint="pull what the publisher you trust signed, or fix the trust file (--trust); "
                        "--no-verify skips the check")  # fmt: skip

    def small_blob(self, desc: dict[str, Any]) -> bytes:
        if int(desc.get("size", 0)) > 16 << 20:
            raise PullError(f"blob {desc.get('digest')} is {desc.get('size')} bytes: too big for a signature or SBOM")
        with self.reg.blob(self.repo, desc["digest"]) as resp:
            data = resp.content
        self.reg.received += len(data)
        if oci.digest_of(data) != desc["digest"] or len(data) != int(desc["size"]):
            raise PullError(f"blob {desc['digest']} served with another digest or size: refused")
        return data

    def download(self, desc: dict[str, Any], part: Path) -> None:
        """A blob into ``part``, resumed from what ``part`` holds, checked against digest and size."""
        digest, size = desc["digest"], int(desc["size"])
        h = hashlib.sha256()
        have = part.stat().st_size if part.is_file() else 0
        if have > size:
            part.unlink()
            have = 0
        if have:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            log.info(f"{desc.get('annotations', {}).get(oci.TITLE, digest)}: resuming at {have:,} of {size:,} bytes")
        if have < size:
            with self.reg.blob(self.repo, digest, offset=have) as resp, open(part, "ab") as out:
                if have and resp.status_code != 206:  # the registry ignored Range: start over
                    out.truncate(0)
                    h = hashlib.sha256()
                for chunk in resp.iter_content(1 << 20):
                    h.update(chunk)
                    out.write(chunk)
                    self.reg.received += len(chunk)
                    if out.tell() > size:
                        break
        got = part.stat().st_size
        if got != size or "sha256:" + h.hexdigest() != digest:
            part.unlink(missing_ok=True)
            what = f"size {got}" if got != size else "another sha256"
            raise PullError(f"blob {digest} ({desc.get('annotations', {}).get(oci.TITLE, '?')}) arrived with "
                            f"{what}: refused, nothing placed")  # fmt: skip


def write_sparse(src: Path, dest: Path, compressed: bool) -> str:
    """``src`` (zstd or plain) into ``dest``, every all-zero 4 KiB block left a hole (the block
    size of the ext4 images: as sparse as mke2fs wrote them); the sha256 of what was written,
    taken on a second thread (hashlib lets go of the GIL) while this one decompresses and writes."""
    import queue
    import threading

    import zstandard

    h = hashlib.sha256()
    pieces: queue.Queue[bytes | None] = queue.Queue(maxsize=64)

    def hash_pieces() -> None:
        while (piece := pieces.get()) is not None:
            h.update(piece)

    hasher = threading.Thread(target=hash_pieces, name="pull-sha256")
    hasher.start()
    try:
        with open(src, "rb") as raw, open(dest, "wb") as out:
            reader = zstandard.ZstdDecompressor().stream_reader(raw) if compressed else raw
            size = 0
            while piece := _read_full(reader, len(ZERO)):
                pieces.put(piece)
                if piece == ZERO[: len(piece)]:
                    out.seek(len(piece), os.SEEK_CUR)
                else:
                    _write_runs(out, memoryview(piece))
                size += len(piece)
            out.truncate(size)
    finally:
        pieces.put(None)
        hasher.join()
    return "sha256:" + h.hexdigest()


def _write_runs(out: Any, view: memoryview, block: int = 4096) -> None:
    """Runs of data blocks written, runs of all-zero blocks skipped (left as holes)."""

    def is_zero(at: int) -> bool:
        return view[at : at + block] == ZERO[: min(block, len(view) - at)]

    start = 0
    while start < len(view):
        zero = is_zero(start)
        end = start + block
        while end < len(view) and is_zero(end) == zero:
            end += block
        end = min(end, len(view))
        if zero:
            out.seek(end - start, os.SEEK_CUR)
        else:
            out.write(view[start:end])
        start = end


def _read_full(reader: Any, n: int) -> bytes:
    """``n`` bytes (fewer only at the end): a decompressor may return short reads."""
    parts, got = [], 0
    while got < n:
        chunk = reader.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def expected_files(kind: str, manifest: dict[str, Any]) -> dict[str, str]:
    """Which layer titles may be placed, and their media types."""
    if kind == oci.HOST_ARTIFACT:
        return dict(oci.HOST_LAYER)
    runtime = manifest.get("annotations", {}).get("vnd.vulcan.runtime", "")
    bad = names.problem(runtime)
    if bad:
        raise PullError(f"the manifest's runtime annotation {runtime!r}: {bad}")
    return {**{f"{runtime}.{fmt}": media for fmt, media in oci.FORMAT_LAYER.items()},
            f"{runtime}.manifest.json": oci.IMAGE_MANIFEST}  # fmt: skip


def pull(puller: Puller, out_root: Path, verify: bool) -> tuple[Path, list[str], str]:
    """Pull into ``out_root``; (the directory, the files placed or kept, who signed)."""
    mdigest, manifest, asked = puller.resolve()
    # artifactType, or for a manifest without one (older clients) its config's media type (image-spec)
    kind = manifest.get("artifactType") or manifest.get("config", {}).get("mediaType")
    if kind not in (oci.RUNTIME_ARTIFACT, oci.HOST_ARTIFACT):
        raise PullError(f"{puller.ref} is an artifact of type {kind!r}, not Vulcan images or host files")
    signer = puller.verify(mdigest) if verify else "not verified (--no-verify)"
    top = "bin" if kind == oci.HOST_ARTIFACT else "images"
    directory = paths.per_arch(out_root / top, puller.arch)
    allowed = expected_files(kind, manifest)
    layers = manifest.get("layers", [])
    for layer in layers:
        title = layer.get("annotations", {}).get(oci.TITLE)
        if title not in allowed or layer.get("mediaType") != allowed[title]:
            raise PullError(f"{puller.ref}: a layer {title!r} of type {layer.get('mediaType')!r} is not one this tool "
                            "places", hint="pull what 'publish' pushed")  # fmt: skip
    sbom = None
    if kind == oci.RUNTIME_ARTIFACT:
        sbom = next((r for r in puller.referrers(mdigest) if r.get("artifactType") == oci.SBOM), None)
    directory.mkdir(parents=True, exist_ok=True)
    paths.claim(directory)
    record = _record(directory)
    placed: list[str] = []
    with workspace.scratch(directory, "pull") as stage:
        ready: list[tuple[Path, str, int, str]] = []
        for layer in layers:
            title = layer["annotations"][oci.TITLE]
            old = record.get("outputs", {}).get(title, {})
            if old.get("layer") == layer["digest"] and (directory / title).is_file() and \
                    old.get("fingerprint") == _fingerprint(directory / title):  # fmt: skip
                placed.append(title)
                continue
            part = directory / f".{title}.{layer['digest'][7:19]}.part"  # kept across an interrupted pull
            puller.download(layer, part)
            dest = stage / title
            written = write_sparse(part, dest, layer["mediaType"] in oci.COMPRESSED)
            mode = 0o755 if kind == oci.HOST_ARTIFACT and title != "vmlinux" else 0o644
            ready.append((dest, title, mode, written))
            part.unlink()
        if sbom is not None:
            sbom_manifest = json.loads(puller.reg.manifest(puller.repo, sbom["digest"])[0])
            data = puller.small_blob(sbom_manifest["layers"][0])
            runtime = manifest["annotations"]["vnd.vulcan.runtime"]
            (stage / f"{runtime}.spdx.json").write_bytes(data)
            ready.append((stage / f"{runtime}.spdx.json", f"{runtime}.spdx.json", 0o644, oci.digest_of(data)))
        outputs = dict(record.get("outputs", {}))
        for dest, title, mode, written in ready:  # everything verified: now into place, one rename each
            atomic.publish(dest, directory / title, mode)
            layer_digest = next((x["digest"] for x in layers if x["annotations"][oci.TITLE] == title), written)
            outputs[title] = {"sha256": written.removeprefix("sha256:"), "layer": layer_digest,
                              "fingerprint": _fingerprint(directory / title)}  # fmt: skip
            placed.append(title)
    pulls = dict(record.get("pulls", {}))
    pulls[asked] = pulls[mdigest] = {"reference": str(puller.ref), "manifest": mdigest, "files": sorted(placed),
                                     "signed_by": signer}  # fmt: skip
    atomic.write_text(_stamp(directory), json.dumps({"outputs": outputs, "pulls": pulls}, indent=1) + "\n")
    return directory, sorted(placed), signer


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog=prog("pull"), description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("reference", help="REGISTRY/REPOSITORY@sha256:DIGEST (or :TAG)")
    ap.add_argument("--trust", type=Path, help="PEM public keys to trust (else VULCAN_TRUST)")
    ap.add_argument("--no-verify", action="store_true", help="do not check the signature (said loudly)")
    ap.add_argument("--arch", default=host_arch(), choices=ARCHES, help="which entry of an index (default: this host)")
    ap.add_argument("--dest", type=Path, help="the output root holding bin/ and images/ (default: VULCAN_OUT or here)")
    ap.add_argument("--ca", type=Path, help="a CA file for the registry's TLS certificate")
    ap.add_argument("--insecure", action="store_true", help="plain HTTP (a registry on a trusted network only)")
    ap.add_argument("--frozen", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    ref = Reference.parse(args.reference)
    if ref.digest is None:
        log.warn(f"{ref}: a tag moves; a host should pull a digest (REGISTRY/REPOSITORY@sha256:...)")
    keys = None
    if not args.no_verify:
        trust = args.trust or settings.trust_file()
        if trust is None:
            raise attest.TrustError("no trusted keys: a host uses only what a key it trusts signed",
                                    hint="pass --trust FILE or set VULCAN_TRUST (the publisher's public key); "
                                    "--no-verify skips the check")  # fmt: skip
        keys = attest.load_public_keys(trust)
    else:
        log.warn("!!! --no-verify: using what the registry serves WITHOUT checking who signed it !!!")
    out_root = args.dest or paths.out_root()
    out_root.mkdir(parents=True, exist_ok=True)
    with workspace.directory_lock(out_root):  # two pulls at once: the second waits, then finds the files
        for top in ("images", "bin"):
            directory = paths.per_arch(out_root / top, args.arch)
            record = _record(directory)
            entry = record.get("pulls", {}).get(ref.digest or "", {})
            # what an earlier pull placed counts only if a key trusted now signed it (or nothing is checked now)
            trusted = args.no_verify or entry.get("signed_by") in {attest.keyid(k) for k in keys or []}
            if ref.digest and trusted and up_to_date(directory, record, ref.digest):
                log.info(f"pull {ref}: up to date in {directory} ({', '.join(entry['files'])}; signed by "
                         f"{entry['signed_by']})")  # fmt: skip
                return 0
        reg = Registry(ref.registry, credentials=settings.registry_credentials(ref.registry), insecure=args.insecure,
                       ca=args.ca)  # fmt: skip
        directory, placed, signer = pull(Puller(reg, ref, keys, args.arch), out_root, not args.no_verify)
    log.info(f"pull {ref}: {', '.join(placed)} in {directory}; signed by {signer}; "
             f"received {log.human(reg.received)} in {reg.requests} requests")  # fmt: skip
    return 0
