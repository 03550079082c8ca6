"""`nox -s mirror -- DIR`: everything a build needs from outside, in a directory VULCAN_MIRROR reads.

From pins.json and alpine.lock.json, for each architecture (``--arch``, default both): the
Firecracker release, the kernel, the Go toolchain, the Alpine keys and each extra repository's,
each repository's signed ``APKINDEX.tar.gz``, every locked package and each template's manifest,
config and layers (at ``https://HOST/v2/REPO/{manifests,blobs}/DIGEST``), written as
``DIR/HOST/PATH`` for ``https://HOST/PATH`` (the layout ``VULCAN_MIRROR`` maps to), so that
``VULCAN_MIRROR=DIR`` (a path or ``file://``) builds with no network at all. Every file is
verified as a build verifies it (pinned sha256, key fingerprint, the index's signature by the
repository's keys, each package against the lock and the index chain), in DIR itself: a
second run checks what is there, fetches only what is missing or wrong (nothing, when it is
complete: no network), and writes each file whole (atomic.py). ``DIR/vulcan-mirror.json``
lists what it holds. The wheels the sessions' virtualenvs install go to ``DIR/python/`` (pip
download, hash-locked; ``--dev``: the test tools' too, ``--no-wheels``: none), used with
``PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR/python``. Local repositories are not copied (they are
already local). docs/offline.md shows the round trip.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from . import atomic, log
from .apk import lockfile
from .apk.keys import key_pems
from .apk.packages import fetch_one, repository_of
from .arch import ARCHES
from .errors import ChecksumError, PinError, VulcanError
from .fetch import cached, fetch
from .hashing import sha256_file
from .pins import Pins, Repository
from .pins import load as load_pins
from .settings import REPO_ROOT
from .steps import prog

LISTING = "vulcan-mirror.json"


class MirrorError(VulcanError):
    """The mirror directory could not be made complete."""


def place(root: Path, url: str) -> Path:
    """Where ``url`` lives in a mirror directory: ``root/HOST/PATH``, as fetch.mirror_url maps it."""
    parts = urlsplit(url)
    rel = Path(parts.netloc) / parts.path.lstrip("/")
    if parts.scheme not in ("http", "https") or ".." in rel.parts or not parts.netloc:
        raise PinError(f"{url}: not a URL a mirror can hold", hint="pins and repositories use https:// URLs")
    return root / rel


class Mirror:
    """One run: each entry checked in the directory, copied in from the tool's verified cache
    (or fetched into place) when missing or wrong."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.entries: dict[str, dict[str, object]] = {}
        self.copied = 0

    def keep(self, url: str, good: Callable[[Path], bool], obtain: Callable[[Path], None], sha256: str = "") -> None:
        """``url``'s file in the directory: kept if ``good``, else ``obtain``-ed (whole or not at all).
        ``sha256``: the file's, when ``good`` has just established it (a pin): not hashed again."""
        dest = place(self.root, url)
        if not (dest.is_file() and good(dest)):
            obtain(dest)
            if not good(dest):  # what was placed is checked the same way, never trusted as written
                dest.unlink()
                raise ChecksumError(f"{dest}: failed its check right after it was placed", hint="run the mirror again")
            self.copied += 1
        self.entries[url] = {"path": str(dest.relative_to(self.root)), "sha256": sha256 or sha256_file(dest),
                             "size": dest.stat().st_size}  # fmt: skip

    def pinned(self, url: str, sha256: str) -> None:
        """A file pinned by its sha256 (Firecracker, kernel, Go): through the tool's cache."""
        self.keep(url, lambda p: sha256_file(p) == sha256, lambda dest: _copy(cached(url, sha256), dest), sha256)


def _copy(src: Path, dest: Path) -> None:
    with atomic.replacing(dest, 0o644) as part:
        shutil.copyfile(src, part)


def _keys(m: Mirror, repo_keys: list[tuple[str, str]]) -> None:
    """Each key file (URL, fingerprint), checked by the DER fingerprint the pins give it."""
    from .apk.keys import matches_pin

    def fetch_key(url: str, fingerprint: str, dest: Path) -> None:
        def check(part: Path) -> None:
            if not matches_pin(part, fingerprint):
                raise ChecksumError(f"the key at {url} is not the pinned one (fingerprint {fingerprint})",
                                  hint="check the key's pin, and what the network serves for it")  # fmt: skip

        dest.parent.mkdir(parents=True, exist_ok=True)
        fetch(url, dest, verify=check)

    for url, fingerprint in repo_keys:
        if url:
            m.keep(url, lambda p, f=fingerprint: matches_pin(p, f),  # type: ignore[misc]
                   lambda dest, u=url, f=fingerprint: fetch_key(u, f, dest))  # type: ignore[misc]  # fmt: skip


def _index(m: Mirror, repo: Repository, arch: str) -> None:
    """A repository's signed index, verified by the keys that alone may sign it."""
    from .apk.keys import repo_keyring
    from .apk.package import read_index
    from .apk.trust import TrustError

    url = f"{repo.arch_url(arch)}/APKINDEX.tar.gz"
    keys = repo_keyring(repo)
    what = f"{repo.name} ({repo.location})/{arch}/APKINDEX.tar.gz"

    def good(p: Path) -> bool:
        try:
            read_index(p.read_bytes(), keys, what)
            return True
        except TrustError:
            return False

    def obtain(dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fetch(url, dest, verify=lambda part: read_index(part.read_bytes(), keys, what) and None)

    m.keep(url, good, obtain)


def _packages(m: Mirror, pins: Pins, runtime: str, arch: str, frozen: bool) -> int:
    from .apk.package import verify_package
    from .apk.trust import TrustError

    closure = lockfile.ensure_locked(pins, runtime, arch, frozen)
    count = 0
    for p in closure:
        repo = repository_of(pins, p, runtime)
        if repo.local is not None:
            continue  # already local: nothing from outside
        url = f"{repo.arch_url(arch)}/{p.filename}"

        def good(path: Path, record: lockfile.Locked = p, what: str = p.filename) -> bool:
            try:
                verify_package(path, record, None, what)  # the lock's C: and size
                return True
            except (OSError, TrustError):
                return False

        m.keep(url, good, lambda dest, p=p: _copy(fetch_one(pins, p, arch, runtime).path, dest))  # type: ignore[misc]
        count += 1
    return count


def _template(m: Mirror, pins: Pins, runtime: str, arch: str, frozen: bool) -> None:
    """A template's manifest, config and layers, by digest, at the registry URLs that serve them
    (``HOST/v2/REPO/manifests/D``, ``.../blobs/D``): fetched into the cache through the registry
    (as a build fetches them) only when the directory lacks one."""
    from .template import lock as template_lock
    from .template.assemble import fetched
    from .template.source import NoPlatform, upstream_urls

    image = template_lock.locked(pins, runtime, arch)
    if image is None:
        if frozen:
            raise lockfile.LockError(
                f"no current lock entry for the template {runtime}/{arch}, and --frozen forbids resolving it",
                hint="run 'nox -s lock' and commit alpine.lock.json",
            )
        try:
            image = template_lock.lock(pins, runtime, arch)
        except NoPlatform as exc:
            log.warn(f"mirror {runtime}/{arch}: {exc.message}; not mirrored")
            return
    urls = upstream_urls(image)
    if any(not (place(m.root, u).is_file() and sha256_file(place(m.root, u)) == d[7:]) for d, u in urls.items()):
        fetched(image)
    for digest, url in urls.items():
        m.pinned(url, digest.removeprefix("sha256:"))


def _wheels(root: Path, dev: bool) -> list[str]:
    """pip download of the hash-locked requirements into root/python; the files it holds."""
    wheels = root / "python"
    wheels.mkdir(parents=True, exist_ok=True)
    files = ["requirements-nox.txt", "requirements.txt", *(["requirements-dev.txt"] if dev else [])]
    for req in files:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                               "--require-hashes", "--no-deps", "-d", str(wheels), "-r", str(REPO_ROOT / req)],
                              capture_output=True, text=True)  # fmt: skip
        if proc.returncode != 0:
            raise MirrorError(f"pip download -r {req} failed: {proc.stderr.strip()[-400:]}",
                              hint="pip needs its index (PyPI, or PIP_INDEX_URL) for this part; --no-wheels "
                              "skips it")  # fmt: skip
    return sorted(p.name for p in wheels.iterdir() if p.is_file())


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=prog("mirror"), description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("directory", type=Path, help="where the mirror is written (made if missing)")
    p.add_argument("--arch", action="append", choices=ARCHES, help="only this architecture (repeatable; default both)")
    p.add_argument("--frozen", action="store_true", help="the lock must be current (as CI builds); else it is made")
    p.add_argument("--dev", action="store_true", help="also the test tools' wheels (requirements-dev.txt)")
    p.add_argument("--no-wheels", action="store_true", help="no Python wheels (the build machine has its own)")
    args = p.parse_args(argv)
    pins = load_pins()
    root = args.directory.expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise MirrorError(f"{root} is not a directory", hint="name a directory (it is made if missing)")
    root.mkdir(parents=True, exist_ok=True)
    m = Mirror(root)
    arches = args.arch or list(ARCHES)
    alpine = pins.alpine
    key_pems(alpine)  # the pinned Alpine keys, fetched (or cached) and checked once
    keys = {(k.url, k.sha256) for k in alpine.keys}
    indexes: dict[str, tuple[Repository, str]] = {}  # each remote repository's index URL, once
    for runtime in alpine.runtimes:
        for repo in alpine.repositories_of(runtime):
            keys |= {(k.url, k.sha256) for k in repo.keys}
            for arch in arches:
                if repo.local is None:
                    indexes[f"{repo.arch_url(arch)}/APKINDEX.tar.gz"] = (repo, arch)
    _keys(m, sorted(keys))
    for arch in arches:
        for artifact in (pins.firecracker, pins.kernel, pins.go):
            if artifact is not None:
                m.pinned(artifact.url_for(arch), artifact.sha256_for(arch))
    for _, (repo, arch) in sorted(indexes.items()):
        _index(m, repo, arch)
    apk_runtimes = [rt for rt, r in alpine.runtimes.items() if r.image is None]
    packages = sum(_packages(m, pins, rt, arch, args.frozen) for arch in arches for rt in apk_runtimes)
    for arch in arches:
        for rt in (rt for rt, r in alpine.runtimes.items() if r.image is not None):
            _template(m, pins, rt, arch, args.frozen)
    wheels = [] if args.no_wheels else _wheels(root, args.dev)
    listing = {
        "pins": pins.path.name, "architectures": arches, "files": dict(sorted(m.entries.items())),
        "wheels": wheels,
        "use": {"build": f"VULCAN_MIRROR={root} nox", "pip": f"PIP_NO_INDEX=1 PIP_FIND_LINKS={root / 'python'}"},
    }  # fmt: skip
    text = json.dumps(listing, indent=1) + "\n"
    if not (root / LISTING).is_file() or (root / LISTING).read_text() != text:
        atomic.write_text(root / LISTING, text)
    size = sum(int(e["size"]) for e in m.entries.values())  # type: ignore[call-overload]
    log.info(f"mirror {root}: {len(m.entries)} files ({packages} packages), {log.human(size)}; "
             f"{m.copied} placed now, {len(m.entries) - m.copied} already there and checked"
             f"{f'; {len(wheels)} wheels in python/' if wheels else ''}")  # fmt: skip
    log.info(f"use it: VULCAN_MIRROR={root} nox   (pip: PIP_NO_INDEX=1 PIP_FIND_LINKS={root / 'python'})")
    return 0
