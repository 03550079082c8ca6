"""Where things live: outputs (bin/, images/), stamps, scratch space and the download cache."""

from __future__ import annotations

import contextlib
from pathlib import Path

from . import ownership, settings
from .arch import host_arch


def out_root() -> Path:
    """``$VULCAN_OUT`` (tests, CI artifacts) or the repository root."""
    return settings.out_root()


def per_arch(base: Path, arch: str) -> Path:
    # One naming convention everywhere: the host architecture's outputs sit directly in
    # bin/ and images/; another architecture's in a subdirectory named after it.
    return base if arch == host_arch() else base / arch


def bin_dir(arch: str) -> Path:
    return per_arch(out_root() / "bin", arch)


def images_dir(arch: str) -> Path:
    return per_arch(out_root() / "images", arch)


# Every output's name, in one place (plan, download, guest, verify and boot ask here).


def image(runtime: str, fmt: str, arch: str) -> Path:
    return images_dir(arch) / f"{runtime}.{fmt}"


def manifest(runtime: str, arch: str) -> Path:
    return images_dir(arch) / f"{runtime}.manifest.json"


def sbom(runtime: str, arch: str) -> Path:
    return images_dir(arch) / f"{runtime}.spdx.json"


def agent(arch: str) -> Path:
    return bin_dir(arch) / "vulcan-guest"


def vmm(arch: str, name: str) -> Path:
    """``firecracker`` or ``jailer``."""
    return bin_dir(arch) / name


def kernel(arch: str) -> Path:
    return bin_dir(arch) / "vmlinux"


def snapshot(runtime: str, fmt: str, arch: str) -> Path:
    """A runtime's Firecracker snapshot of one image format (vm/snapshot.py): a directory."""
    return images_dir(arch) / "snapshots" / f"{runtime}.{fmt}"


def rel(p: Path) -> str:
    """``p`` as a user reads it in a report: relative to the output root when it is inside."""
    try:
        return str(p.relative_to(out_root()))
    except ValueError:
        return str(p)


def console_log(runtime: str, fmt: str, vmm: str, arch: str) -> Path:
    """A boot's serial console (its directory made on first use)."""
    logs = images_dir(arch) / ".boot"
    logs.mkdir(parents=True, exist_ok=True)
    return logs / f"{runtime}.{fmt}.{vmm}.console.log"


def stamp_path(base: Path, step: str) -> Path:
    return base / ".stamps" / f"{step}.json"


def cache_dir() -> Path:
    """The shared content-addressed download cache: it holds streams images are written from and
    the Go toolchain, so one another user could write is refused (ownership.py)."""
    return safe(settings.cache_dir(), "the cache", "VULCAN_CACHE")


def scratch_parent(out_dir: Path) -> Path:
    """Where images are assembled: ``$VULCAN_SCRATCH`` or next to the output."""
    given = settings.scratch_dir()
    # each build's scratch inside it is a private directory (mkdtemp, 0700): a sticky one will do
    return safe(given, "the scratch directory", "VULCAN_SCRATCH", sticky_ok=True) if given else out_dir


def safe(path: Path, what: str, setting: str | None, sticky_ok: bool = False) -> Path:
    """``path``, once ownership.require_safe let it pass in this process (checked once per path)."""
    if path not in _safe:
        ownership.require_safe(path, what, setting, sticky_ok)
        _safe.add(path)
    return path


_safe: set[Path] = set()


# -- what is ours: the marker clean relies on ---------------------------------------------------
# A directory this tool created carries a CACHEDIR.TAG (https://bford.info/cachedir/: backup
# tools skip it, as they skip cargo's target/) whose comment names this tool. `clean` removes
# only in directories that carry it, and only entries this tool writes (clean.py's
# output_entries(), CACHE_ENTRIES): VULCAN_OUT=$HOME must never cost a user ~/bin, nor VULCAN_CACHE=~/.cache the
# rest of ~/.cache. A directory that existed before is written into but not marked, unless it
# is this tool's default location (the checkout's bin/ and images/, ~/.cache/vulcan-images).
MARKER = "CACHEDIR.TAG"
OUTPUT_DIRS = ("bin", "images")  # the top-level output directories
MARKER_TEXT = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# Created by vulcan-images. Its contents are rebuilt or fetched again on demand;\n"
    "# `nox -s clean` removes what vulcan-images wrote here, and nothing else.\n"
)


def is_marked(directory: Path) -> bool:
    try:
        return "vulcan-images" in (directory / MARKER).read_text(errors="replace")[:4096]
    except OSError:
        return False


def _mark(directory: Path) -> None:
    with contextlib.suppress(OSError):  # a read-only location: clean will leave it, and say why
        (directory / MARKER).write_text(MARKER_TEXT)


def claim(directory: Path, default: bool = False) -> bool:
    """Create ``directory`` (and its parents); mark it as ours when this call created it, or
    when it is this tool's ``default`` location. True: this call created it."""
    if directory.is_dir():
        if default and not is_marked(directory):
            _mark(directory)
        return False
    try:
        directory.mkdir(parents=True)
    except OSError:  # another run made it a moment ago (and marks it), or it cannot be made:
        return False  # then the write that follows says so, naming the path
    _mark(directory)
    return True


def claim_outputs(outputs: list[Path]) -> list[Path]:
    """Before a step writes ``outputs``: the top-level output directories they sit in. Returns
    those this call created (``unclaim`` them if the step fails: nothing is left of it)."""
    root = safe(out_root(), "the output directory", "VULCAN_OUT")
    created = []
    for top in OUTPUT_DIRS:
        if any(p.is_relative_to(root / top) for p in outputs) and claim(root / top, default=root == settings.REPO_ROOT):
            created.append(root / top)
    return created


def unclaim(created: list[Path]) -> None:
    """Remove directories ``claim`` made that hold nothing but the marker (a failed step)."""
    for directory in created:
        try:
            if [p.name for p in directory.iterdir()] == [MARKER]:
                (directory / MARKER).unlink()
                directory.rmdir()
        except OSError:
            pass


def claim_cache() -> None:
    """Before anything is written into the cache (first download, stream, Go build cache)."""
    root = cache_dir()
    if root in _claimed:
        return
    claim(root, default=settings.cache_is_default())
    _claimed.add(root)


_claimed: set[Path] = set()
