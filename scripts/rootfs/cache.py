"""The cache of tar streams: stored under the digest of their inputs, never trusted as they are.

``rootfs/<inputs digest>.tar`` + ``.json`` (the sidecar: what the build learnt assembling it),
and under the digest of everything but the agent in ``rootfs/base/`` (what an agent change
splices). ``verify()`` re-hashes the tar and recomputes from it what shapes an image and every
listed file's size (tarwalk.py); the rest of the sidecar is bound to the tar by a sha256 of the
whole sidecar. A disagreeing or unreadable entry is a corrupt one: assembled again and stored
anew. Storing is an optimisation: a cache that cannot take it (full, read-only) costs a
warning, never the build.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from .. import atomic, log, paths
from ..errors import NoSpace
from ..formats import Shape
from .stream import Stream
from .tarwalk import Facts, read_facts


def sidecar(stream: Stream) -> dict[str, Any]:
    side: dict[str, Any] = {
        "sha256": stream.sha256,
        "shape": stream.shape._asdict(),
        "files": stream.files,
        "install_scripts": stream.install_scripts,
        "busybox_links": stream.busybox_links,
        "os_release": stream.os_release,
    }
    if stream.packages:  # a template's (absent otherwise: the sidecars of Alpine streams stay as they were)
        side["packages"] = stream.packages
    return {**side, "binding": binding(side)}


class Corrupt(Exception):
    """A cached stream whose sidecar cannot be used (unreadable, or not bound to its tar)."""


def binding(side: dict[str, Any]) -> str:
    """What binds a sidecar to its tar: the sha256 of all of it, the tar's sha256 included. What
    the tar itself shows (shape, file sizes) is recomputed from it; the rest (each package's
    files, the install scripts, busybox's links, os-release) is known only from the assembly,
    so an edit of any of it breaks the binding and the stream is assembled again."""
    body = {k: v for k, v in side.items() if k != "binding"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _cache_path(digest: str, kind: str = "") -> Path:
    """``rootfs/<digest>.tar``: a stream; ``rootfs/base/<digest>.tar``: the last stream of the
    same packages and configuration with any agent (what an agent change splices)."""
    return paths.cache_dir() / "rootfs" / kind / digest[:2] / f"{digest}.tar"


def cached(digest: str, kind: str = "") -> Stream | None:
    """The cached stream as its sidecar describes it (None: absent), not yet verified against
    its tar; ``Corrupt`` when the sidecar is unreadable or not bound to what it says."""
    tar = _cache_path(digest, kind)
    if not tar.is_file():
        return None
    try:
        side = json.loads(tar.with_suffix(".json").read_text())
        if side.get("binding") != binding(side):
            raise Corrupt("its sidecar was changed after it was written (or by an older version)")
        return Stream(
            tar=tar,
            sha256=str(side["sha256"]),
            shape=Shape(**side["shape"]),
            files={str(k): {str(p): int(n) for p, n in v.items()} for k, v in side["files"].items()},
            install_scripts=list(side["install_scripts"]),
            busybox_links=int(side["busybox_links"]),
            os_release=side["os_release"],
            packages=list(side.get("packages", [])),
        )
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise Corrupt(f"its sidecar is unreadable: {exc}") from None


def sweep(names: list[tuple[str, str]]) -> None:
    """Remove the temporary files a build killed while storing left of these entries: a build
    that finds its stream cached stores nothing, so nothing else would (a cache it cannot
    write is left as it is)."""
    for digest, kind in names:
        dest = _cache_path(digest, kind)
        for f in (dest, dest.with_suffix(".json")):
            try:
                atomic.sweep_temps(f)
            except OSError:
                return


def store(stream: Stream, names: list[tuple[str, str]]) -> None:
    """Keep the stream for the next build under each (digest, kind) name; skipped with one
    warning when the cache cannot take it."""
    for digest, kind in names:
        dest = _cache_path(digest, kind)
        try:
            paths.claim_cache()
            dest.parent.mkdir(parents=True, exist_ok=True)
            with atomic.replacing(dest) as tmp:
                tmp.unlink()
                try:
                    os.link(stream.tar, tmp)  # same file system: no copy
                except OSError:
                    shutil.copyfile(stream.tar, tmp)
            atomic.write_text(dest.with_suffix(".json"), json.dumps(sidecar(stream)))
        except OSError as exc:  # a tar without its sidecar is never used (cached() needs both)
            why = "the cache file system is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            log.warn(f"not keeping the tar stream in the cache ({why}: {dest.parent}); "
                     "the next rebuild assembles it again")  # fmt: skip
            return
        except NoSpace:  # atomic.replacing says ENOSPC this way
            log.warn(f"not keeping the tar stream in the cache (its file system is full: {dest.parent}); "
                     "the next rebuild assembles it again")  # fmt: skip
            return


def disagreement(stream: Stream, facts: Facts) -> str | None:
    """None if the tar is what its sidecar says, else what is wrong (a corrupt cache entry)."""
    if facts.sha256 != stream.sha256:
        return f"sha256 {facts.sha256} != {stream.sha256}"
    if facts.shape != stream.shape:
        return f"the sidecar's shape {stream.shape} is not the tar's {facts.shape}"
    for pkg, listed in stream.files.items():
        for path, size in listed.items():
            if facts.files.get(path) != size:
                return f"the sidecar lists {path} ({pkg}, {size} bytes), the tar has {facts.files.get(path)}"
    return None


def verify(stream: Stream, checkpoint: str | None = None) -> tuple[str | None, Facts | None]:
    """What is wrong with a cached stream (None: nothing), and the facts read to find out
    (``checkpoint``: an entry whose preceding hash state they keep, for a splice)."""
    try:
        facts = read_facts(stream.tar, checkpoint)
    except (OSError, ValueError) as exc:
        return f"unreadable ({exc})", None
    return disagreement(stream, facts), facts
