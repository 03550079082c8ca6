"""Signed APKINDEX files: fetched, verified against their repository's pinned keys, parsed; and resolution.

Repository layout (Alpine mirrors, e.g. https://dl-cdn.alpinelinux.org/alpine/, and any repository
abuild or melange writes): ``{repository}/{arch}/APKINDEX.tar.gz``, packages next to it as
``{name}-{version}.apk``; Alpine's are ``{mirror}/{branch}/{repo}``. A local repository is the
same layout in a directory.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import log
from ..errors import PinError
from ..fetch import fetch
from ..pins import Pins, Repository
from .index import Package, parse_index
from .keys import repo_keyring

if TYPE_CHECKING:
    from .trust import Keyring


@dataclass(frozen=True)
class Loaded:
    packages: list[Package]
    key: str  # the name of the key that signed the index


_index_memo: dict[tuple[str, str, int], Loaded] = {}
_memo_lock = threading.Lock()


def local_index(repo: Repository, arch: str) -> Path:
    """A local repository's index file, or a PinError that says how to make one."""
    assert repo.local is not None
    path = repo.local / arch / "APKINDEX.tar.gz"
    if not path.is_file():
        raise PinError(
            f"{repo.where}.path: the local repository {repo.location} has no {arch}/APKINDEX.tar.gz ({path})",
            hint=f"index and sign it: cd {repo.local / arch} && apk index -o APKINDEX.tar.gz *.apk && "
            "abuild-sign APKINDEX.tar.gz (see docs/extra-repositories.md)",
        )
    return path


def local_index_sha256(repo: Repository, arch: str) -> str:
    return hashlib.sha256(local_index(repo, arch).read_bytes()).hexdigest()


def load_index(repo: Repository, arch: str, keys: Keyring, repo_index: int) -> Loaded:
    """Fetch (or read, for a local repository) and verify one repository's signed index, once
    per process. Only ``keys``, the repository's own, may have signed it."""
    from .package import read_index

    url = f"{repo.arch_url(arch)}/APKINDEX.tar.gz"
    data = local_index(repo, arch).read_bytes() if repo.local is not None else b""
    # a local index is read each time (a developer rebuilds it); a remote one once per process
    local_sha = hashlib.sha256(data).hexdigest() if repo.local is not None else ""
    memo = (f"{repo.tag}@{url}#{local_sha}", ",".join(sorted(k.sha256 for k in repo.keys)), repo_index)
    with _memo_lock:
        if memo in _index_memo:
            return _index_memo[memo]
    what = f"{repo.name} ({repo.location})/{arch}/APKINDEX.tar.gz"
    if repo.local is not None:
        text, key = read_index(data, keys, what)
    else:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="vulcan-index-") as tmp:
            dest = Path(tmp) / "APKINDEX.tar.gz"
            got: list[tuple[str, str | None]] = []

            def verify(part: Path) -> None:
                got.append(read_index(part.read_bytes(), keys, what))

            fetch(url, dest, verify=verify)
        text, key = got[0]
    parsed = parse_index(text, repo=repo.name, repo_index=repo_index)
    for problem in parsed.unusable:
        log.warn(f"{what}: ignoring unusable package {problem}")
    loaded = Loaded([p for p in parsed.packages if p.arch in ("", "noarch", arch)], key or "")
    with _memo_lock:
        _index_memo[memo] = loaded
    return loaded


@dataclass(frozen=True)
class Resolved:
    package: Package
    repository: Repository
    key: str  # the key that signed its repository's index
    tag: str  # the repository tag apk records for it (s: in its installed database)


def resolve(pins: Pins, runtime: str, arch: str) -> list[Resolved]:
    """A runtime's closure for ``arch`` against every repository of its image."""
    from .solver import Solver

    alpine = pins.alpine
    repos = alpine.repositories_of(runtime)
    packages: list[Package] = []
    keys: dict[str, str] = {}
    for i, repo in enumerate(repos):
        loaded = load_index(repo, arch, repo_keyring(repo), i)
        packages += loaded.packages
        keys[repo.name] = loaded.key
    tags = {i: r.tag for i, r in enumerate(repos) if r.tag}
    world = [*alpine.base, *alpine.runtimes[runtime].world]
    closure = Solver(packages, arch, [r.name for r in repos], tags).solve(world)
    return [Resolved(p, repos[p.repo_index], keys[repos[p.repo_index].name], repos[p.repo_index].tag) for p in closure]
