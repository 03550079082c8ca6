"""Writing files so that nothing half-written ever looks finished: one helper for all of it.

- ``replacing(dest)``: a unique temporary name next to ``dest`` (two runs never share one),
  ``os.replace`` on success, removed on any failure; a full file system is reported as such.
- ``publish(src, dest)``: move a finished file into place; across file systems it copies only
  the data extents (sparse.py), so a sparse image stays sparse.
Scratch directories are workspace.py's. Model: pip's adjacent temp file + rename.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import no_space
from .sparse import allocated_bytes, sparse_copy
from .workspace import directory_lock, remove_if_abandoned


def _space(exc: OSError, path: Path, needed: int | None = None) -> BaseException:
    return no_space(path, needed) if exc.errno == errno.ENOSPC else exc


def _umask() -> int:
    """This process's umask, read without changing it (os.umask() sets it: not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def default_mode(dest: Path) -> int:
    """The mode a replaced file gets: what ``dest`` had, else what a new file gets (0644 under the
    usual umask). mkstemp's 0600 must never reach a published image, manifest or lock."""
    try:
        return stat.S_IMODE(os.stat(dest).st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _sweep_temps(dest: Path) -> None:
    """Remove temporary files of ``dest`` left by runs that died (kill -9 while publishing): a
    live run holds an flock on its own (below), so only the unlocked ones go."""
    for tmp in dest.parent.glob(f".{glob.escape(dest.name)}.*.tmp"):
        remove_if_abandoned(tmp, os.O_NOFOLLOW, lambda p: p.unlink(missing_ok=True))


def sweep_temps(dest: Path) -> None:
    """What runs that died while replacing ``dest`` left of it (nothing, if its directory is absent)."""
    if dest.parent.is_dir():
        with directory_lock(dest.parent):
            _sweep_temps(dest)


@contextlib.contextmanager
def replacing(dest: Path, mode: int | None = None, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; the caller writes it; it then replaces ``dest``
    with ``mode`` (default: ``dest``'s own, else 0666 less the umask)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with directory_lock(dest.parent):  # sweeping and creating exclude each other
        _sweep_temps(dest)
        fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held while we write it: another run's sweep leaves it
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, default_mode(dest) if mode is None else mode)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dest)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _space(exc, dest) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def write_bytes(dest: Path, data: bytes, mode: int | None = None, fsync: bool = False) -> None:
    with replacing(dest, mode, fsync) as tmp:
        tmp.write_bytes(data)


def write_text(dest: Path, text: str, mode: int | None = None, fsync: bool = False) -> None:
    write_bytes(dest, text.encode("utf-8"), mode, fsync)


def publish(src: Path, dest: Path, mode: int | None = None) -> None:
    """Move a finished file into place; across file systems, a sparse copy then a rename."""
    if mode is not None:
        os.chmod(src, mode)
    sweep_temps(dest)  # what a publish killed across file systems left of dest
    try:
        os.replace(src, dest)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise _space(exc, dest) from exc
    needed = allocated_bytes(src)
    if mode is None:  # the mode a rename on one file system would have kept
        mode = stat.S_IMODE(os.stat(src).st_mode)
    try:
        with replacing(dest, mode) as tmp:
            sparse_copy(src, tmp)
    except OSError as exc:
        raise _space(exc, dest, needed) from exc
    except BaseException as exc:  # ours, from replacing(): add what the copy needs
        from .errors import NoSpace

        if isinstance(exc, NoSpace):
            raise no_space(dest, needed) from None
        raise
    src.unlink(missing_ok=True)
