"""Writing files so that nothing half-written ever looks finished: one helper for all of it.

- ``replacing(dest)``: a unique temporary name next to ``dest`` (two runs never share one),
  ``os.replace`` on success, removed on any failure; a full file system is reported as such.
- ``publish(src, dest)``: move a finished file into place; across file systems it copies only
  the data extents (SEEK_DATA/SEEK_HOLE), so a sparse image stays sparse.
- ``scratch(parent, what)``: a working directory that a live run holds an flock on; the next
  run removes the ones whose run died (kill -9), and never a live run's.
- ``ram_scratch(root, what, needed)``: the same in a RAM file system (/dev/shm), only when it
  has room for ``needed`` bytes beside what this process's other builds reserved there.
Model: pip's adjacent temp file + rename; mkosi's workspace directories.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from .errors import no_space

SCRATCH_PREFIX = ".vulcan-"


def _space(exc: OSError, path: Path, needed: int | None = None) -> BaseException:
    return no_space(path, needed) if exc.errno == errno.ENOSPC else exc


@contextlib.contextmanager
def replacing(dest: Path, mode: int | None = None, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; the caller writes it; it then replaces ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
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


def write_bytes(dest: Path, data: bytes, mode: int | None = None, fsync: bool = False) -> None:
    with replacing(dest, mode, fsync) as tmp:
        tmp.write_bytes(data)


def write_text(dest: Path, text: str, mode: int | None = None, fsync: bool = False) -> None:
    write_bytes(dest, text.encode("utf-8"), mode, fsync)


def allocated_bytes(path: Path) -> int:
    """What a file really takes on disk (a sparse image: its data, not its size)."""
    return path.stat().st_blocks * 512


def extents(fd: int, size: int) -> Iterator[tuple[int, int, bool]]:
    """(start, end, is data) ranges covering a file, from SEEK_DATA/SEEK_HOLE (all data where
    the file system cannot tell)."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            yield pos, size, exc.errno != errno.ENXIO  # ENXIO: only a hole is left
            return
        if start > pos:
            yield pos, start, False
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end, True
        pos = end


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy the data extents of ``src`` into ``dst`` (same size; holes stay holes)."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        for start, end, data in extents(fin.fileno(), size):
            if data:
                copy_range(fin.fileno(), fout.fileno(), start, end - start)
        os.ftruncate(fout.fileno(), size)


def copy_range(fin: int, fout: int, offset: int, length: int) -> None:
    """Copy ``length`` bytes at ``offset`` of one file to the same offset of another, in the
    kernel where it can (copy_file_range: no read into Python, a reflink on XFS/btrfs)."""
    os.lseek(fout, offset, os.SEEK_SET)
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(fin, fout, length - done, offset + done, offset + done)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            n = 0
        if n == 0:  # not supported here: plain reads and writes
            os.lseek(fin, offset + done, os.SEEK_SET)
            os.lseek(fout, offset + done, os.SEEK_SET)
            while done < length:
                chunk = os.read(fin, min(1 << 20, length - done))
                if not chunk:
                    return
                os.write(fout, chunk)
                done += len(chunk)
            return
        done += n


def publish(src: Path, dest: Path, mode: int | None = None) -> None:
    """Move a finished file into place; across file systems, a sparse copy then a rename."""
    if mode is not None:
        os.chmod(src, mode)
    try:
        os.replace(src, dest)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise _space(exc, dest) from exc
    needed = allocated_bytes(src)
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


@contextlib.contextmanager
def _parent_lock(parent: Path) -> Iterator[None]:
    """Creating a scratch directory and sweeping stale ones exclude each other (an flock on
    the parent directory itself: no lock file is left behind)."""
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def remove_stale(parent: Path) -> list[Path]:
    """Remove scratch directories under ``parent`` whose run is gone (nobody holds their lock)."""
    removed: list[Path] = []
    try:
        candidates = [p for p in parent.iterdir() if p.name.startswith(SCRATCH_PREFIX) and p.is_dir()]
    except OSError:
        return removed
    for path in candidates:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a live run holds it
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def scratch(parent: Path, what: str) -> Iterator[Path]:
    """A scratch directory ``parent/.vulcan-<what>-XXXX``, removed at the end (or by the next run)."""
    parent.mkdir(parents=True, exist_ok=True)
    with _parent_lock(parent):
        stale = remove_stale(parent)
        path = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{what}-", dir=parent))
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)
    if stale:
        from . import log

        log.info(f"removed {len(stale)} scratch director{'y' if len(stale) == 1 else 'ies'} of runs that died: "
                 + ", ".join(p.name for p in stale))  # fmt: skip
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


RAM_MARGIN = 64 << 20  # left free in the RAM file system beside what builds reserve there
_ram_lock = threading.Lock()
_ram_reserved = 0  # bytes this process's builds (threads) have claimed in RAM


def private_dir(path: Path) -> bool:
    """``path`` is (now) a directory of ours that nobody else can write (/dev/shm is shared)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # VULCAN_RAM may name a new directory
        path.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


@contextlib.contextmanager
def ram_scratch(root: Path | None, what: str, needed: int) -> Iterator[Path | None]:
    """A scratch directory under ``root`` (a RAM file system) if it has room for ``needed``
    bytes, else None (the caller writes in its ordinary scratch). Removed at the end, or by the
    next run if this one dies, like any scratch directory."""
    global _ram_reserved
    parent = root / f"vulcan-images-{os.getuid()}" if root is not None else None
    with _ram_lock:
        try:
            if parent is None or not private_dir(parent):
                raise OSError("no private directory there")
            st = os.statvfs(parent)
            free = st.f_bavail * st.f_frsize
        except OSError:
            free = 0
        room = free - _ram_reserved >= needed + RAM_MARGIN
        if room:
            _ram_reserved += needed
    if not room or parent is None:
        yield None
        return
    try:
        with scratch(parent, what) as path:
            yield path
    finally:
        with _ram_lock:
            _ram_reserved -= needed
