"""The pinned signing keys of every repository: fetched once, trusted only by fingerprint.

Alpine's keys and each extra repository's are fetched once into the cache (or read from a
local file). A key is pinned by the SHA-256 of its DER SubjectPublicKeyInfo (trust.py), so PEM formatting
cannot matter. A read-only cache serves the keys it holds. Each repository has its own keyring:
its index must be signed by one of its own keys, never by another repository's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..fetch import fetch, file_lock, writable
from ..paths import cache_dir
from ..pins import Alpine, AlpineKey, Repository

if TYPE_CHECKING:
    from .trust import Keyring


def keyring(alpine: Alpine) -> Keyring:
    """Alpine's own keys (alpine.keys)."""
    from .trust import Keyring

    return Keyring.from_pems(key_pems(alpine.keys))


def repo_keyring(repo: Repository) -> Keyring:
    """The keys that alone may sign ``repo``'s index and packages."""
    from .trust import Keyring

    return Keyring.from_pems(key_pems(repo.keys))


def key_pems(keys: Alpine | tuple[AlpineKey, ...]) -> dict[str, bytes]:
    """The pinned keys, each fetched once and accepted only if its fingerprint matches."""
    from .trust import TrustError

    if isinstance(keys, Alpine):
        keys = keys.keys
    pems: dict[str, bytes] = {}
    for key in keys:
        if key.path is not None:
            pems[key.name] = _local_key(key)
            continue
        path = cache_dir() / "keys" / key.sha256 / key.name
        if not writable(path) and path.is_file() and matches_pin(path, key.sha256):
            pems[key.name] = path.read_bytes()  # a read-only cache that has it
            continue
        with file_lock(path):
            if not path.exists() or not matches_pin(path, key.sha256):

                def check(part: Path, key: Any = key) -> None:
                    actual = _fp(part)
                    if actual is None:
                        raise TrustError(
                            f"key {key.name} from {key.url} is not a PEM public key and nothing else",
                            hint="the URL serves something else (an HTML page, a truncated file, text around the "
                            f"key?); nothing was kept; check {key.where or 'alpine.keys'} in pins.json and "
                            "VULCAN_MIRROR",
                        )
                    if actual != key.sha256:
                        raise TrustError(
                            f"key {key.name} from {key.url} has fingerprint {actual}, pinned {key.sha256}",
                            hint=f"the key file is not the pinned key; check {key.where or 'alpine.keys'} in pins.json",
                        )

                fetch(key.url, path, verify=check)
        pems[key.name] = path.read_bytes()
    return pems


MAX_KEY = 64 << 10


def _local_key(key: AlpineKey) -> bytes:
    """A key pinned as a local file (a developer's ``~/.abuild/*.rsa.pub``), checked as a fetched one."""
    from .trust import TrustError, fingerprint, has_fingerprint

    assert key.path is not None
    try:
        with open(key.path, "rb") as f:
            data = f.read(MAX_KEY + 1)  # a PEM public key is a few KiB: nothing bigger is read whole
    except OSError as exc:
        raise TrustError(f"{key.where}: cannot read {key.path}: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY:
        raise TrustError(f"{key.where}: {key.path} is larger than {MAX_KEY // 1024} KiB: not a PEM public key",
                         hint="point it at the public half (abuild-keygen writes NAME.rsa.pub)")  # fmt: skip
    if has_fingerprint(data, key.sha256):
        return data
    try:
        actual = fingerprint(data)
    except ValueError:
        raise TrustError(
            f"{key.where}: {key.path} is not a PEM public key and nothing else",
            hint="point it at the public half (abuild-keygen writes NAME.rsa.pub beside the private NAME.rsa)",
        ) from None
    if actual != key.sha256:
        raise TrustError(
            f"{key.where}: {key.path} has fingerprint {actual}, pinned {key.sha256}",
            hint=f"the file is not the pinned key; if you replaced it on purpose, pin the new sha256 at {key.where}",
        )
    return data


def matches_pin(path: Path, sha256: str) -> bool:
    """Whether the key file at ``path`` is the key pinned by ``sha256`` (its DER fingerprint)."""
    from .trust import has_fingerprint

    try:
        return has_fingerprint(path.read_bytes(), sha256)
    except OSError:
        return False


def _fp(path: Path) -> str | None:
    from .trust import fingerprint

    try:
        return fingerprint(path.read_bytes())
    except (OSError, ValueError):
        return None
