"""The pinned Alpine signing keys: fetched once into the cache, trusted only by fingerprint.

A key is pinned by the SHA-256 of its DER SubjectPublicKeyInfo (trust.py), so PEM formatting
cannot matter. A read-only cache serves the keys it holds.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..fetch import fetch, file_lock, writable
from ..paths import cache_dir
from ..pins import Alpine

if TYPE_CHECKING:
    from .trust import Keyring


def keyring(alpine: Alpine) -> Keyring:
    from .trust import Keyring

    return Keyring.from_pems(key_pems(alpine))


def key_pems(alpine: Alpine) -> dict[str, bytes]:
    """The pinned keys, each fetched once and accepted only if its fingerprint matches."""
    from .trust import TrustError

    pems: dict[str, bytes] = {}
    for key in alpine.keys:
        path = cache_dir() / "keys" / key.sha256 / key.name
        if not writable(path) and path.is_file() and _fp(path) == key.sha256:
            pems[key.name] = path.read_bytes()  # a read-only cache that has it
            continue
        with file_lock(path):
            if not path.exists() or _fp(path) != key.sha256:

                def check(part: Path, key: Any = key) -> None:
                    actual = _fp(part)
                    if actual is None:
                        raise TrustError(
                            f"key {key.name} from {key.url} is not a PEM public key and nothing else",
                            hint="the URL serves something else (an HTML page, a truncated file, text around the "
                            "key?); nothing was kept; check alpine.keys in pins.json and VULCAN_MIRROR",
                        )
                    if actual != key.sha256:
                        raise TrustError(
                            f"key {key.name} from {key.url} has fingerprint {actual}, pinned {key.sha256}",
                            hint="the key file is not the pinned key; check alpine.keys in pins.json",
                        )

                fetch(key.url, path, verify=check)
        pems[key.name] = path.read_bytes()
    return pems


def _fp(path: Path) -> str | None:
    from .trust import fingerprint

    try:
        return fingerprint(path.read_bytes())
    except (OSError, ValueError):
        return None
