"""Where things live: outputs (bin/, images/), stamps, scratch space and the download cache."""

from __future__ import annotations

import os
from pathlib import Path

from .pins import REPO_ROOT, host_arch


def out_root() -> Path:
    """``$VULCAN_OUT`` (tests, CI artifacts) or the repository root."""
    env = os.environ.get("VULCAN_OUT")
    return Path(env).resolve() if env else REPO_ROOT


def _per_arch(base: Path, arch: str) -> Path:
    # One naming convention everywhere: the host architecture's outputs sit directly in
    # bin/ and images/; another architecture's in a subdirectory named after it.
    return base if arch == host_arch() else base / arch


def bin_dir(arch: str) -> Path:
    return _per_arch(out_root() / "bin", arch)


def images_dir(arch: str) -> Path:
    return _per_arch(out_root() / "images", arch)


def stamp_path(base: Path, step: str) -> Path:
    return base / ".stamps" / f"{step}.json"


def cache_dir() -> Path:
    """The shared content-addressed download cache."""
    env = os.environ.get("VULCAN_CACHE")
    if env:
        return Path(env).resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "vulcan-images"
