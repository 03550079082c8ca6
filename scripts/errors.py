"""The errors a user can see, and the one place that prints them.

Each error says what failed, which input, and what to do next. ``handle()`` turns any
exception that reaches the top (ours, an OSError, a bad argument) into ``vulcan: error: ...``
and ``  hint: ...`` lines, without a traceback (with one under ``--debug``).
Model: cibuildwheel's errors.py and mkosi's die(msg, hint=...).
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

# What ``python -m scripts COMMAND`` exits with, by kind of error (each class says its own;
# docs/errors.md lists them, and a test keeps the two the same). Under nox, nox's last line
# names the code and nox itself exits 1.
EXIT_CODES = {
    0: "success",
    1: "a step failed: a build, a tool, a check (verify, `update_pins --check`: outdated)",
    2: "a bad command line (an unknown command, option or runtime; options that do not go together)",
    3: "the network: a mirror or registry could not be reached or refused an answer",
    4: "the configuration: pins.json, alpine.lock.json or a VULCAN_* setting cannot be used",
    5: "a tool this step needs is not installed",
    6: "trust: bytes, a signature or a path that does not verify (nothing of it was kept)",
    7: "no space left on a file system",
    8: "a VM did not boot, answer or snapshot",
    70: "an internal error: a bug (the traceback says where; please report it)",
    130: "interrupted (Ctrl-C)",
}


class VulcanError(Exception):
    """Base class. ``hint`` tells the user what to do next; ``exit_code``: see EXIT_CODES."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class UsageError(VulcanError):
    """The command line asks for something that is not there (a runtime pins.json lacks) or
    combines options that do not go together."""

    exit_code = 2


class PinError(VulcanError):
    """pins.json (or the lock) is malformed or incomplete."""

    exit_code = 4


class SettingError(VulcanError):
    """An environment variable (VULCAN_*, SOURCE_DATE_EPOCH) has a value we cannot use."""

    exit_code = 4


class DownloadError(VulcanError):
    """A URL could not be fetched. ``status``: the HTTP status when the server answered."""

    exit_code = 3

    def __init__(self, message: str, hint: str | None = None, status: int | None = None) -> None:
        super().__init__(message, hint)
        self.status = status


class ChecksumError(VulcanError):
    """Bytes do not match their pin."""

    exit_code = 6


class ToolMissing(VulcanError):
    """An external program is not installed."""

    exit_code = 5


class ToolFailed(VulcanError):
    """An external program exited non-zero."""


class BuildError(VulcanError):
    """A build step produced something unusable."""


class ArchiveError(VulcanError):
    """An archive has an unexpected layout."""


class NoSpace(VulcanError):
    """A file system is full."""

    exit_code = 7


def mount_point(path: Path) -> Path:
    """The mount point of the file system that holds ``path`` (or would hold it)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    while p != p.parent and not os.path.ismount(p):
        p = p.parent
    return p


def free_bytes(path: Path) -> int:
    st = os.statvfs(mount_point(path))
    return st.f_bavail * st.f_frsize


def no_space(path: Path, needed: int | None = None, what: str = "writing") -> NoSpace:
    from .text import human

    fs = mount_point(path)
    need = f"; needs {human(needed)}" if needed else ""
    try:
        free = f", {human(free_bytes(path))} free"
    except OSError:
        free = ""
    return NoSpace(
        f"no space left on {fs} {what} {path}{need}{free}",
        hint="free space there, or point the matching setting elsewhere (VULCAN_OUT, VULCAN_SCRATCH, VULCAN_CACHE)",
    )


_OS_HINTS = {
    errno.ENOSPC: "free space on that file system, or point VULCAN_OUT / VULCAN_SCRATCH / VULCAN_CACHE elsewhere",
    errno.EROFS: "that file system is read-only: point VULCAN_OUT (or VULCAN_CACHE, VULCAN_SCRATCH) at a writable one",
    errno.EACCES: "check the permissions of that path, or point the matching VULCAN_* setting elsewhere",
    errno.ENOTDIR: "a part of that path is a file, not a directory: check VULCAN_OUT, VULCAN_CACHE and friends",
}


def from_os_error(exc: OSError) -> VulcanError:
    """An OSError that reached the top, said as an error a user can act on."""
    if exc.errno == errno.ENOSPC and exc.filename:
        return no_space(Path(exc.filename))
    where = f": {exc.filename}" if exc.filename else ""
    text = exc.strerror or str(exc)
    return VulcanError(f"{text}{where}", hint=_OS_HINTS.get(exc.errno or 0))


def handle(exc: BaseException, debug: bool) -> int:
    """Print ``exc`` for a user and return the exit code; None of ours gets a traceback."""
    if isinstance(exc, KeyboardInterrupt):
        print("vulcan: interrupted", file=sys.stderr)
        return 130
    if debug:
        import traceback  # only here: every process start counts (bench: no-op)

        traceback.print_exception(exc)
    if isinstance(exc, OSError):
        exc = from_os_error(exc)
    if not isinstance(exc, VulcanError):
        if not debug:
            import traceback

            traceback.print_exception(exc)
        print(
            f"vulcan: error: internal error: {type(exc).__name__}: {exc}\n"
            "  hint: this is a bug in vulcan-images; please report it with the traceback above",
            file=sys.stderr,
        )
        return 70
    print(f"vulcan: error: {exc}", file=sys.stderr)
    return exc.exit_code
