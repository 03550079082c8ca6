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
import glob
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
        try:
            fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # a live run's
        finally:
            os.close(fd)


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
    with directory_lock(dest.parent):  # what a publish killed across file systems left of dest
        _sweep_temps(dest)
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


@contextlib.contextmanager
def directory_lock(parent: Path) -> Iterator[None]:
    """An flock on the directory itself (no lock file is left behind), held for the block:
    creating scratch or temporary files there and sweeping stale ones exclude each other, and
    the lock file's read-modify-write holds it on its directory. Re-entrant within a thread
    (two flocks of one directory from one process would wait for each other)."""
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    held: set[tuple[int, int]] = _held.__dict__.setdefault("dirs", set())
    if key in held:
        os.close(fd)
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
    finally:
        os.close(fd)


_held = threading.local()


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
    with directory_lock(parent):
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
