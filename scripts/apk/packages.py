"""Package files: fetched in parallel into the shared cache, each verified against the lock.

The chain (package.py): the signed index vouches for ``C:``, ``C:`` for the control member,
its ``datahash`` for the data member. A cached file is verified again on every use.
"""

from __future__ import annotations

import base64
import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .. import log, settings
from ..errors import DownloadError, VulcanError
from ..fetch import fetch, file_lock, read_only_cache, writable
from ..paths import cache_dir
from ..pins import Pins, Repository
from .keys import repo_keyring
from .lockfile import RELOCK_HINT, Locked, LockError, lock_runtime

if TYPE_CHECKING:
    from concurrent.futures import Future

    from .package import Verified
    from .trust import Keyring


def fetch_workers() -> int:
    """Parallel package downloads (``VULCAN_FETCH_WORKERS``, default 4)."""
    return settings.fetch_workers()


def package_cache_path(p: Locked) -> Path:
    digest = base64.b64decode(p.checksum[2:]).hex() if p.checksum.startswith("Q1") else p.checksum
    return cache_dir() / "apk" / digest[:2] / f"{digest}-{p.filename}"


def repository_of(pins: Pins, p: Locked, runtime: str | None) -> Repository:
    """The repository a locked package comes from (a runtime's; without one, Alpine's own)."""
    alpine = pins.alpine
    repos = alpine.repositories_of(runtime) if runtime else alpine.own_repositories()
    for repo in repos:
        if repo.name == p.repo:
            if p.repository and p.repository != repo.location:
                break
            return repo
    raise LockError(
        f"the lock says {p.filename} comes from repository {p.repo} ({p.repository or 'Alpine'}), which "
        f"{pins.path.name} does not have (for {runtime or 'Alpine'})",
        hint=RELOCK_HINT,
    )


_keyrings: dict[tuple[str, ...], Keyring] = {}
_keyrings_lock = threading.Lock()


def _keyring(repo: Repository) -> Keyring:
    memo = tuple(sorted(f"{k.name}={k.sha256}" for k in repo.keys))
    with _keyrings_lock:  # fetch threads share it
        if memo not in _keyrings:
            _keyrings[memo] = repo_keyring(repo)
        return _keyrings[memo]


def fetch_one(pins: Pins, p: Locked, arch: str, runtime: str | None = None) -> Verified:
    """One package, from the cache or its repository, verified: the index chain (its ``C:``
    from the lock, then ``datahash``) on every use; and when it enters the cache, also its own
    signature by a key of the repository it comes from. (A cached file is named by its ``C:``:
    what the chain covers, control and data, is what the signature covered when it came in.)"""
    from .package import verify_package
    from .trust import TrustError

    repo = repository_of(pins, p, runtime)
    path = package_cache_path(p)
    what = f"{p.filename} ({repo.name}: {repo.location}/{arch})"
    url = f"{repo.arch_url(arch)}/{p.filename}"
    try:  # the usual case, cached and sound: no lock needed to read it (a fetch renames a whole file into place)
        return verify_package(path, p, None, what)
    except (OSError, TrustError):
        pass  # missing, unreadable or failing: judged again below (under the lock), and said there
    if not writable(path):  # a read-only cache without a sound copy (just checked above)
        if repo.local is None:
            raise read_only_cache(path, url) from None
        return verify_package(Path(url), p, _keyring(repo), what)  # straight from the local repository
    with file_lock(path):
        if path.exists():
            try:
                return verify_package(path, p, None, what)
            except TrustError as exc:
                log.warn(f"cached {what} fails verification ({exc.message}); fetching it again")
                path.unlink()
        keys = _keyring(repo)  # only what comes in is checked against its repository's keys
        if repo.local is not None:
            return _copy_local(Path(url), path, lambda part: verify_package(part, p, keys, what), what)
        verified: list[Verified] = []
        fetch(url, path, verify=lambda part: verified.append(verify_package(part, p, keys, what)))
        return verified[0]._replace(path=path)  # it was checked as <name>.part, then renamed


def _copy_local(src: Path, dest: Path, check: Callable[[Path], Verified], what: str) -> Verified:
    """A local repository's package into the cache, verified on the copy (what is used is what
    was checked, even if the developer rebuilds the file meanwhile)."""
    import shutil

    from .. import atomic

    if not src.is_file():
        raise LockError(
            f"{what}: not in the local repository ({src})",
            hint="the lock names a package the directory no longer has: rebuild it, or run 'nox -s lock'",
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(dest) as part:
        shutil.copyfile(src, part)
        verified = check(part)
    return verified._replace(path=dest)


class PackageGone(LockError):
    """A locked package is no longer on the mirror (HTTP 404)."""


def _gone(p: Locked, arch: str) -> PackageGone:
    return PackageGone(
        f"{p.filename} is gone from the mirror ({p.repo}/{arch})",
        hint="Alpine keeps only the newest build of each package: run 'nox -s lock' "
        "(or build without --frozen, which re-locks) and commit alpine.lock.json",
    )


def _in_order(
    pins: Pins, closure: Sequence[Locked], futures: list[Future[Verified] | None], arch: str, runtime: str | None
) -> Iterator[Verified]:
    for p, fut in zip(closure, futures, strict=True):
        try:
            yield fetch_one(pins, p, arch, runtime) if fut is None else fut.result()
        except DownloadError as exc:
            if exc.status in (404, 410):
                raise _gone(p, arch) from None
            raise


@contextlib.contextmanager
def fetching(
    pins: Pins, closure: Sequence[Locked], arch: str, runtime: str | None = None
) -> Iterator[Iterator[Verified]]:
    """Every package fetched (or taken from the cache) and verified, as an iterator in ``closure``
    order that yields each as soon as it is verified: the caller merges package 1 while later
    ones are still downloading. Downloads run in parallel (bounded); a cached package is
    verified when its turn comes, in the caller's thread (~0.3 ms each: threads for those cost
    more, in switching, than they save). Leaving waits for every download started."""
    cached = [package_cache_path(p).exists() for p in closure]
    if all(cached):  # no thread pool (nor its import, ~9 ms)
        yield _in_order(pins, closure, [None] * len(closure), arch, runtime)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=fetch_workers()) as pool:
        futures = [
            None if c else pool.submit(fetch_one, pins, p, arch, runtime) for p, c in zip(closure, cached, strict=True)
        ]
        yield _in_order(pins, closure, futures, arch, runtime)


def fetch_all(pins: Pins, closure: Sequence[Locked], arch: str, runtime: str | None = None) -> list[Verified]:
    """Every package fetched and verified; the first failure, in ``closure`` order, once all are done."""
    with fetching(pins, closure, arch, runtime) as verified:
        return list(verified)


def relock(pins: Pins, runtime: str, arch: str, frozen: bool, gone: PackageGone) -> list[Locked]:
    """A locked package left the mirror: the closure re-resolved (and the lock updated), or,
    with ``frozen``, the error that says so."""
    if frozen:
        raise LockError(
            f"{gone.message}; the lock is out of date and --frozen forbids re-resolving",
            hint=_relock_hint(pins, runtime, arch),
        ) from None
    log.warn(f"!!! {gone.message}: Alpine replaced it; re-resolving {runtime}/{arch} and updating the lock !!!")
    return lock_runtime(pins, runtime, arch)


def _relock_hint(pins: Pins, runtime: str, arch: str) -> str:
    """What helps when a locked package left the mirror: a re-lock, if the pins still resolve
    against today's indexes (resolved here, read-only, to know); otherwise a change of the world."""
    from .indexes import resolve

    try:
        resolve(pins, runtime, arch)
    except VulcanError as exc:
        first = exc.message.splitlines()[0]
        return (
            f"a re-lock would not help: the pins no longer resolve against the mirror ({first}); change the world "
            f"in {pins.path.name} (alpine.base, alpine.runtimes.{runtime}.world) or the branch, then run "
            "'nox -s lock' and commit alpine.lock.json"
        )
    return "run 'nox -s lock' (Alpine keeps only the newest build of each package) and commit the lock"
