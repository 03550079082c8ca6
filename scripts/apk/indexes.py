"""Signed APKINDEX files: fetched, verified against the pinned keys, parsed; and resolution.

Repository layout (Alpine mirrors, e.g. https://dl-cdn.alpinelinux.org/alpine/):
``{mirror}/{branch}/{repo}/{arch}/APKINDEX.tar.gz``, packages next to it as ``{name}-{version}.apk``.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from .. import log
from ..fetch import fetch
from ..pins import Alpine, Pins
from .index import Package, parse_index
from .keys import keyring

if TYPE_CHECKING:
    from .trust import Keyring

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

        fetch(url, dest, verify=verify)
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
