"""Sparse files: their data extents (SEEK_DATA/SEEK_HOLE), copying only those, in the kernel.

An ext4 image is mostly holes: copies (publishing across file systems, out of RAM, a boot's
scratch copy) move only its data, so it stays sparse, and what it takes on disk is its data.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path


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
