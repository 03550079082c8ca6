"""APK I/O: trusted keys, signed indexes and package files, through the shared download()
and cache; and the lock file that pins each runtime's exact closure.

Repository layout (Alpine mirrors, e.g. https://dl-cdn.alpinelinux.org/alpine/):
``{mirror}/{branch}/{repo}/{arch}/APKINDEX.tar.gz`` and packages next to it as
``{name}-{version}.apk``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import log
from ..errors import DownloadError, PinError, VulcanError
from ..fetch import download, file_lock
from ..paths import cache_dir
from ..pins import Alpine, Pins
from .index import Package, parse_index

# The solver, the trust chain and the thread pool are imported where they are used: a no-op
# build only reads the lock, and every process start counts (see bench: no-op).
if TYPE_CHECKING:
    from .package import Verified
    from .trust import Keyring

LOCK_VERSION = 1


def fetch_workers() -> int:
    """Parallel package downloads (``VULCAN_FETCH_WORKERS``, default 4)."""
    env = os.environ.get("VULCAN_FETCH_WORKERS", "4")
    return max(1, int(env)) if env.isdigit() else 4


class LockError(VulcanError):
    """The lock is missing, stale, or names packages the mirror no longer has."""


# -- keys and indexes -------------------------------------------------------------------------


def keyring(alpine: Alpine) -> Keyring:
    from .trust import Keyring

    return Keyring.from_pems(key_pems(alpine))


def key_pems(alpine: Alpine) -> dict[str, bytes]:
    """The pinned keys, each fetched once and accepted only if its fingerprint matches."""
    from .trust import TrustError

    pems: dict[str, bytes] = {}
    for key in alpine.keys:
        path = cache_dir() / "keys" / key.sha256 / key.name
        with file_lock(path):
            if not path.exists() or _fp(path) != key.sha256:

                def check(part: Path, key: Any = key) -> None:
                    actual = _fp(part)
                    if actual != key.sha256:
                        raise TrustError(
                            f"key {key.name} from {key.url} has fingerprint {actual}, pinned {key.sha256}",
                            hint="the key file is not the pinned key; check alpine.keys in pins.json",
                        )

                download(key.url, path, verify=check)
        pems[key.name] = path.read_bytes()
    return pems


def _fp(path: Path) -> str | None:
    from .trust import fingerprint

    try:
        return fingerprint(path.read_bytes())
    except (OSError, ValueError):
        return None


_index_memo: dict[tuple[str, str, str], list[Package]] = {}
_memo_lock = threading.Lock()


def load_index(alpine: Alpine, repo: str, arch: str, keys: Keyring) -> list[Package]:
    """Fetch and verify one repository's signed index (once per process)."""
    url = f"{alpine.repo_url(repo, arch)}/APKINDEX.tar.gz"
    memo = (url, repo, arch)
    with _memo_lock:
        if memo in _index_memo:
            return _index_memo[memo]
    import tempfile

    from .package import read_index

    what = f"{alpine.branch}/{repo}/{arch}/APKINDEX.tar.gz"
    with tempfile.TemporaryDirectory(prefix="vulcan-index-") as tmp:
        dest = Path(tmp) / "APKINDEX.tar.gz"
        texts: list[str] = []

        def verify(part: Path) -> None:
            texts.append(read_index(part.read_bytes(), keys, what)[0])

        download(url, dest, verify=verify)
    parsed = parse_index(texts[0], repo=repo, repo_index=alpine.repositories.index(repo))
    for problem in parsed.unusable:
        log.warn(f"{what}: ignoring unusable package {problem}")
    packages = [p for p in parsed.packages if p.arch in ("", "noarch", arch)]
    with _memo_lock:
        _index_memo[memo] = packages
    return packages


def resolve(pins: Pins, runtime: str, arch: str) -> list[Package]:
    from .solver import Solver

    alpine = pins.alpine
    keys = keyring(alpine)
    packages: list[Package] = []
    for repo in alpine.repositories:
        packages += load_index(alpine, repo, arch, keys)
    world = [*alpine.base, *alpine.runtimes[runtime].world]
    return Solver(packages, arch, list(alpine.repositories)).solve(world)


# -- the lock ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Locked:
    name: str
    version: str
    arch: str
    repo: str
    checksum: str
    size: int
    installed_size: int
    build_time: int
    license: str
    origin: str
    url: str  # project URL (for the SBOM)

    @classmethod
    def of(cls, p: Package) -> Locked:
        return cls(
            p.name, p.version, p.arch, p.repo, p.checksum, p.size, p.installed_size, p.build_time, p.license,
            p.origin, p.url,
        )  # fmt: skip

    def as_package(self, repo_index: int) -> Package:
        return Package(
            name=self.name, version=self.version, arch=self.arch, checksum=self.checksum, size=self.size,
            installed_size=self.installed_size, build_time=self.build_time, license=self.license,
            origin=self.origin, url=self.url, repo=self.repo, repo_index=repo_index,
        )  # fmt: skip

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}.apk"


def lock_path(pins: Pins) -> Path:
    """``alpine.lock.json`` next to the pins file."""
    return pins.path.with_name("alpine.lock.json")


def request_digest(pins: Pins, runtime: str, arch: str) -> str:
    """What a lock entry answers: branch, repositories, world and keys for one runtime/arch."""
    a = pins.alpine
    request = {
        "branch": a.branch,
        "repositories": list(a.repositories),
        "world": [*a.base, *a.runtimes[runtime].world],
        "keys": sorted(k.sha256 for k in a.keys),
        "arch": arch,
    }
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def read_lock(pins: Pins) -> dict[str, Any]:
    path = lock_path(pins)
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return {"lock_version": LOCK_VERSION, "entries": {}}
    except ValueError as exc:
        raise LockError(f"{path}: not valid JSON ({exc})", hint="delete it and run 'nox -s lock'") from None
    if data.get("lock_version") != LOCK_VERSION:
        raise LockError(f"{path}: unsupported lock_version {data.get('lock_version')!r}", hint="run 'nox -s lock'")
    return data


def write_lock(pins: Pins, data: dict[str, Any]) -> None:
    path = lock_path(pins)
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    try:
        if path.read_text() == text:
            return
    except FileNotFoundError:
        pass
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def locked_entry(pins: Pins, runtime: str, arch: str) -> list[Locked] | None:
    """The locked closure, or None if missing or stale."""
    entry = read_lock(pins).get("entries", {}).get(f"{runtime}/{arch}")
    if not entry or entry.get("request") != request_digest(pins, runtime, arch):
        return None
    return [Locked(**p) for p in entry["packages"]]


def lock_runtime(pins: Pins, runtime: str, arch: str) -> list[Locked]:
    """Resolve against the live indexes and record the closure in the lock."""
    closure = [Locked.of(p) for p in resolve(pins, runtime, arch)]
    data = read_lock(pins)
    data.setdefault("entries", {})[f"{runtime}/{arch}"] = {
        "request": request_digest(pins, runtime, arch),
        "world": [*pins.alpine.base, *pins.alpine.runtimes[runtime].world],
        "packages": [asdict(p) for p in closure],
    }
    write_lock(pins, data)
    return closure


def ensure_locked(pins: Pins, runtime: str, arch: str, frozen: bool) -> list[Locked]:
    closure = locked_entry(pins, runtime, arch)
    if closure is not None:
        return closure
    path = lock_path(pins)
    exists = f"{runtime}/{arch}" in read_lock(pins).get("entries", {})
    state = "stale (pins changed since it was written)" if exists else "missing"
    if frozen:
        raise LockError(
            f"{path.name}: the lock for {runtime}/{arch} is {state}, and --frozen forbids re-resolving",
            hint="run 'nox -s lock' and commit alpine.lock.json",
        )
    log.warn(f"{path.name}: lock for {runtime}/{arch} is {state}: resolving now and updating the lock")
    return lock_runtime(pins, runtime, arch)


# -- package files ----------------------------------------------------------------------------


def package_cache_path(p: Locked) -> Path:
    digest = base64.b64decode(p.checksum[2:]).hex() if p.checksum.startswith("Q1") else p.checksum
    return cache_dir() / "apk" / digest[:2] / f"{digest}-{p.filename}"


def fetch_one(pins: Pins, p: Locked, arch: str) -> Verified:
    from .package import verify_package
    from .trust import TrustError

    alpine = pins.alpine
    path = package_cache_path(p)
    record = p.as_package(alpine.repositories.index(p.repo) if p.repo in alpine.repositories else 0)
    what = f"{p.filename} ({alpine.branch}/{p.repo}/{arch})"
    with file_lock(path):
        if path.exists():
            try:
                return verify_package(path, record, None, what)
            except TrustError as exc:
                log.warn(f"cached {what} fails verification ({exc.message}); fetching it again")
                path.unlink()
        url = f"{alpine.repo_url(p.repo, arch)}/{p.filename}"
        verified: list[Verified] = []
        download(url, path, verify=lambda part: verified.append(verify_package(part, record, None, what)))
        return replace(verified[0], path=path)  # it was checked as <name>.part, then renamed


class PackageGone(LockError):
    """A locked package is no longer on the mirror (HTTP 404)."""


def fetch_all(pins: Pins, closure: Sequence[Locked], arch: str) -> list[Verified]:
    """Fetch (or take from the cache) and verify every package, in parallel (bounded)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=fetch_workers()) as pool:
        futures = [pool.submit(fetch_one, pins, p, arch) for p in closure]
        results: list[Verified] = []
        errors: list[BaseException] = []
        for p, fut in zip(closure, futures, strict=True):
            try:
                results.append(fut.result())
            except DownloadError as exc:
                if "HTTP 404" in exc.message:
                    errors.append(PackageGone(f"{p.filename} is gone from the mirror ({p.repo}/{arch})"))
                else:
                    errors.append(exc)
            except BaseException as exc:
                errors.append(exc)
    if errors:
        raise errors[0]
    return results


def packages_for(pins: Pins, runtime: str, arch: str, frozen: bool) -> tuple[list[Locked], list[Verified]]:
    """The locked closure and its verified files; re-locks once if a locked build is gone."""
    closure = ensure_locked(pins, runtime, arch, frozen)
    try:
        return closure, fetch_all(pins, closure, arch)
    except PackageGone as exc:
        if frozen:
            raise LockError(
                f"{exc.message}; the lock is out of date and --frozen forbids re-resolving",
                hint="run 'nox -s lock' (Alpine keeps only the newest build of each package) and commit the lock",
            ) from None
        log.warn(f"!!! {exc.message}: Alpine replaced it; re-resolving {runtime}/{arch} and updating the lock !!!")
        closure = lock_runtime(pins, runtime, arch)
        return closure, fetch_all(pins, closure, arch)


def lock_all(pins: Pins, runtimes: Iterable[str], arches: Iterable[str]) -> dict[str, int]:
    sizes = {}
    for arch in arches:
        for rt in runtimes:
            if rt not in pins.alpine.runtimes:
                raise PinError(f"unknown runtime {rt!r}", hint=f"known: {', '.join(pins.alpine.runtimes)}")
            closure = lock_runtime(pins, rt, arch)
            sizes[f"{rt}/{arch}"] = len(closure)
            log.info(f"lock {rt}/{arch}: {len(closure)} packages")
    return sizes
