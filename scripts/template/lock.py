"""A template's entries in the lock: the image a reference resolved to, per architecture.

``nox -s lock`` resolves the reference (a tag, or an index's digest) for each architecture and
records the manifest, config and layer digests and the config's ``created``; a build reads them
and fetches by digest only. A build without a fresh entry resolves a digest reference itself
(its bytes are pinned) and records it, as the Alpine path does; a tag it refuses.
"""

from __future__ import annotations

import hashlib
import json

from .. import log
from ..apk import lockfile
from ..apk.lockfile import LockError
from ..pins import Pins
from .source import LOCK_HINT, LockedImage, NoPlatform, check_pinned, resolve


def request_digest(pins: Pins, runtime: str, arch: str) -> str:
    image = pins.alpine.runtimes[runtime].image
    assert image is not None
    return hashlib.sha256(json.dumps({"image": image.reference, "arch": arch}, sort_keys=True).encode()).hexdigest()


def locked(pins: Pins, runtime: str, arch: str) -> LockedImage | None:
    """The locked image, or None if missing or stale."""
    entry = lockfile.read_lock(pins).get("entries", {}).get(f"{runtime}/{arch}")
    if not entry or entry.get("request") != request_digest(pins, runtime, arch) or "image" not in entry:
        return None
    return LockedImage.from_json(entry["image"], f"{lockfile.lock_path(pins).name}: entries.{runtime}/{arch}.image")


def lock(pins: Pins, runtime: str, arch: str) -> LockedImage:
    image = pins.alpine.runtimes[runtime].image
    assert image is not None
    found = resolve(image.reference, arch)
    with lockfile.locked_for_update(pins):
        data = lockfile.read_lock(pins)
        data.setdefault("entries", {})[f"{runtime}/{arch}"] = {
            "request": request_digest(pins, runtime, arch),
            "image": found.to_json(),
        }
        data["lock_version"] = lockfile.LOCK_VERSION
        lockfile.write_lock(pins, data)
    log.info(f"lock {runtime}/{arch}: {image.reference} -> {found.manifest} ({len(found.layers)} layers)")
    return found


def ensure(pins: Pins, runtime: str, arch: str, frozen: bool) -> LockedImage:
    found = locked(pins, runtime, arch)
    if found is not None:
        return found
    image = pins.alpine.runtimes[runtime].image
    assert image is not None
    name = lockfile.lock_path(pins).name
    if frozen:
        raise LockError(
            f"{name}: no current entry for the template {runtime}/{arch}, and --frozen forbids resolving it",
            hint=LOCK_HINT,
        )
    check_pinned(image.reference)
    log.info(f"{name}: resolving the template {runtime}/{arch} ({image.reference})")
    return lock(pins, runtime, arch)


def lock_templates(pins: Pins, runtimes: list[str], arches: list[str]) -> None:
    """``nox -s lock`` for templates: an architecture the image is not built for is said, not locked."""
    for arch in arches:
        for rt in runtimes:
            try:
                lock(pins, rt, arch)
            except NoPlatform as exc:
                log.warn(f"lock {rt}/{arch}: {exc.message}; not locked (a build for {arch} says so)")
