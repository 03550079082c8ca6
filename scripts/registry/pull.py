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
import contextlib
import json
import os
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import atomic, log, names, ownership, paths, settings, workspace
from ..arch import ARCHES, host_arch
from ..background import Task, quick_handoff
from ..hashing import sha256_file
from ..steps import prog
from . import attest, auth, blobs, oci
from .client import Auth, Reference, Refused, Registry, RegistryError, parse_json
from .transport import Transport

# Blobs (and references being resolved) at once: the three runtimes' images land together
PARALLEL = 4


class PullError(RegistryError):
    """What was asked for cannot be pulled as it is."""

    exit_code = 4


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
        self.listed: dict[str, Task[list[dict[str, Any]]]] = {}  # referrers by subject: asked once
        self.fetched: dict[str, Task[tuple[dict[str, Any], str, str]]] = {}  # their documents, asked at once

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
            self.list_referrers(entry["digest"])  # (while the manifest is read: one round trip for both)
            manifest, mmedia, mdigest = self.document(entry["digest"], "manifest")
            if mdigest == digest or mmedia == oci.INDEX or manifest.get("mediaType") == oci.INDEX:
                raise PullError(f"{self.ref}: its {want['architecture']} entry {entry['digest']} is an index, "
                                "not an image manifest: refused")  # fmt: skip
            return mdigest, manifest, digest
        if doc.get("mediaType") != oci.MANIFEST:
            raise PullError(f"{self.ref} is a {doc.get('mediaType') or media!r}, not an OCI image manifest or index")
        return digest, doc, digest

    def list_referrers(self, digest: str) -> None:
        """Ask for ``digest``'s referrers on another thread (once), and as soon as they are
        listed, for the documents of the first signatures and SBOMs among them, at once: the
        signature's and the SBOM's are then read in one round trip, not one after the other."""

        def listing() -> list[dict[str, Any]]:
            listed = self.reg.referrers_of(self.repo, digest)
            wanted = [r["digest"] for r in listed if r.get("artifactType") in (oci.ATTESTATION, oci.SBOM)]
            for rdigest in list(dict.fromkeys(wanted))[:PARALLEL]:  # (any further one: when it is needed)
                self.fetched[rdigest] = Task(self.document, rdigest, "referrer")
            return listed

        if digest not in self.listed:
            self.listed[digest] = Task(listing)

    def referrers(self, digest: str, artifact_type: str) -> list[tuple[str, dict[str, Any]]]:
        """(digest, manifest) of each referrer of ``digest`` of that type whose ``subject`` is
        ``digest``; one whose subject is another manifest is ignored, with a warning."""
        found = []
        self.list_referrers(digest)  # the signature's and the SBOM's: one listing
        for r in self.listed[digest].result():
            if r.get("artifactType") != artifact_type:
                continue
            try:
                asked = self.fetched.get(r["digest"])
                doc, _, rdigest = asked.result() if asked is not None else self.document(r["digest"], "referrer")
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
        raise attest.SignatureError(f"{self.ref}: {'no signature is attached' if not why else 'no valid signature'} "
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


def _platform(entry: dict[str, Any]) -> tuple[object, object]:
    plat = entry.get("platform")
    return (plat.get("os"), plat.get("architecture")) if isinstance(plat, dict) else (None, None)


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


@dataclass
class Planned:
    """One reference, resolved and its signature checked: what it places, where, signed by whom."""

    puller: Puller
    directory: Path
    kind: str
    blobs: list[dict[str, Any]]  # the layers, then the SBOM
    signer: str | None
    manifest: str  # the image manifest's digest
    asked: str  # the digest the reference named (an index's, or the manifest's)
    made: list[Path]  # directories this pull made (removed again if nothing is placed)


def plan(puller: Puller, out_root: Path, verify: bool) -> Planned:
    """Resolve the reference and check who signed it: nothing but small documents is read yet."""
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
    # marked as ours when made here (clean knows them)
    made = [d for d in (out_root / top, directory) if paths.claim(d)]
    return Planned(puller, directory, kind, [*layers, *([sbom] if sbom else [])], signer, mdigest, asked, made)


def _title(blob: dict[str, Any]) -> str:
    return str(blob["annotations"][oci.TITLE])


def _one_place_each(plans: list[Planned]) -> list[Planned]:
    """The plans without repeats (two references to one manifest: a tag and its digest); two
    manifests that would place the same file are refused before anything is downloaded."""
    seen: dict[Path, Planned] = {}
    kept: list[Planned] = []
    for p in plans:
        if any(k.manifest == p.manifest and k.directory == p.directory for k in kept):
            continue
        kept.append(p)
        for blob in p.blobs:
            where = p.directory / _title(blob)
            if where in seen:
                raise PullError(f"{seen[where].puller.ref} and {p.puller.ref} are different images that both "
                                f"place {where}: pull one of them", hint="a host holds one image per runtime "
                                "and architecture in an output directory (--dest for another)")  # fmt: skip
            seen[where] = p
    return kept


@dataclass
class Landed:
    planned: Planned
    blob: dict[str, Any]
    staged: Path
    sha256: str | None  # None: an image zstd checked as it decoded it (blobs.py); as_built sets it


def land(plans: list[Planned], stages: dict[Path, Path], connect: Callable[[Planned], Registry]) -> list[Landed]:
    """Every blob not in place yet, downloaded into its directory's stage, biggest first, several
    at once (each on a connection of its own): download, decompress, sparse write and hash are
    one pass per blob, and the blobs share the cores and the link."""
    todo: list[tuple[Planned, dict[str, Any]]] = []
    records = {d: _record(d) for d in dict.fromkeys(p.directory for p in plans)}
    for p in plans:
        outputs = records[p.directory].get("outputs", {})
        for blob in p.blobs:
            old = outputs.get(_title(blob)) if isinstance(outputs, dict) else None
            if not _in_place(p.directory, blob, old):
                todo.append((p, blob))
    todo.sort(key=lambda t: -int(t[1]["size"]))

    def one(item: tuple[Planned, dict[str, Any]]) -> Landed:
        p, blob = item
        title, digest = _title(blob), blob["digest"]
        part = p.directory / f".{title}.{digest[7:19]}.part"  # kept across an interrupted pull
        staged = stages[p.directory] / title
        named = p.kind == oci.RUNTIME_ARTIFACT and _content(blob) is not None  # as_built holds it to manifest.json
        got = blobs.fetch(connect(p), p.puller.repo, blob, part, staged, blob["mediaType"] in oci.COMPRESSED, named)
        return Landed(p, blob, staged, got)

    # the threads hand the GIL over within 20 us, not 5 ms: each returns from C code (zstd, a
    # write, a hash) to a few lines of Python, and would wait that long for the others (the
    # three bench runtimes, medians of 5 in turn: 0.99 and 1.01 s with it, 1.08 and 1.37 s without)
    with quick_handoff():
        if len(todo) <= 1:
            return [one(t) for t in todo]
        with ThreadPoolExecutor(max_workers=min(PARALLEL, len(todo)), thread_name_prefix="pull") as pool:
            futures = [pool.submit(one, t) for t in todo]
            wait(futures, return_when=FIRST_EXCEPTION)
            for f in futures:
                f.cancel()  # after a failure: what has not started does not start
            return [f.result() for f in futures]


def as_built(p: Planned, landed: list[Landed]) -> None:
    """Each image that landed is the one its runtime's manifest.json (a layer of the same, signed,
    manifest) names: sha256 and size. The sha256 is the one taken as it was written, or for an
    image zstd checked as it decoded it (blobs.py), the one its layer names (``oci.CONTENT``,
    which publish measured from the bytes it compressed). So the sha256 a host records (and
    ``verify`` holds the file to) is the build's, not the pull's."""
    if p.kind != oci.RUNTIME_ARTIFACT:
        return
    mine = [x for x in landed if x.planned is p]
    named = next((b for b in p.blobs if b["mediaType"] == oci.IMAGE_MANIFEST), None)
    images = [x for x in mine if x.blob["mediaType"] in oci.FORMAT_LAYER.values()]
    if named is None:  # (our publish always sends one) nothing names them: hashed here
        for x in images:
            x.sha256 = x.sha256 or sha256_file(x.staged)
    if named is None or not images:
        return
    staged = next((x.staged for x in mine if x.blob is named), p.directory / _title(named))
    try:
        doc = json.loads(staged.read_bytes())
        built = {e["image"]: (e["sha256"], e["size"]) for e in doc["images"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise Refused(f"{p.puller.ref}: {_title(named)} does not say which images it built ({exc}): refused, "
                      "nothing placed") from None  # fmt: skip
    for x in images:
        title = _title(x.blob)
        hashed = x.sha256 is not None
        x.sha256 = x.sha256 or _content(x.blob)
        got = (x.sha256, x.staged.stat().st_size)
        if built.get(title) != got:
            how = "arrived as" if hashed else "is published as"
            raise Refused(f"{p.puller.ref}: {title} {how} sha256 {got[0]}, {got[1]:,} bytes, but the "
                          f"{_title(named)} that came with it names {built.get(title, 'no such image')}: "
                          "refused, nothing placed",
                          hint="the publisher's image and manifest do not belong together: publish again")  # fmt: skip


def _content(blob: dict[str, Any]) -> str | None:
    """The hex sha256 a compressed layer says it decompresses to (``oci.CONTENT``), if it says one."""
    notes = blob.get("annotations")
    value = notes.get(oci.CONTENT) if isinstance(notes, dict) else None
    return value.removeprefix("sha256:") if isinstance(value, str) and oci.DIGEST.fullmatch(value) else None


def _in_place(directory: Path, blob: dict[str, Any], old: object) -> bool:
    """The very bytes this blob names, placed earlier and untouched since."""
    try:
        return isinstance(old, dict) and old.get("layer") == blob["digest"] and \
            old.get("fingerprint") == _fingerprint(directory / _title(blob))  # fmt: skip
    except OSError:
        return False


def place(plans: list[Planned], landed: list[Landed]) -> None:
    """Everything verified: into place, one rename each, and each directory's record rewritten once."""
    for directory in dict.fromkeys(p.directory for p in plans):
        record = _record(directory)
        outputs = dict(record.get("outputs", {})) if isinstance(record.get("outputs"), dict) else {}
        pulls = dict(record.get("pulls", {})) if isinstance(record.get("pulls"), dict) else {}
        for p in (p for p in plans if p.directory == directory):
            files = {_title(b): b["digest"] for b in p.blobs}
            for blob in p.blobs:  # kept as they were: now vouched for by this pull's signer too
                old = outputs.get(_title(blob), {})
                if _in_place(directory, blob, old):
                    outputs[_title(blob)] = {**old, "signed_by": p.signer or old.get("signed_by")}
            for got in (x for x in landed if x.planned is p):
                title = _title(got.blob)
                mode = 0o755 if p.kind == oci.HOST_ARTIFACT and title != "vmlinux" else 0o644
                atomic.publish(got.staged, directory / title, mode)
                outputs[title] = {"sha256": got.sha256, "layer": got.blob["digest"],
                                  "fingerprint": _fingerprint(directory / title), "signed_by": p.signer}  # fmt: skip
            pulls[p.asked] = pulls[p.manifest] = {"reference": str(p.puller.ref), "manifest": p.manifest,
                                                  "files": files, "signed_by": p.signer}  # fmt: skip
        atomic.write_text(_stamp(directory), json.dumps({"outputs": outputs, "pulls": pulls}, indent=1) + "\n")


def pull_all(
    pullers: list[Puller], out_root: Path, verify: bool, connect: Callable[[Planned], Registry]
) -> list[Planned]:
    """Pull every reference, or place nothing: all are resolved and their signatures checked first
    (small documents, one reference per thread), then every blob lands, then all are placed."""
    with ThreadPoolExecutor(max_workers=min(PARALLEL, len(pullers)), thread_name_prefix="resolve") as pool:
        futures = [pool.submit(plan, p, out_root, verify) for p in pullers]
    plans = [f.result() for f in futures if f.exception() is None]
    try:
        for f in futures:
            f.result()  # the first reference that cannot be pulled, said
        plans = _one_place_each(plans)
        with contextlib.ExitStack() as stack:
            directories = dict.fromkeys(p.directory for p in plans)
            stages = {d: stack.enter_context(workspace.scratch(d, "pull")) for d in directories}
            landed = land(plans, stages, connect)
            for p in plans:
                as_built(p, landed)
            place(plans, landed)
    except BaseException:
        for p in plans:
            paths.unclaim(p.made[::-1])
        raise
    return plans


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog=prog("pull"), description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("reference", nargs="+", help="REGISTRY/REPOSITORY@sha256:DIGEST (or :TAG); several are pulled "
                    "at once, and placed only if all of them are")  # fmt: skip
    ap.add_argument("--trust", type=Path, help="PEM public keys to trust (else VULCAN_TRUST)")
    ap.add_argument("--no-verify", action="store_true", help="do not check the signature (said loudly)")
    ap.add_argument("--arch", default=host_arch(), choices=ARCHES, help="which entry of an index (default: this host)")
    ap.add_argument("--dest", type=Path, help="the output root holding bin/ and images/ (default: VULCAN_OUT or here)")
    ap.add_argument("--ca", type=Path, help="a CA file for the registry's TLS certificate")
    ap.add_argument("--insecure", action="store_true", help="plain HTTP (a registry on a trusted network only)")
    ap.add_argument("--frozen", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    refs = list(dict.fromkeys(Reference.parse(r) for r in args.reference))
    for ref in refs:
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
    opened: list[Registry] = []
    asked: dict[str, Auth] = {}  # per registry: its tokens, shared by every connection to it
    pools: dict[str, Transport] = {}  # per registry: its connections, kept alive for the next request

    def connect(registry: str) -> Registry:
        reg = Registry(registry, credentials=auth.credentials_for(registry), insecure=args.insecure, ca=args.ca,
                       timeout=settings.registry_timeout(), deadline=settings.registry_deadline(),
                       auth=asked.setdefault(registry, Auth()),
                       transport=pools.setdefault(registry, Transport(args.ca)))  # fmt: skip
        opened.append(reg)
        return reg

    with workspace.directory_lock(out_root, "a pull"):  # two pulls at once: the second waits, then finds the files
        todo = [ref for ref in refs if not _said_up_to_date(ref, out_root, args.arch, trusted)]
        if not todo:
            return 0
        pullers = [Puller(connect(ref.registry), ref, keys, args.arch) for ref in todo]
        for first in {p.ref.registry: p for p in pullers}.values():  # (the documents' requests, then the blobs')
            first.reg.warm(PARALLEL)
        plans = pull_all(pullers, out_root, not args.no_verify, lambda p: connect(p.puller.ref.registry))
    for p in plans:
        log.info(f"pull {p.puller.ref}: {', '.join(sorted(_title(b) for b in p.blobs))} in {p.directory}; "
                 f"{_signed(p.signer)}")  # fmt: skip
    log.info(f"pull: received {log.human(sum(r.received for r in opened))} in "
             f"{sum(r.requests for r in opened)} requests")  # fmt: skip
    return 0


def _said_up_to_date(ref: Reference, out_root: Path, arch: str, trusted: set[str] | None) -> bool:
    """Whether an earlier pull placed what ``ref`` names, still in place (said when so)."""
    for top in ("images", "bin"):
        directory = paths.per_arch(out_root / top, arch)
        entry = up_to_date(directory, _record(directory), ref.digest, trusted) if ref.digest else None
        if entry is not None:
            log.info(f"pull {ref}: up to date in {directory} ({', '.join(sorted(entry['files']))}; "
                     f"{_signed(entry.get('signed_by'))})")  # fmt: skip
            return True
    return False


def _signed(signer: str | None) -> str:
    return f"signed by {signer}" if signer else "NOT verified (--no-verify)"
