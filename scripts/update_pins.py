"""`nox -s update_pins`: move the pins to the newest upstream versions within their lines.

Sources (each fetched through fetch(), so VULCAN_MIRROR, retries and timeouts apply):
- Firecracker: the GitHub releases API; each asset's checksum from the release's
  ``<asset>.sha256.txt`` (sha256sum format), and the asset itself must match it.
- Guest kernel: Firecracker's CI bucket, an S3 ListObjectsV2 XML listing of ``firecracker-ci/``;
  the newest ``vmlinux-<pinned major.minor>.*`` under a weekly dated prefix holding both
  architectures. No checksum is published, so the sha256 is computed from the download and,
  where the object's ETag is a plain MD5, checked against it.
- Go: ``https://go.dev/dl/?mode=json&include=all``, which publishes sha256.
- Alpine keys: the pinned branch's ``alpine-keys`` package, itself verified through the index
  signed by the currently trusted keys.
The new pins are validated before they replace the old file (os.replace); any error leaves
the old file as it was. ``--check`` changes nothing. Exit codes (``--check`` or not): 0 current
(or updated), 1 outdated (``--check``) or a pin refused, 3 upstream could not be asked (network,
HTTP errors): a scheduled check can tell "outdated" from "could not look".
"""

from __future__ import annotations

import argparse
import copy
import difflib
import hashlib
import io
import json
import re
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from . import atomic, log
from .apk import indexes, lockfile, packages
from .apk.keys import keyring
from .apk.trust import fingerprint
from .arch import ARCHES, GOARCH
from .errors import ChecksumError, DownloadError, PinError, VulcanError
from .fetch import cached, fetch
from .pins import REPO_ROOT, Pins
from .pins import load as load_pins
from .steps import prog

RELEASES_API = "https://api.github.com/repos/firecracker-microvm/firecracker/releases?per_page=100"
BUCKET = "https://s3.amazonaws.com/spec.ccfc.min"
GO_JSON = "https://go.dev/dl/?mode=json&include=all"
S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_KERNEL_KEY = re.compile(
    r"^firecracker-ci/(?P<prefix>\d{8}-[0-9a-f]+-\d+)/(?P<arch>x86_64|aarch64)/vmlinux-(?P<v>[\d.]+)$"
)


def _fetch_bytes(url: str) -> bytes:
    with tempfile.TemporaryDirectory(prefix="vulcan-pins-") as tmp:
        dest = Path(tmp) / "body"
        fetch(url, dest)
        return dest.read_bytes()


def _line(version: str, parts: int) -> tuple[int, ...]:
    return Version(version).release[:parts]


# -- Firecracker ------------------------------------------------------------------------------


def newest_firecracker(pins: Pins, wanted: str | None) -> dict[str, Any]:
    releases = json.loads(_fetch_bytes(RELEASES_API))
    line = _line(pins.firecracker.version, 1)
    best: tuple[Version, dict[str, Any]] | None = None
    for rel in releases:
        if rel.get("draft") or rel.get("prerelease"):
            continue
        try:
            v = Version(str(rel.get("tag_name", "")).lstrip("v"))
        except InvalidVersion:
            continue
        if wanted is not None and str(v) != wanted:
            continue
        if wanted is None and v.release[:1] != line:
            continue
        if best is None or v > best[0]:
            best = (v, rel)
    if best is None:
        raise PinError(f"no Firecracker release {wanted or f'in line {line[0]}.x'} in {RELEASES_API}")
    version = str(best[0])
    entry = dict(pins.raw["firecracker"], version=version, sha256={})
    assets = {a["name"]: a["browser_download_url"] for a in best[1].get("assets", [])}
    for arch in ARCHES:
        name = f"firecracker-v{version}-{arch}.tgz"
        url = pins.firecracker.url.format(version=version, arch=arch)
        if name not in assets:
            raise PinError(f"Firecracker v{version} has no asset {name}")
        sums = _fetch_bytes(f"{assets[name]}.sha256.txt").decode()
        m = re.match(r"^([0-9a-fA-F]{64})\s+\*?(\S+)\s*$", sums.strip())
        if not m or m.group(2) != name:
            raise ChecksumError(f"{name}.sha256.txt is not '<sha256>  {name}': {sums.strip()[:120]!r}")
        sha = m.group(1).lower()
        try:
            cached(url, sha)  # the asset must match its published checksum
        except ChecksumError as exc:
            raise ChecksumError(
                f"Firecracker v{version}: the asset disagrees with its .sha256.txt; refusing to pin it\n{exc.message}"
            ) from None
        entry["sha256"][arch] = sha
    return entry


# -- kernel -----------------------------------------------------------------------------------


def list_bucket(prefix: str) -> list[dict[str, str]]:
    objects: list[dict[str, str]] = []
    token = ""
    for _ in range(100):  # pages
        url = f"{BUCKET}/?list-type=2&prefix={prefix}" + (f"&continuation-token={token}" if token else "")
        try:
            root = ET.fromstring(_fetch_bytes(url))
        except ET.ParseError as exc:
            raise VulcanError(f"{url}: not an S3 ListObjectsV2 listing ({exc})") from None
        for c in root.iter(f"{S3_NS}Contents"):
            objects.append({k: (c.findtext(f"{S3_NS}{k}") or "") for k in ("Key", "ETag", "Size")})
        if root.findtext(f"{S3_NS}IsTruncated") != "true":
            return objects
        token = root.findtext(f"{S3_NS}NextContinuationToken") or ""
    raise VulcanError(f"{BUCKET}: listing did not end after 100 pages")


# Firecracker's guest kernel policy (docs/kernel-policy.md): each line, the first release that
# supports it, and its minimum end of support. update_pins follows the newest line the pinned
# Firecracker supports that the CI bucket holds; the pinned line otherwise (said when its
# support has ended). ``--kernel 6.1.N`` pins any version of a supported line.
KERNEL_POLICY: dict[tuple[int, ...], tuple[str, str]] = {
    (6, 1): ("1.0.0", "2026-09-02"),
    (6, 18): ("1.16.1", "2028-06-01"),
}


def kernel_lines(firecracker: str) -> list[tuple[int, ...]]:
    """The guest kernel lines Firecracker ``firecracker`` supports, newest first."""
    fc = Version(firecracker)
    lines = [line for line, (since, _) in KERNEL_POLICY.items() if fc >= Version(since)]
    return sorted(lines, reverse=True)


def newest_kernel(pins: Pins, wanted: str | None, firecracker: str | None = None) -> dict[str, Any]:
    supported = kernel_lines(firecracker or pins.firecracker.version)
    pinned = _line(pins.kernel.version, 2)
    found: dict[tuple[str, str], dict[str, dict[str, str]]] = {}
    for obj in list_bucket("firecracker-ci/"):
        m = _KERNEL_KEY.match(obj["Key"])
        if not m or (_line(m.group("v"), 2) not in supported and _line(m.group("v"), 2) != pinned):
            continue
        if wanted is not None and m.group("v") != wanted:
            continue
        found.setdefault((m.group("v"), m.group("prefix")), {})[m.group("arch")] = obj
    complete = [k for k, v in found.items() if set(v) == set(ARCHES)]
    lines_found = sorted({_line(k[0], 2) for k in complete}, reverse=True)
    line = next((x for x in lines_found if x in supported and x >= pinned), None) or (
        pinned if pinned in lines_found else None
    )
    if wanted is not None and complete:
        line = _line(wanted, 2)
    if line is None:
        which = wanted or ", ".join(".".join(map(str, x)) + ".*" for x in dict.fromkeys([*supported, pinned]))
        raise PinError(f"no vmlinux-{which} for both architectures in {BUCKET}")
    _, until = KERNEL_POLICY.get(line, ("", ""))
    if not until:
        log.warn(f"kernel {'.'.join(map(str, line))} is not a line Firecracker's kernel policy lists")
    elif time.strftime("%Y-%m-%d") > until:
        log.warn(f"kernel {'.'.join(map(str, line))}: Firecracker's minimum end of support ({until}) has passed; "
                 "the bucket has no newer supported line yet")  # fmt: skip
    version, prefix = max((k for k in complete if _line(k[0], 2) == line), key=lambda k: (Version(k[0]), k[1]))
    template = f"{BUCKET}/firecracker-ci/{prefix}/{{arch}}/vmlinux-{{version}}"
    entry = dict(pins.raw["kernel"], version=version, url=template, sha256={})
    for arch in ARCHES:
        obj = found[(version, prefix)][arch]
        url = template.format(arch=arch, version=version)
        with tempfile.TemporaryDirectory(prefix="vulcan-kernel-") as tmp:
            dest = Path(tmp) / "vmlinux"
            sha = fetch(url, dest)
            etag = obj["ETag"].strip('"')
            if re.fullmatch(r"[0-9a-f]{32}", etag):
                md5 = hashlib.md5(dest.read_bytes(), usedforsecurity=False).hexdigest()
                if md5 != etag:
                    raise ChecksumError(f"{url}: MD5 {md5} differs from the object's ETag {etag}; refusing to pin it")
        entry["sha256"][arch] = sha
    return entry


# -- Go ---------------------------------------------------------------------------------------


def newest_go(pins: Pins, wanted: str | None) -> dict[str, Any]:
    assert pins.go is not None
    line = _line(pins.go.version, 2)
    releases = json.loads(_fetch_bytes(GO_JSON))
    best: tuple[Version, dict[str, Any]] | None = None
    for rel in releases:
        name = str(rel.get("version", "")).removeprefix("go")
        try:
            v = Version(name)
        except InvalidVersion:
            continue
        if not rel.get("stable") or (wanted is None and v.release[:2] != line) or (wanted and name != wanted):
            continue
        if best is None or v > best[0]:
            best = (v, rel)
    if best is None:
        raise PinError(f"no stable Go {wanted or '.'.join(map(str, line)) + '.x'} in {GO_JSON}")
    version = best[1]["version"].removeprefix("go")
    entry = dict(pins.raw["go"], version=version, sha256={})
    for arch in ARCHES:
        fname = f"go{version}.linux-{GOARCH[arch]}.tar.gz"
        f = next((f for f in best[1].get("files", []) if f.get("filename") == fname), None)
        if f is None or not re.fullmatch(r"[0-9a-f]{64}", f.get("sha256", "")):
            raise PinError(f"go.dev lists no sha256 for {fname}")
        entry["sha256"][arch] = f["sha256"]
    return entry


# -- Alpine keys ------------------------------------------------------------------------------


def alpine_keys(pins: Pins) -> dict[str, Any]:
    """Keys from the branch's alpine-keys package (verified with the keys trusted now)."""
    alpine = pins.alpine
    keys: dict[str, Any] = {}
    ring = keyring(alpine)
    for arch in ARCHES:
        main = next((r for r in alpine.own_repositories() if r.name == "main"), alpine.own_repositories()[0])
        loaded = indexes.load_index(main, arch, ring, alpine.repositories.index(main.name))
        pkg = max((p for p in loaded.packages if p.name == "alpine-keys"), key=lambda p: p.build_time, default=None)
        if pkg is None:
            raise PinError(f"{alpine.branch}/{main.name}/{arch} has no alpine-keys package")
        locked = lockfile.Locked.of(indexes.Resolved(pkg, main, loaded.key, ""))
        verified = packages.fetch_one(pins, locked, arch)
        with open(verified.path, "rb") as f:
            f.seek(verified.data_offset)
            data = zlib.decompressobj(31).decompress(f.read())
        files: dict[str, bytes] = {}
        arch_names: set[str] = set()
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for m in tar:
                parts = m.name.split("/")
                if m.name.startswith("usr/share/apk/keys/") and m.name.endswith(".rsa.pub"):
                    if len(parts) == 5 and m.isfile():
                        member = tar.extractfile(m)
                        assert member is not None
                        files[parts[4]] = member.read()
                    elif len(parts) == 6 and parts[4] == arch:
                        arch_names.add(parts[5])
        for name in sorted(arch_names or files):
            if name in files:
                keys[name] = {"url": f"https://alpinelinux.org/keys/{name}", "sha256": fingerprint(files[name])}
    if not keys:
        raise PinError("the alpine-keys package holds no keys")
    return keys


# -- putting it together ----------------------------------------------------------------------


def proposed(pins: Pins, args: argparse.Namespace) -> dict[str, Any]:
    new = copy.deepcopy(dict(pins.raw))
    new["firecracker"] = newest_firecracker(pins, args.firecracker)
    new["kernel"] = newest_kernel(pins, args.kernel, new["firecracker"]["version"])
    if pins.go is not None:
        new["go"] = newest_go(pins, args.go)
    if pins.alpine_pins is not None:
        if args.alpine_branch:
            new["alpine"]["branch"] = args.alpine_branch
        new["alpine"]["keys"] = alpine_keys(pins)
    return new


def render(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2) + "\n"


def write_validated(path: Path, text: str) -> None:
    """Never write a pins file that fails validation: check a sibling copy, then replace."""
    with atomic.replacing(path) as tmp:
        tmp.write_text(text)
        load_pins(tmp)  # a PinError removes the copy and leaves pins.json as it was


# -- the workflow's actions -------------------------------------------------------------------

WORKFLOW = REPO_ROOT / ".github/workflows/images.yml"
_USES = re.compile(r"uses: (?P<repo>[\w.-]+/[\w.-]+)@(?P<sha>[0-9a-f]{40}) # (?P<tag>v[\d.]+)")


def action_updates(text: str) -> dict[str, tuple[str, str, str, str]]:
    """repo -> (old sha, old tag, new sha, new tag) for every pinned action with a newer release
    (GitHub API: releases/latest, then the tag's commit)."""
    out: dict[str, tuple[str, str, str, str]] = {}
    for m in _USES.finditer(text):
        repo, sha, tag = m["repo"], m["sha"], m["tag"]
        if repo in out:
            continue
        latest = json.loads(_fetch_bytes(f"https://api.github.com/repos/{repo}/releases/latest"))["tag_name"]
        if latest == tag:
            continue
        commit = json.loads(_fetch_bytes(f"https://api.github.com/repos/{repo}/commits/{latest}"))["sha"]
        if not re.fullmatch(r"[0-9a-f]{40}", commit):
            raise PinError(f"{repo} {latest}: GitHub answered {commit!r} for its commit")
        out[repo] = (sha, tag, commit, latest)
    return out


def update_actions(path: Path, check: bool) -> bool:
    """Report (and unless ``check``, rewrite) outdated action pins; True if any was outdated."""
    if not path.is_file():
        return False
    text = path.read_text()
    updates = action_updates(text)
    for repo, (sha, tag, new_sha, new_tag) in sorted(updates.items()):
        print(f"{path.name}: {repo} {tag} ({sha[:12]}) -> {new_tag} ({new_sha[:12]})")
        text = text.replace(f"{repo}@{sha} # {tag}", f"{repo}@{new_sha} # {new_tag}")
    if updates and not check:
        atomic.write_text(path, text)
    return bool(updates)


class Unreachable(VulcanError):
    """Upstream could not be asked: neither current nor outdated is known."""

    exit_code = 3


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=prog("update_pins"), description=__doc__.split("\n\n")[0] if __doc__ else "")
    p.add_argument(
        "--check",
        action="store_true",
        help="only report: exit 1 with the diff when pins are outdated (3: upstream could not be asked)",
    )
    p.add_argument("--firecracker", metavar="X.Y.Z", help="pin this Firecracker version instead of the newest")
    p.add_argument("--kernel", metavar="6.1.N", help="pin this kernel version instead of the newest")
    p.add_argument("--go", metavar="1.26.N", help="pin this Go version instead of the newest")
    p.add_argument("--alpine-branch", metavar="vX.Y", help="move to another Alpine branch")
    p.add_argument("--no-lock", action="store_true", help="do not re-lock after changing the pins")
    p.add_argument("--workflow", type=Path, default=WORKFLOW, help="the workflow whose action pins to check too")
    args = p.parse_args(argv)
    pins = load_pins()
    try:
        data = proposed(pins, args)
        actions_outdated = update_actions(args.workflow, args.check)
    except DownloadError as exc:
        raise Unreachable(f"could not tell whether the pins are current: {exc.message}",
                          hint="check the network (or VULCAN_MIRROR) and run it again; exit 3 means 'not asked', "
                          "exit 1 'outdated'") from None  # fmt: skip
    if data == pins.raw:  # compare content, not formatting
        log.info("pins are current" + ("; some action pins are not (above)" if actions_outdated else ""))
        return 1 if args.check and actions_outdated else 0
    old, new = render(dict(pins.raw)), render(data)
    diff = "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), "pins.json", "pins.json (new)"))
    print(diff, end="")
    if args.check:
        log.info("pins are outdated (--check: nothing changed)")
        return 1
    write_validated(pins.path, new)
    log.info(f"updated {pins.path}")
    if not args.no_lock and pins.alpine_pins is not None:
        fresh = load_pins(pins.path)
        lockfile.lock_all(fresh, list(fresh.alpine.runtimes), list(ARCHES))
    return 0
