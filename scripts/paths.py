"""Where things live: outputs (bin/, images/), stamps, scratch space and the download cache."""

from __future__ import annotations

from pathlib import Path

from . import settings
from .pins import host_arch


def out_root() -> Path:
    """``$VULCAN_OUT`` (tests, CI artifacts) or the repository root."""
    return settings.out_root()


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
    return settings.cache_dir()


def scratch_parent(out_dir: Path) -> Path:
    """Where images are assembled: ``$VULCAN_SCRATCH`` or next to the output."""
    return settings.scratch_dir() or out_dir
