"""Scratch directories on disk and in RAM: held by a live run, swept when their run died.

- ``scratch(parent, what)``: a working directory that a live run holds an flock on; the next
  run removes the ones whose run died (kill -9), and never a live run's.
- ``ram_scratch(root, what, needed)``: the same in a RAM file system (/dev/shm), only when it
  has room for ``needed`` bytes beside what this process's other builds reserved there.
- ``directory_lock(dir)``: an flock on a directory itself, which creating and sweeping share.
Model: mkosi's workspace directories.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

SCRATCH_PREFIX = ".vulcan-"


@contextlib.contextmanager
def directory_lock(parent: Path, waiter: str | None = None) -> Iterator[None]:
    """An flock on the directory itself (no lock file is left behind), held for the block:
    creating scratch or temporary files there and sweeping stale ones exclude each other, and
    the lock file's read-modify-write holds it on its directory. Re-entrant within a thread
    (two flocks of one directory from one process would wait for each other). ``waiter`` (e.g.
    "a pull"): when another process holds it, say who before waiting."""
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    held: set[tuple[int, int]] = _held.__dict__.setdefault("dirs", set())
    if key in held:
        os.close(fd)
        yield
        return
    try:
        if waiter is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                from . import log

                log.info(
                    f"{waiter} waits for {holder(st.st_dev, st.st_ino) or 'another process'}, which holds {parent}"
                )
                fcntl.flock(fd, fcntl.LOCK_EX)
        held.add(key)
        try:
            yield
        finally:
            held.discard(key)
    finally:
        os.close(fd)


_held = threading.local()


def holder(device: int, inode: int) -> str | None:
    """Which process holds an flock on this file (from /proc/locks), as "process PID (command)"."""
    where = f"{os.major(device):02x}:{os.minor(device):02x}:{inode}"
    try:
        with open("/proc/locks") as f:
            rows = [line.split() for line in f]
    except OSError:
        return None
    for row in rows:
        if len(row) >= 6 and row[1] == "FLOCK" and row[5] == where and row[4].isdigit():
            pid = row[4]
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    command = " ".join(f.read(4096).replace(b"\0", b" ").decode(errors="replace").split())
            except OSError:
                command = ""
            return f"process {pid}" + (f" ({command[:120]})" if command else "")
    return None


def remove_stale(parent: Path) -> list[Path]:
    """Remove scratch directories under ``parent`` whose run is gone (nobody holds their lock)."""
    removed: list[Path] = []
    try:
        candidates = [p for p in parent.iterdir() if p.name.startswith(SCRATCH_PREFIX) and p.is_dir()]
    except OSError:
        return removed
    for path in candidates:
        if remove_if_abandoned(path, os.O_DIRECTORY, lambda p: shutil.rmtree(p, ignore_errors=True)):
            removed.append(path)
    return removed


def remove_if_abandoned(path: Path, flags: int, remove: Callable[[Path], None]) -> bool:
    """Remove ``path`` (a scratch directory, a temporary file) unless a live run holds its flock;
    taking the flock first means no run can be holding it while it goes."""
    try:
        fd = os.open(path, os.O_RDONLY | flags)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False  # a live run's
    try:
        remove(path)
        return True
    finally:
        os.close(fd)


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
