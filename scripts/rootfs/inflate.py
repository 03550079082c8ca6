"""Each package's data member decompressed on another thread, ahead of the merge.

ISA-L's inflate lets go of the GIL, so while the merge reads package N, the second core
decompresses the packages after it (``Ahead``: the merge's own thread checks them, and helps
decompress when it would otherwise wait). A data tar is kept in memory while this process's
budget allows (the merge and the stream's writer read it from there: no scratch file written
and read back); past it, and for a member that may not state its size truly, it is written to a
scratch file. The bytes are the same either way (DEFLATE decodes to one output).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ..apk.package import CHUNK
from ..background import Task

if TYPE_CHECKING:
    from ..apk.package import Verified

try:  # ISA-L's inflate (python-isal, hash-locked in requirements.txt): half zlib's time
    from isal import isal_zlib as inflater
except ImportError:  # pragma: no cover - a platform without its wheel: the standard library's
    import zlib as inflater  # type: ignore[no-redef]

# Data tars held in memory at once, by all of this process's builds together (`rootfs --all`
# runs its three in threads). It is what the peak RSS grows by: `rootfs --all` of the synthetic
# runtimes 112-130 -> 151-160 MiB (<= 200); a real 83-package world (37 MiB) nearly fits (at
# 16 MiB it was 10% slower; at 48, `--all` reached 172 MiB for no gain here).
MEMORY = 32 << 20

# ISA-L's AVX-512 inflate returns with the vector registers' upper halves in use (no vzeroupper),
# and after that OpenSSL's SHA-NI sha256 (legacy SSE instructions) runs ~30% slower, in this
# thread and in every thread it starts later: the packages' verification, the stream's and the
# image's hashes. glibc's vector memchr ends with vzeroupper; a search of 4 KiB of zeros runs it.
_CLEAN = bytes(4096)

# Below this many compressed bytes a gzip member holds less than 4 GiB (DEFLATE's ratio is at
# most 1032:1), so its ISIZE is its size, not the size mod 2**32.
_EXACT = (1 << 32) // 1032


class _Budget:
    def __init__(self, total: int) -> None:
        self.left = total
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        with self._lock:
            if n > self.left:
                return False
            self.left -= n
            return True

    def give(self, n: int) -> None:
        with self._lock:
            self.left += n


BUDGET = _Budget(MEMORY)


class Data:
    """One package's data tar: its bytes, or the scratch file they were written to."""

    __slots__ = ("buf", "held", "path")

    def __init__(self, buf: bytes | None, path: Path | None, held: int = 0) -> None:
        self.buf, self.path = buf, path
        self.held = held  # bytes of BUDGET that ``buf`` holds

    def release(self) -> None:
        BUDGET.give(self.held)
        self.buf, self.held = None, 0


def inflate(apk: Path, offset: int, spill: Path) -> Data:
    """The data member of ``apk`` (at ``offset``, to the end of the file) decompressed: in
    memory when the budget has room for the size its gzip trailer states, else into ``spill``."""
    with open(apk, "rb") as src:
        end = src.seek(0, 2)
        src.seek(max(end - 4, offset))
        size = int.from_bytes(src.read(4), "little")  # ISIZE: the size mod 2**32 (RFC 1952)
        if BUDGET.take(size):
            try:
                data = _in_memory(src, offset, size)
            except BaseException:
                BUDGET.give(size)
                raise
            if data is not None:
                return data
            BUDGET.give(size)  # 4 GiB or more (ISIZE wrapped): the file takes it
        src.seek(offset)
        with open(spill, "wb") as dst:
            d = inflater.decompressobj(31)
            while not d.eof and (chunk := src.read(CHUNK)):
                while chunk and not d.eof:  # a MiB in, at most 4 out at a time (RSS)
                    dst.write(d.decompress(chunk, 4 * CHUNK))
                    chunk = d.unconsumed_tail
            dst.write(d.flush())
        _CLEAN.find(b"\1")
    return Data(None, spill)


def _in_memory(src: BinaryIO, offset: int, size: int) -> Data | None:
    src.seek(offset)
    raw = src.read()
    if len(raw) < _EXACT:  # one call: one hand-back of the GIL (decompressobj's take three)
        out = inflater.decompress(raw, 31, size)  # checks ISIZE: the size is exact
        _CLEAN.find(b"\1")  # the vector state as it was (see _CLEAN)
        return Data(out, None, size)
    d = inflater.decompressobj(31)
    out = d.decompress(raw, size + 1)  # never more than it said it would be
    _CLEAN.find(b"\1")
    return Data(out, None, size) if d.eof and len(out) == size else None


class Ahead:
    """The verified packages, each with its data tar, in order. This thread takes each from
    ``verified`` (checking a cached file is mostly Python: it stays on the merge's thread), at
    least ``depth`` and, while the next data tar is not ready, up to ``most`` packages ahead of
    the merge; another thread decompresses them meanwhile (C code that lets go of the GIL:
    little else runs there, as every hand-back of the GIL waits for the merge's thread to let
    go of it; run it inside ``background.quick_handoff()``); with nothing left to check, this
    thread decompresses the last one waiting.
    ``close()`` (always: ``with``) stops that thread and waits for it."""

    def __init__(self, verified: Iterator[Verified], scratch: Path, depth: int = 4, most: int = 32) -> None:
        self._verified = verified
        self._scratch = scratch
        self._depth, self._most = depth, most
        self._sent = self._taken = 0
        self._done = False
        self._todo: collections.deque[tuple[int, Verified]] = collections.deque()
        self._made: dict[int, tuple[Verified, Data] | BaseException] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._task = Task(self._run)

    def _make(self, i: int, v: Verified) -> None:
        made: tuple[Verified, Data] | BaseException
        try:
            made = (v, inflate(v.path, v.data_offset, self._scratch / f"{i:04d}-{v.path.name}.tar"))
        except BaseException as exc:  # the merge raises it, as if it had met it itself
            made = exc
        with self._cond:
            self._made[i] = made
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._todo and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                i, v = self._todo.popleft()
            self._make(i, v)

    def _send(self, ahead: int) -> bool:
        """Check the next package and hand it over, if fewer than ``ahead`` are; whether it did."""
        if self._done or self._sent >= self._taken + ahead:
            return False
        v = next(self._verified, None)
        if v is None:
            self._done = True
            return False
        with self._cond:
            self._todo.append((self._sent, v))
            self._cond.notify_all()
        self._sent += 1
        return True

    def __enter__(self) -> Ahead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[tuple[Verified, Data]]:
        return self

    def __next__(self) -> tuple[Verified, Data]:
        while self._send(self._depth):
            pass
        i = self._taken
        if i == self._sent:
            raise StopIteration
        while True:
            with self._cond:
                item = self._made.pop(i, None)
            if item is not None:
                break
            if self._send(self._most):  # the wait spent checking the ones after it
                continue
            with self._cond:
                steal = self._todo.pop() if self._todo and self._todo[-1][0] != i else None
            if steal is not None:  # or decompressing the last one waiting
                self._make(*steal)
                continue
            with self._cond:
                while i not in self._made:
                    self._cond.wait()
        if isinstance(item, BaseException):
            self._made[i] = item
            raise item
        self._taken += 1
        return item

    def close(self) -> None:
        """Stop the other thread and wait for it; what it made and nobody took is given back."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._task.exception()
        for item in self._made.values():
            if isinstance(item, tuple):
                item[1].release()
        self._made.clear()
