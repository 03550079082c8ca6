"""A blob from the registry to its file in one pass, as its bytes arrive.

Downloaded, checked, decompressed, written sparse and hashed in one stream, so a host has its
image about as soon as the last byte arrives (not after a second pass over a downloaded copy).

The bytes the registry sends are appended to a ``.part`` file beside the image's place, so an
interrupted pull resumes where it stopped (HTTP Range): the next pull reads the ``.part`` through
the same pipeline first, then asks the registry for the rest. A compressed blob (an ext4 image,
zstd) is decompressed into the staged file, each all-zero 4 KiB block left a hole (as sparse as
mke2fs wrote it), on a second thread; an uncompressed blob *is* its file, so its ``.part`` is
moved into the stage once checked. Nothing is placed unless the blob's digest and size are the
descriptor's.

What a compressed blob decompresses to is checked one of two ways. A runtime's image whose
layer names the sha256 of what it decompresses to (``oci.CONTENT``: publish measures it from the
very bytes it compresses), in a zstd frame that carries its content's size and a checksum of that
content (publish writes both): zstd checks the checksum and the size as it decodes, and pull's
as_built holds the layer's sha256 and the size to those its manifest.json names. The signed
digest of the compressed bytes is what vouches for them, and they decode one way: hashing the
539 MiB the three bench runtimes decompress to as well took ~0.4 s of a core, a third of the
pull's CPU. Any other blob, or a frame without both: the sha256 of what is written, taken as it
is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

from .. import log
from ..hashing import sha256_file
from . import oci
from .client import Refused, Registry

BLOCK = 4096  # the ext4 images' block size: holes at this grain are as sparse as mke2fs left them
# 256 KiB, not 1 MiB: a piece is still in the core's cache (1 MiB of L2 each here) when the
# writing thread copies it into the page cache and hashes it (the 3 bench runtimes at once,
# medians of 7 in turn: 1.16 s with 0.51 s in the kernel at 1 MiB, 0.88 s and 0.24 s at 256 KiB;
# 128 KiB took the same as 256)
PIECE = 256 << 10
_FRAME_HEADER_MAX = 18  # a zstd frame header's longest (RFC 8878, 3.1.1.1)
_ZERO_BLOCK = bytes(BLOCK)
_ZERO_PIECE = bytes(PIECE)
# Buffers between the decompressing thread and the writing one (each holds one, the rest wait
# filled or free); 4 leaves slack when a write stalls.
_BUFFERS = 4


class BlobError(Refused):
    """A blob arrived other than its descriptor says, or does not decompress: nothing is placed."""


class Source:
    """The blob's bytes as they come: first what ``part`` already holds, then the registry's
    answer, every byte hashed and counted (and the new ones appended to ``part``). ``read`` is
    what a decompressor pulls from."""

    def __init__(self, held: BinaryIO | None, arriving: Iterator[bytes], part: BinaryIO) -> None:
        self.held, self.arriving, self.part = held, arriving, part
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.received = 0
        self.left = memoryview(b"")

    def read(self, n: int = -1) -> bytes | memoryview:
        data = self.left if len(self.left) else memoryview(self._next())
        if 0 <= n < len(data):
            data, self.left = data[:n], data[n:]
        else:
            self.left = memoryview(b"")
        return data

    def _next(self) -> bytes:
        if self.held is not None:
            chunk = self.held.read(PIECE)
            if chunk:
                self.sha256.update(chunk)
                self.size += len(chunk)
                return chunk
            self.held = None
        chunk = next(self.arriving, b"")
        if chunk:
            self.sha256.update(chunk)
            self.size += len(chunk)
            self.received += len(chunk)
            self.part.write(chunk)
        return chunk

    def peek(self, n: int) -> bytes:
        """The next ``n`` bytes (fewer at the end), left to be read."""
        while len(self.left) < n and (more := self._next()):
            self.left = memoryview(bytes(self.left) + more)
        return bytes(self.left[:n])

    def drain(self) -> None:
        """Read what the decompressor left (nothing, for a blob that is one zstd stream) so the
        digest covers every byte sent."""
        while self.read(PIECE):
            pass


def fetch(
    reg: Registry, repo: str, desc: dict[str, Any], part: Path, dest: Path, compressed: bool, named: bool = False
) -> str | None:
    """The blob ``desc`` names into ``dest`` (decompressed when ``compressed``), resumed from
    ``part``; returns the sha256 (hex) of ``dest``, or None for a compressed blob whose layer names
    its content (``named``) and that zstd checked as it decoded it (the module's docstring).
    BlobError, and ``part`` removed, when the bytes are not the descriptor's."""
    digest, size = str(desc["digest"]), int(desc["size"])
    title = desc.get("annotations", {}).get(oci.TITLE, digest)
    have = part.stat().st_size if part.is_file() else 0
    if have > size:
        part.unlink()
        have = 0
    with _answer(reg, repo, digest, have, size) as (resp, have):
        if have:
            log.info(f"{title}: resuming at {have:,} of {size:,} bytes")
        else:
            # a new file, never one truncated to 0: ext4 (auto_da_alloc) starts writing back a file
            # truncated to 0 when it is closed, and its removal then waits for that and discards
            # its blocks (the go-like image's 63 MiB .part: 46 ms to remove instead of 4)
            part.unlink(missing_ok=True)
        with open(part, "r+b" if have else "wb") as f:
            f.seek(have)
            with open(part, "rb") as held:
                arriving = reg.chunks(resp, size - have, f"blob {digest} ({title})") if resp is not None else iter(())
                source = Source(held if have else None, arriving, f)
                undecodable = None
                try:
                    written = _decompress(source, dest, named) if compressed else None
                except BlobError as exc:  # judged after the digest: a changed blob is said as one
                    undecodable, written = exc, None
                try:
                    source.drain()
                finally:
                    reg.received += source.received
    if source.size != size or "sha256:" + source.sha256.hexdigest() != digest:
        part.unlink(missing_ok=True)
        dest.unlink(missing_ok=True)
        what = f"size {source.size}" if source.size != size else "another sha256"
        raise BlobError(f"blob {digest} ({title}) arrived with {what}: refused, nothing placed")
    if undecodable is not None:  # the publisher's very bytes: the next pull would fail the same way
        part.unlink()
        raise undecodable
    if not compressed:  # the blob is the file: checked, it moves into the stage as it is
        os.replace(part, dest)
        return digest.removeprefix("sha256:")
    part.unlink()
    return written


@contextlib.contextmanager
def _answer(reg: Registry, repo: str, digest: str, have: int, size: int) -> Iterator[tuple[Any, int]]:
    """The registry's answer for the rest of the blob (None when ``part`` already holds it all),
    and how many bytes of ``part`` to keep: 0 when the registry ignored the Range asked for."""
    if have >= size:
        yield None, have
        return
    with reg.blob(repo, digest, offset=have) as resp:
        yield resp, have if resp.status_code == 206 else 0


def _decompress(source: Source, dest: Path, named: bool) -> str | None:
    """zstd from ``source`` into ``dest``, sparse; the sha256 of what was written, or None when
    ``named`` and the frame carries its content's size and checksum (checked as it decodes).
    One thread decompresses into a buffer while another writes (and hashes) the one before it
    (zstandard, file writes and hashlib all let go of the GIL)."""
    import zstandard

    try:
        frame = zstandard.get_frame_parameters(source.peek(_FRAME_HEADER_MAX))
    except zstandard.ZstdError as exc:
        raise BlobError(f"{dest.name}: the blob does not decompress as zstd ({exc}): refused") from None
    declared = None if frame.content_size == zstandard.CONTENTSIZE_UNKNOWN else frame.content_size
    hashing = not (named and frame.has_checksum and declared is not None)

    free: queue.Queue[bytearray] = queue.Queue()
    full: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
    for _ in range(_BUFFERS):
        free.put(bytearray(PIECE))
    h = hashlib.sha256()
    failed: list[BaseException] = []

    def write_and_hash(out: BinaryIO) -> None:
        try:
            while (item := full.get()) is not None:
                buf, n = item
                if not failed:
                    write_sparse(out, buf, n)
                    if hashing:
                        h.update(memoryview(buf)[:n])
                free.put(buf)
        except BaseException as exc:  # said by the decompressing thread; keep freeing buffers
            failed.append(exc)
            free.put(buf)
            while (item := full.get()) is not None:
                free.put(item[0])

    size = 0
    with open(dest, "wb") as out:
        writer = threading.Thread(target=write_and_hash, args=(out,), name="pull-write", daemon=True)
        writer.start()
        try:
            reader = zstandard.ZstdDecompressor().stream_reader(
                cast(BinaryIO, source), read_size=PIECE, read_across_frames=True
            )
            while not failed:
                buf = free.get()
                n = _fill(reader, buf)
                if not n:
                    break
                full.put((buf, n))
                size += n
        except zstandard.ZstdError as exc:
            raise BlobError(f"{dest.name}: the blob does not decompress as zstd ({exc}): refused") from None
        finally:
            full.put(None)
            writer.join()
        if failed:
            raise failed[0]
        out.truncate(size)
    if hashing:
        return h.hexdigest()
    if size != declared:  # more frames after the first (each held to its own size): hashed from the file
        return sha256_file(dest)
    return None


def _fill(reader: Any, buf: bytearray) -> int:
    """Fill ``buf`` (less only at the end): a decompressor may return short reads."""
    view, n = memoryview(buf), 0
    while n < len(buf):
        k = reader.readinto(view[n:])
        if not k:
            break
        n += k
    return n


def write_sparse(out: BinaryIO, buf: bytearray, n: int) -> None:
    """``buf[:n]`` at ``out``'s position: runs of data blocks written, runs of all-zero blocks
    skipped (holes; the caller truncates the file to its size at the end). A block is compared
    in place (``startswith`` is a memcmp): no copy of it is made (the go-like image's 288 MiB:
    0.034 s with a copy of each block, 0.020 s without)."""
    if n == PIECE and buf == _ZERO_PIECE:
        out.seek(n, os.SEEK_CUR)
        return
    view = memoryview(buf)[:n]
    start = 0
    while start < n:
        zero = _zero_block(buf, start, n)
        end = start + BLOCK
        while end < n and _zero_block(buf, end, n) == zero:
            end += BLOCK
        end = min(end, n)
        if zero:
            out.seek(end - start, os.SEEK_CUR)
        else:
            out.write(view[start:end])
        start = end


def _zero_block(buf: bytearray, start: int, n: int) -> bool:
    end = min(start + BLOCK, n)
    return buf.startswith(_ZERO_BLOCK[: end - start], start, end)
