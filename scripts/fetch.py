"""The HTTP fetch: the one fetch() every step uses, and the content-addressed cache built on it.

- requests with connect/read timeouts; bounded retries with exponential backoff on connection
  errors, timeouts, truncated bodies and 5xx; never on 4xx.
- Resumes an interrupted ``<name>.part`` with an HTTP Range request when the server allows it
  (206), else starts over.
- Hashes while streaming, verifies, and only then ``os.replace``-s the file into place: a
  failed or interrupted download never leaves anything that looks finished.
- One ``fcntl.flock`` lock per artifact, so concurrent runs neither corrupt nor double-fetch.
  A read-only cache (a CI cache, a shared one) still serves the entries it has: checking a
  present, correct entry needs no lock and no write.
- A host name that does not resolve is not transient: it fails at once with the hint.
- ``$VULCAN_MIRROR=http://host:port/prefix`` fetches every upstream ``https://HOST/PATH`` as
  ``$VULCAN_MIRROR/HOST/PATH`` (air-gapped users, and our tests); a directory (a path or
  ``file://``, such as ``nox -s mirror`` writes) is read the same way, with no network.

Model: cibuildwheel's download() and pip's adjacent temp file + rename.
The ``nox -s download`` session is scripts/download.py.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from . import log, settings
from .errors import ChecksumError, DownloadError, no_space
from .hashing import sha256_file

if TYPE_CHECKING:
    import requests

# requests/urllib3 are imported where they are used: a no-op run and a warm rebuild never pay for
# them (50 ms of imports, python -X importtime, beside the rootfs step's own ~50 ms; test_rootfs).

ATTEMPTS = 4
BACKOFF_S = 0.5
TIMEOUT_S = (15.0, 60.0)  # (connect, read between bytes)
CHUNK = 1 << 20

_local = threading.local()


class _Transient(Exception):
    """Worth retrying: the next attempt may succeed."""


class _Unresolvable(Exception):
    """The host name does not resolve: retrying will not help (offline, or a typo)."""


def mirror_url(url: str) -> str:
    mirror = settings.mirror()
    if not mirror:
        return url
    parts = urlsplit(url)
    query = f"?{parts.query}" if parts.query else ""
    return f"{mirror}/{parts.netloc}{parts.path}{query}"


def _session() -> requests.Session:
    import requests

    sess = getattr(_local, "session", None)
    if sess is None:
        sess = requests.Session()
        sess.headers["User-Agent"] = "vulcan-images"
        _local.session = sess
    return sess


@contextlib.contextmanager
def file_lock(target: Path, shared: bool = False) -> Iterator[None]:
    """An exclusive lock for one artifact; lock files are kept (deleting them would race).

    Raises OSError (EROFS, EACCES) where the lock file cannot be created: callers that only
    read use ``read_only_ok`` to carry on without it."""
    lock = target.with_name(target.name + ".lock")
    if target.is_relative_to(settings.cache_dir()):
        from .paths import claim_cache

        claim_cache()
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def writable(path: Path) -> bool:
    """Can we create files next to ``path`` (False for a read-only or foreign cache)?"""
    probe = path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return os.access(probe, os.W_OK) and not _read_only_fs(probe)


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _from_directory(real: str, part: Path, progress: log.Progress) -> hashlib._Hash:
    """A mirror directory's file (``file://``): copied and hashed as a download is."""
    src = Path(urlsplit(real).path)
    h = hashlib.sha256()
    try:
        with open(src, "rb") as f, open(part, "wb") as out:
            progress.total = os.fstat(f.fileno()).st_size
            while chunk := f.read(CHUNK):
                out.write(chunk)
                h.update(chunk)
                progress.update(len(chunk))
    except FileNotFoundError:
        part.unlink(missing_ok=True)
        raise DownloadError("not in the mirror directory", status=404) from None
    return h


def _attempt(real: str, part: Path, progress: log.Progress) -> hashlib._Hash:
    if real.startswith("file://"):
        return _from_directory(real, part, progress)
    import requests
    import urllib3

    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with _session().get(real, stream=True, timeout=TIMEOUT_S, headers=headers) as resp:
            if resp.status_code == 416:  # our .part is stale or complete: start over
                part.unlink(missing_ok=True)
                raise _Transient("server refused the resume range")
            if 400 <= resp.status_code < 500:
                raise DownloadError(f"HTTP {resp.status_code} {resp.reason}", status=resp.status_code)
            if resp.status_code >= 500:
                raise _Transient(f"HTTP {resp.status_code} {resp.reason}")
            h = hashlib.sha256()
            if resp.status_code == 206 and have:
                with open(part, "rb") as f:  # hash the prefix we already have
                    while chunk := f.read(CHUNK):
                        h.update(chunk)
                mode = "ab"
                progress.update(have)
            else:
                have, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            expected = have + int(length) if length and length.isdigit() else None
            progress.total = expected
            got = have
            with open(part, mode) as f:
                # raw bytes exactly as served: never let a Content-Encoding header rewrite them
                for chunk in resp.raw.stream(CHUNK, decode_content=False):
                    f.write(chunk)
                    h.update(chunk)
                    got += len(chunk)
                    progress.update(len(chunk))
            if expected is not None and got != expected:
                raise _Transient(f"connection closed after {got} of {expected} bytes")
            return h
    except (requests.ConnectionError, requests.Timeout, urllib3.exceptions.HTTPError) as exc:
        if _unresolvable(exc):
            raise _Unresolvable(_describe(exc)) from None
        raise _Transient(_describe(exc)) from None


def _unresolvable(exc: BaseException) -> bool:
    """A DNS failure (urllib3's NameResolutionError wraps socket.gaierror)."""
    import socket

    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, socket.gaierror) or type(e).__name__ == "NameResolutionError":
            return True
        todo += [e.__cause__, e.__context__, *[a for a in e.args if isinstance(a, BaseException)]]
        todo.append(getattr(e, "reason", None))
    return False


def _describe(exc: Exception) -> str:
    """One readable phrase instead of urllib3's nested reprs."""
    import requests
    import urllib3

    text = str(exc)
    if isinstance(exc, (requests.Timeout, urllib3.exceptions.TimeoutError)) or "timed out" in text:
        return "timed out"
    found = re.search(r"\[Errno -?\d+\] ([^)'\"]+)", text)
    if found:
        return f"connection failed: {found.group(1).strip()}"
    if "IncompleteRead" in text or "Connection broken" in text:
        return "connection closed in the middle of the body"
    return f"{type(exc).__name__}: {text[:200]}"


def fetch(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    verify: Callable[[Path], None] | None = None,
) -> str:
    """Fetch ``url`` (through the mirror, if set) to ``dest``; return its sha256.

    ``sha256``, if given, must match; ``verify`` may inspect the complete file and raise.
    The caller holds the lock for ``dest`` when other processes may write it.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    real = mirror_url(url)
    shown = url if real == url else f"{url} (via {real})"
    log.info(f"downloading {shown}")
    start = time.monotonic()
    progress = log.Progress(Path(urlsplit(url).path).name, None)
    try:
        for attempt in range(1, ATTEMPTS + 1):
            try:
                h = _attempt(real, part, progress)
                break
            except OSError as exc:  # a write of the .part file: say which file system is full
                if exc.errno == errno.ENOSPC:
                    raise no_space(part, progress.total, "downloading") from None
                raise
            except DownloadError as exc:
                raise DownloadError(
                    f"cannot download {shown}: {exc.message}",
                    hint="check the URL in the pins file, or that VULCAN_MIRROR serves this path",
                    status=exc.status,
                ) from None
            except _Unresolvable as exc:
                host = urlsplit(real).hostname
                raise DownloadError(
                    f"cannot download {shown}: {exc} (the name {host} does not resolve)",
                    hint="are you offline? Connect, or set VULCAN_MIRROR to a mirror you can reach; "
                    "finished downloads are kept",
                ) from None
            except _Transient as exc:
                if attempt == ATTEMPTS:
                    raise DownloadError(
                        f"cannot download {shown}: {exc} (gave up after {ATTEMPTS} attempts)",
                        hint="check the network (or VULCAN_MIRROR) and run again; finished downloads are kept",
                    ) from None
                delay = BACKOFF_S * 2 ** (attempt - 1)
                name = Path(urlsplit(url).path).name
                log.warn(f"{name}: {exc}; retrying in {delay:.1f}s (attempt {attempt + 1}/{ATTEMPTS})")
                time.sleep(delay)
    finally:
        progress.close()
    actual = h.hexdigest()
    if sha256 is not None and actual != sha256:
        part.unlink(missing_ok=True)
        raise ChecksumError(
            f"checksum mismatch for {shown}\n  expected sha256: {sha256}\n  actual sha256:   {actual}",
            hint="the bad download was deleted; if upstream really changed, re-pin with 'nox -s update_pins'",
        )
    if verify is not None:
        try:
            verify(part)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
    os.replace(part, dest)  # .part is unique to this artifact, and we hold its lock
    size = dest.stat().st_size
    log.info(f"downloaded {Path(urlsplit(url).path).name}: {log.human(size)} in {time.monotonic() - start:.1f}s")
    return actual


def cached(url: str, sha256: str) -> Path:
    """The verified cache entry for ``sha256``, downloading it from ``url`` only if needed."""
    return cache_entry(sha256, lambda path: fetch(url, path, sha256=sha256), url)


def cache_entry(sha256: str, obtain: Callable[[Path], object], what: str) -> Path:
    """The content-addressed cache entry for ``sha256`` (``$VULCAN_CACHE/sha256/XX/HEX``, shared
    by every download: packages, release files, a template's layers), made by ``obtain(path)``
    only if it is missing or corrupt; ``obtain`` writes ``path`` only once its bytes are checked.

    Entries are re-hashed on every use: a tampered entry is deleted and obtained again. In a
    read-only cache a correct entry is used as it is; a missing or corrupt one is an error
    naming ``what`` (its URL, or the layer of an image)."""
    path = settings.cache_dir() / "sha256" / sha256[:2] / sha256
    if not writable(path):
        if path.is_file() and sha256_file(path) == sha256:
            return path
        raise read_only_cache(path, what)
    with file_lock(path):
        if path.exists():
            actual = sha256_file(path)
            if actual == sha256:
                return path
            log.warn(f"cache entry {path} is corrupt (sha256 {actual}); fetching it again")
            path.unlink()
        obtain(path)
    return path


def read_only_cache(path: Path, url: str) -> DownloadError:
    state = "is corrupt" if path.exists() else "is missing"
    return DownloadError(
        f"the cache entry for {url} {state}, and the cache is read-only ({path.parent})",
        hint="point VULCAN_CACHE at a writable directory (entries there are reused when correct)",
    )
