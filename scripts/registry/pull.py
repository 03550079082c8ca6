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

from .. import atomic, log, names, ownership, paths, settings, workspace
from ..arch import ARCHES, host_arch
from ..steps import prog
from . import attest, auth, oci
from .client import Reference, Registry, RegistryError, parse_json

ZERO = bytes(1 << 16)


class PullError(RegistryError):
    """What was asked for cannot be pulled as it is."""


def _stamp(directory: Path) -> Path:
    return paths.stamp_path(directory, "pull")


def _record(directory: Path) -> dict[str, Any]:
    """The directory's pull record: ``outputs`` (per file: its sha256, the layer it came from, its
    fingerprint, and the key that vouched for that layer, or None) and ``pulls`` (per digest
    pulled: each file it places and the layer it names, and who signed it)."""
    try:
        doc = json.loads(_stamp(directory).read_text())
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}


def _fingerprint(f: Path) -> list[int]:
    st = os.stat(f)
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def up_to_date(directory: Path, record: dict[str, Any], digest: str, trusted: set[str] | None) -> dict[str, Any] | None:
    """The record of an earlier pull of ``digest`` if every file it places is still in place as
    that digest names it (the same layer, untouched since: its fingerprint), and that pull was
    verified by a key in ``trusted`` (None: nothing is checked now, --no-verify). A file another
    pull placed since, even a signed one, is another layer: not up to date."""
    entry = record.get("pulls", {}).get(digest)
    if not isinstance(entry, dict) or not isinstance(entry.get("files"), dict) or not entry["files"]:
        return None
    if trusted is not None and entry.get("signed_by") not in trusted:
        return None
    outputs = record.get("outputs", {})
    for name, layer in entry["files"].items():
        placed = outputs.get(name) if isinstance(outputs, dict) else None
        try:
            if not isinstance(placed, dict) or placed.get("layer") != layer or \
                    placed.get("fingerprint") != _fingerprint(directory / name):  # fmt: skip
                return None
        except OSError:
            return None
    return entry


class Puller:
    def __init__(self, reg: Registry, ref: Reference, keys: list[Any] | None, arch: str) -> None:
        self.reg, self.ref, self.keys, self.arch = reg, ref, keys, arch
        self.repo = ref.repository
        self.warned: set[str] = set()

    def warn(self, text: str) -> None:
        if text not in self.warned:
            self.warned.add(text)
            log.warn(text)

    def document(self, ref: str, what: str) -> tuple[dict[str, Any], str, str]:
        """(a manifest or index as a JSON object, its media type, its digest)."""
        body, media, digest = self.reg.manifest(self.repo, ref)
        return parse_json(body, f"{self.ref}: {what} {ref}"), media, digest

    def resolve(self) -> tuple[str, dict[str, Any], str]:
        """(the manifest's digest, the manifest, the digest asked for) for this architecture."""
        doc, media, digest = self.document(self.ref.ref, "manifest")
        if media == oci.INDEX or doc.get("mediaType") == oci.INDEX:
            want = oci.PLATFORM[self.arch]
            entries = [m for m in doc.get("manifests", []) if isinstance(m, dict)] \
                if isinstance(doc.get("manifests"), list) else []  # fmt: skip
            entry = next((m for m in entries if _platform(m) == (want["os"], want["architecture"])), None)
            if entry is None:
                have = sorted("/".join(map(str, _platform(m))) for m in entries)
                raise PullError(f"{self.ref} has no {want['os']}/{want['architecture']} entry "
                                f"(it has {', '.join(have) or 'none'})",
                                hint=f"pull on a {self.arch} host for a published architecture, or --arch")  # fmt: skip
            if not isinstance(entry.get("digest"), str) or not oci.DIGEST.fullmatch(entry["digest"]):
                raise PullError(f"{self.ref}: its {want['architecture']} entry has no sha256 digest")
            manifest, mmedia, mdigest = self.document(entry["digest"], "manifest")
            if mdigest == digest or mmedia == oci.INDEX or manifest.get("mediaType") == oci.INDEX:
                raise PullError(f"{self.ref}: its {want['architecture']} entry {entry['digest']} is an index, "
                                "not an image manifest: refused")  # fmt: skip
            return mdigest, manifest, digest
        if doc.get("mediaType") != oci.MANIFEST:
            raise PullError(f"{self.ref} is a {doc.get('mediaType') or media!r}, not an OCI image manifest or index")
        return digest, doc, digest

    def referrers(self, digest: str, artifact_type: str) -> list[tuple[str, dict[str, Any]]]:
        """(digest, manifest) of each referrer of ``digest`` of that type whose ``subject`` is
        ``digest``; one whose subject is another manifest is ignored, with a warning."""
        found = []
        for r in self.reg.referrers_of(self.repo, digest):
            if r.get("artifactType") != artifact_type:
                continue
            try:
                doc, _, rdigest = self.document(r["digest"], "referrer")
            except RegistryError as exc:
                self.warn(f"a referrer of {digest} cannot be read, ignored: {exc.message}")
                continue
            subject = doc.get("subject")
            if not isinstance(subject, dict) or subject.get("digest") != digest:
                said = subject.get("digest") if isinstance(subject, dict) else None
                self.warn(f"referrer {rdigest} is listed for {digest} but its subject is {said}: ignored")
                continue
            found.append((rdigest, doc))
        return found

    def verify(self, digest: str) -> tuple[str, dict[str, Any]]:
        """Who signed ``digest`` (the key id of a trusted key) and the statement they signed;
        PullError when no trusted key did."""
        assert self.keys is not None
        why = []
        for rdigest, doc in self.referrers(digest, oci.ATTESTATION):
            try:
                layers = doc.get("layers")
                if not isinstance(layers, list) or not layers or not isinstance(layers[0], dict):
                    raise PullError(f"a signature artifact {rdigest} without a layer")
                envelope = self.reg.small_blob(self.repo, layers[0], f"signature {rdigest}")
            except RegistryError as exc:
                why.append(exc.message)
                continue
            failed = ""
            for key in self.keys:
                try:
                    return attest.keyid(key), attest.verify(envelope, [key], digest)
                except attest.SignatureError as exc:
                    failed = exc.message
            why.append(failed)
        raise PullError(f"{self.ref}: {'no signature is attached' if not why else 'no valid signature'} "
                        f"for {digest} by a trusted key{': ' + '; '.join(dict.fromkeys(why)) if why else ''}",
                        hint="pull what the publisher you trust signed, or fix the trust file (--trust); "
                        "--no-verify skips the check")  # fmt: skip

    def sbom(self, digest: str, name: str, signed: dict[str, str] | None) -> dict[str, Any] | None:
        """The descriptor of ``digest``'s SBOM blob: the one the signed statement names
        (``signed``: its files), or with --no-verify (None) the first SBOM referrer."""
        want = None if signed is None else signed.get(name)
        for rdigest, doc in self.referrers(digest, oci.SBOM):
            layers = doc.get("layers")
            layer = layers[0] if isinstance(layers, list) and layers and isinstance(layers[0], dict) else None
            if layer is None or not oci.sized(layer):
                self.warn(f"SBOM referrer {rdigest} has no layer with a sha256 digest and a size: ignored")
            elif signed is not None and layer.get("digest") != want:
                self.warn(f"SBOM referrer {rdigest} holds {layer.get('digest')}, which the signature does not name: "
                          "ignored")  # fmt: skip
            else:
                return layer
        if want is not None:
            self.warn(f"the signed statement names {name} ({want}), but no referrer of {digest} holds it: not placed")
        return None

    def download(self, desc: dict[str, Any], part: Path) -> None:
        """A blob into ``part``, resumed from what ``part`` holds, checked against digest and size."""
        digest, size = desc["digest"], int(desc["size"])
        title = desc.get("annotations", {}).get(oci.TITLE, digest)
        h = hashlib.sha256()
        have = part.stat().st_size if part.is_file() else 0
        if have > size:
            part.unlink()
            have = 0
        if have:
            with open(part, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            log.info(f"{title}: resuming at {have:,} of {size:,} bytes")
        if have < size:
            with self.reg.blob(self.repo, digest, offset=have) as resp, open(part, "ab") as out:
                if have and resp.status_code != 206:  # the registry ignored Range: start over
                    out.truncate(0)
                    h = hashlib.sha256()
                for chunk in self.reg.chunks(resp, size - out.tell(), f"blob {digest} ({title})"):
                    h.update(chunk)
                    out.write(chunk)
                    self.reg.received += len(chunk)
        got = part.stat().st_size
        if got != size or "sha256:" + h.hexdigest() != digest:
            part.unlink(missing_ok=True)
            what = f"size {got}" if got != size else "another sha256"
            raise PullError(f"blob {digest} ({title}) arrived with {what}: refused, nothing placed")


def _platform(entry: dict[str, Any]) -> tuple[object, object]:
    plat = entry.get("platform")
    return (plat.get("os"), plat.get("architecture")) if isinstance(plat, dict) else (None, None)


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
    runtime = _annotations(manifest).get("vnd.vulcan.runtime", "")
    bad = names.problem(runtime) if isinstance(runtime, str) else "not a string"
    if bad:
        raise PullError(f"the manifest's runtime annotation {runtime!r}: {bad}")
    return {**{f"{runtime}.{fmt}": media for fmt, media in oci.FORMAT_LAYER.items()},
            f"{runtime}.manifest.json": oci.IMAGE_MANIFEST}  # fmt: skip


def _annotations(doc: dict[str, Any]) -> dict[str, Any]:
    found = doc.get("annotations")
    return found if isinstance(found, dict) else {}


def checked_layers(ref: Reference, kind: str, manifest: dict[str, Any], arch: str) -> list[dict[str, Any]]:
    """The manifest's layers, each one this tool places, once, with a sha256 digest and a size;
    and the manifest is for ``arch`` where it says which architecture it is for."""
    said = _annotations(manifest).get("vnd.vulcan.arch")
    if said is not None and said != arch:
        raise PullError(f"{ref} is for {said}, not {arch}: refused", hint=f"pull it with --arch {said}, or pull the "
                        f"{arch} entry of its index")  # fmt: skip
    allowed = expected_files(kind, manifest)
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not layers:
        raise PullError(f"{ref}: a manifest without layers places nothing: refused")
    seen: set[str] = set()
    for layer in layers:
        title = _annotations(layer).get(oci.TITLE) if isinstance(layer, dict) else None
        if not isinstance(layer, dict) or title not in allowed or layer.get("mediaType") != allowed[title]:
            media = layer.get("mediaType") if isinstance(layer, dict) else None
            raise PullError(f"{ref}: a layer {title!r} of type {media!r} is not one this tool places",
                            hint="pull what 'publish' pushed")  # fmt: skip
        if title in seen:
            raise PullError(f"{ref}: two layers are titled {title!r}: refused")
        seen.add(title)
        if not oci.sized(layer):
            raise PullError(f"{ref}: layer {title!r} has no sha256 digest and size: refused")
    return layers


def pull(puller: Puller, out_root: Path, verify: bool) -> tuple[Path, list[str], str | None]:
    """Pull into ``out_root``; (the directory, the files placed or kept, who signed: None unverified)."""
    mdigest, manifest, asked = puller.resolve()
    # artifactType, or for a manifest without one (older clients) its config's media type (image-spec)
    config = manifest.get("config")
    kind = manifest.get("artifactType") or (config.get("mediaType") if isinstance(config, dict) else None)
    if kind not in (oci.RUNTIME_ARTIFACT, oci.HOST_ARTIFACT):
        raise PullError(f"{puller.ref} is an artifact of type {kind!r}, not Vulcan images or host files")
    layers = checked_layers(puller.ref, kind, manifest, puller.arch)
    signer, signed = puller.verify(mdigest) if verify else (None, None)
    signed_files = attest.byproducts(signed) if signed is not None else None
    top = "bin" if kind == oci.HOST_ARTIFACT else "images"
    directory = paths.per_arch(out_root / top, puller.arch)
    sbom = None
    if kind == oci.RUNTIME_ARTIFACT:
        runtime = manifest["annotations"]["vnd.vulcan.runtime"]
        sbom = puller.sbom(mdigest, f"{runtime}.spdx.json", signed_files)
        if sbom is not None:
            sbom = {**sbom, "mediaType": oci.SBOM, "annotations": {oci.TITLE: f"{runtime}.spdx.json"}}
    # marked as ours when made here (clean knows them); removed again if nothing is placed
    made = [d for d in (out_root / top, directory) if paths.claim(d)]
    try:
        return _place(puller, directory, kind, layers, sbom, signer, mdigest, asked)
    except BaseException:
        paths.unclaim(made[::-1])
        raise


def _place(puller: Puller, directory: Path, kind: str, layers: list[dict[str, Any]], sbom: dict[str, Any] | None,
           signer: str | None, mdigest: str, asked: str) -> tuple[Path, list[str], str | None]:  # fmt: skip
    """Download what is not in place yet, stage it, and move it all in once every blob is checked."""
    record = _record(directory)
    outputs = dict(record.get("outputs", {})) if isinstance(record.get("outputs"), dict) else {}
    files: dict[str, str] = {}
    with workspace.scratch(directory, "pull") as stage:
        ready: list[tuple[Path, dict[str, Any], int, str]] = []
        for layer in [*layers, *([sbom] if sbom else [])]:
            title, digest = layer["annotations"][oci.TITLE], layer["digest"]
            files[title] = digest
            old = outputs.get(title, {})
            try:  # the very bytes this layer names, placed earlier and untouched since
                if isinstance(old, dict) and old.get("layer") == digest and \
                        old.get("fingerprint") == _fingerprint(directory / title):  # fmt: skip
                    outputs[title] = {**old, "signed_by": signer or old.get("signed_by")}
                    continue
            except OSError:
                pass
            part = directory / f".{title}.{digest[7:19]}.part"  # kept across an interrupted pull
            puller.download(layer, part)
            dest = stage / title
            written = write_sparse(part, dest, layer["mediaType"] in oci.COMPRESSED)
            mode = 0o755 if kind == oci.HOST_ARTIFACT and title != "vmlinux" else 0o644
            ready.append((dest, layer, mode, written))
            part.unlink()
        for dest, layer, mode, written in ready:  # everything verified: now into place, one rename each
            title = layer["annotations"][oci.TITLE]
            atomic.publish(dest, directory / title, mode)
            outputs[title] = {"sha256": written.removeprefix("sha256:"), "layer": layer["digest"],
                              "fingerprint": _fingerprint(directory / title), "signed_by": signer}  # fmt: skip
    pulls = dict(record.get("pulls", {})) if isinstance(record.get("pulls"), dict) else {}
    pulls[asked] = pulls[mdigest] = {"reference": str(puller.ref), "manifest": mdigest, "files": files,
                                     "signed_by": signer}  # fmt: skip
    atomic.write_text(_stamp(directory), json.dumps({"outputs": outputs, "pulls": pulls}, indent=1) + "\n")
    return directory, sorted(files), signer


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
            raise attest.SignatureError("no trusted keys: a host uses only what a key it trusts signed",
                                    hint="pass --trust FILE or set VULCAN_TRUST (the publisher's public key); "
                                    "--no-verify skips the check")  # fmt: skip
        keys = attest.load_public_keys(trust)
    else:
        log.warn("!!! --no-verify: using what the registry serves WITHOUT checking who signed it !!!")
    out_root = args.dest or paths.out_root()
    # what is placed here is what a host runs: nobody else may change it (or the pull record)
    ownership.require_safe(out_root, "the output directory", None if args.dest else "VULCAN_OUT")
    paths.claim(out_root, default=args.dest is None and out_root == settings.REPO_ROOT)
    # what an earlier pull placed counts only if a key trusted now signed it (or nothing is checked now)
    trusted = None if keys is None else {attest.keyid(k) for k in keys}
    with workspace.directory_lock(out_root, "a pull"):  # two pulls at once: the second waits, then finds the files
        for top in ("images", "bin"):
            directory = paths.per_arch(out_root / top, args.arch)
            entry = up_to_date(directory, _record(directory), ref.digest, trusted) if ref.digest else None
            if entry is not None:
                log.info(f"pull {ref}: up to date in {directory} ({', '.join(sorted(entry['files']))}; "
                         f"{_signed(entry.get('signed_by'))})")  # fmt: skip
                return 0
        reg = Registry(
            ref.registry,
            credentials=auth.credentials_for(ref.registry),
            insecure=args.insecure,
            ca=args.ca,
            timeout=settings.registry_timeout(),
            deadline=settings.registry_deadline(),
        )
        directory, placed, signer = pull(Puller(reg, ref, keys, args.arch), out_root, not args.no_verify)
    log.info(f"pull {ref}: {', '.join(placed)} in {directory}; {_signed(signer)}; "
             f"received {log.human(reg.received)} in {reg.requests} requests")  # fmt: skip
    return 0


def _signed(signer: str | None) -> str:
    return f"signed by {signer}" if signer else "NOT verified (--no-verify)"
