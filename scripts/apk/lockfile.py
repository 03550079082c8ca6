"""The lock file, ``alpine.lock.json`` next to pins.json: each runtime's exact closure per arch.

npm-ci / uv --frozen semantics: builds read it and need no index; ``--frozen`` makes a missing
or stale entry an error. Writers hold an flock on the lock's directory across the whole
read-modify-write, so concurrent builds of different runtimes never lose each other's entries.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from .. import atomic, log, names, workspace
from ..errors import UsageError, VulcanError
from ..pins import Pins

if TYPE_CHECKING:  # only a re-lock builds Packages: a warm rebuild does not import the index parser
    from .index import Package
    from .indexes import Resolved

# 2: each package records its repository (URL or local path), the key that signed that
# repository's index and its repository tag; a version 1 lock reads as stale (re-resolved)
LOCK_VERSION = 2
CHECKSUM = re.compile(r"Q1[A-Za-z0-9+/]{27}=")  # "Q1" + base64(sha1): apk's C: field
RELOCK_HINT = "the lock is damaged or was edited: run 'nox -s lock' and commit alpine.lock.json"


class LockError(VulcanError):
    """The lock is missing, stale, or names packages the mirror no longer has."""

    exit_code = 4


class Locked(NamedTuple):
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
    repository: str  # where it comes from: its repository's URL or local path, as pins.json has it
    key: str  # the key that signed that repository's index
    tag: str  # its repository's tag ("": untagged), apk's s: in the installed database

    @classmethod
    def of(cls, r: Resolved) -> Locked:
        p = r.package
        return cls(
            p.name, p.version, p.arch, p.repo, p.checksum, p.size, p.installed_size, p.build_time, p.license,
            p.origin, p.url, r.repository.location, r.key, r.tag,
        )  # fmt: skip

    def as_package(self, repo_index: int) -> Package:
        from .index import Package

        return Package(
            name=self.name, version=self.version, arch=self.arch, checksum=self.checksum, size=self.size,
            installed_size=self.installed_size, build_time=self.build_time, license=self.license,
            origin=self.origin, url=self.url, repo=self.repo, repo_index=repo_index,
        )  # fmt: skip

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}.apk"

    @classmethod
    def from_json(cls, value: object, where: str) -> Locked:
        """One package of the lock, checked: the lock comes with the pins (a pull request's, in
        CI), and its names become cache paths and file names (scripts/names.py)."""
        # each field's type as written (a NamedTuple keeps it as a forward reference)
        fields = {k: getattr(t, "__forward_arg__", t) for k, t in cls.__annotations__.items()}
        if not isinstance(value, dict) or set(value) != set(fields):
            raise LockError(f"{where}: expected an object with {', '.join(fields)}", hint=RELOCK_HINT)
        for key, kind in fields.items():
            want = int if kind in (int, "int") else str
            if not isinstance(value[key], want) or isinstance(value[key], bool):
                raise LockError(f"{where}.{key}: expected a {want.__name__}", hint=RELOCK_HINT)
        for key in ("name", "version", "arch", "repo"):
            if (key != "arch" or value[key]) and (why := names.problem(value[key])) is not None:
                raise LockError(f"{where}.{key}: {value[key]!r} is not a plain file name ({why})", hint=RELOCK_HINT)
        if (why := names.problem(f"{value['name']}-{value['version']}.apk")) is not None:
            raise LockError(f"{where}: the package's file name {why}", hint=RELOCK_HINT)
        if not CHECKSUM.fullmatch(value["checksum"]):
            raise LockError(
                f"{where}.checksum: {value['checksum']!r} is not an APK checksum (Q1 + base64 of 20 bytes)",
                hint=RELOCK_HINT,
            )
        return cls(**value)


def lock_path(pins: Pins) -> Path:
    """``alpine.lock.json`` next to the pins file."""
    return pins.path.with_name("alpine.lock.json")


def local_indexes(pins: Pins, runtime: str, arch: str) -> dict[str, str]:
    """The sha256 of each local repository's index: a lock answers for the local packages it
    saw (a developer's rebuilt package changes the index, so the lock is stale)."""
    from .indexes import local_index_sha256

    repos = pins.alpine.repositories_of(runtime)
    return {r.name: local_index_sha256(r, arch) for r in repos if r.local is not None}


def request_digest(pins: Pins, runtime: str, arch: str) -> str:
    """What a lock entry answers: branch, repositories (with their keys, tags and, for a local
    one, its index), world and keys for one runtime/arch."""
    a = pins.alpine
    request: dict[str, Any] = {
        "branch": a.branch,
        "repositories": list(a.repositories),
        "world": [*a.base, *a.runtimes[runtime].world],
        "keys": sorted(k.sha256 for k in a.keys),
        "arch": arch,
    }
    extra = a.extra_repositories + a.runtimes[runtime].extra_repositories
    if extra:  # absent without extra repositories: the locks of pins without any stay valid
        request["extra_repositories"] = [
            {"name": r.name, "location": r.location, "tag": r.tag, "keys": sorted(k.sha256 for k in r.keys)}
            for r in extra
        ]
        request["local_indexes"] = local_indexes(pins, runtime, arch)
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def read_lock(pins: Pins) -> dict[str, Any]:
    path = lock_path(pins)
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return {"lock_version": LOCK_VERSION, "entries": {}}
    except (ValueError, RecursionError) as exc:
        raise LockError(f"{path}: not valid JSON ({exc})", hint="delete it and run 'nox -s lock'") from None
    if data.get("lock_version") == 1:  # before repositories were recorded: every entry is stale
        return {"lock_version": LOCK_VERSION, "entries": {k: {} for k in data.get("entries", {})}}
    if data.get("lock_version") != LOCK_VERSION:
        raise LockError(f"{path}: unsupported lock_version {data.get('lock_version')!r}", hint="run 'nox -s lock'")
    return data


def write_lock(pins: Pins, data: dict[str, Any]) -> None:
    """Write the lock (callers hold ``locked_for_update``); unchanged content is not rewritten."""
    path = lock_path(pins)
    data = {**data, "entries": {k: v for k, v in data.get("entries", {}).items() if v}}  # a v1 entry: gone
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    try:
        if path.read_text() == text:
            return
    except FileNotFoundError:
        pass
    atomic.write_text(path, text, fsync=True)


@contextlib.contextmanager
def locked_for_update(pins: Pins) -> Iterator[None]:
    """Hold an flock for a whole read-modify-write of the lock. On the directory that holds it,
    not on a lock file: the lock is replaced by rename (so not itself), and a lock file would be
    left in the checkout, untracked."""
    with workspace.directory_lock(lock_path(pins).parent):
        yield


def locked_entry(pins: Pins, runtime: str, arch: str) -> list[Locked] | None:
    """The locked closure, or None if missing or stale."""
    entry = read_lock(pins).get("entries", {}).get(f"{runtime}/{arch}")
    if not entry or entry.get("request") != request_digest(pins, runtime, arch):
        return None
    where = f"{lock_path(pins).name}: entries.{runtime}/{arch}.packages"
    return [Locked.from_json(p, f"{where}[{i}]") for i, p in enumerate(entry["packages"])]


def lock_runtime(pins: Pins, runtime: str, arch: str) -> list[Locked]:
    """Resolve against the live indexes and record the closure in the lock."""
    from .indexes import resolve

    closure = [Locked.of(p) for p in resolve(pins, runtime, arch)]
    with locked_for_update(pins):  # re-read under the flock: another build may have added its entry
        data = read_lock(pins)
        entry: dict[str, Any] = {
            "request": request_digest(pins, runtime, arch),
            "world": [*pins.alpine.base, *pins.alpine.runtimes[runtime].world],
            "packages": [p._asdict() for p in closure],
        }
        if local := local_indexes(pins, runtime, arch):
            entry["local_indexes"] = local
        data.setdefault("entries", {})[f"{runtime}/{arch}"] = entry
        data["lock_version"] = LOCK_VERSION
        write_lock(pins, data)
    return closure


def ensure_locked(pins: Pins, runtime: str, arch: str, frozen: bool) -> list[Locked]:
    closure = locked_entry(pins, runtime, arch)
    if closure is not None:
        return closure
    path = lock_path(pins)
    entry = read_lock(pins).get("entries", {}).get(f"{runtime}/{arch}")
    state = "stale (pins changed since it was written)" if entry is not None else "missing"
    changed = [
        name
        for name, sha in local_indexes(pins, runtime, arch).items()
        if entry and name in entry.get("local_indexes", {}) and entry["local_indexes"][name] != sha
    ]
    if changed:
        repos = {r.name: r for r in pins.alpine.repositories_of(runtime)}
        state = (
            "stale: the index of local repository "
            + ", ".join(f"{n} ({repos[n].location}/{arch})" for n in changed)
            + " changed since it was locked"
        )
    if frozen:
        raise LockError(
            f"{path.name}: the lock for {runtime}/{arch} is {state}, and --frozen forbids re-resolving",
            hint="run 'nox -s lock' and commit alpine.lock.json",
        )
    if entry is None and (_said_no_lock or not path.exists()):
        if not _said_no_lock:  # once per run, however many runtimes and arches it builds
            _said_no_lock.append(path)
            log.warn(f"{path.name} does not exist (a fresh clone): each runtime's packages are resolved now against "
                     f"the pinned Alpine branch and written to {path.name}; to pin them, commit it (CI's lock job "
                     "makes it once and hands it to every build: 'nox -s lock')")  # fmt: skip
        log.info(f"{path.name}: resolving {runtime}/{arch}")
    else:
        log.warn(f"{path.name}: lock for {runtime}/{arch} is {state}: resolving now and updating the lock")
    return lock_runtime(pins, runtime, arch)


_said_no_lock: list[Path] = []


def lock_all(pins: Pins, runtimes: Iterable[str], arches: Iterable[str]) -> dict[str, int]:
    sizes = {}
    for arch in arches:
        for rt in runtimes:
            if rt not in pins.alpine.runtimes:
                raise UsageError(f"unknown runtime {rt!r}", hint=f"known: {', '.join(pins.alpine.runtimes)}")
            closure = lock_runtime(pins, rt, arch)
            sizes[f"{rt}/{arch}"] = len(closure)
            log.info(f"lock {rt}/{arch}: {len(closure)} packages")
    return sizes
