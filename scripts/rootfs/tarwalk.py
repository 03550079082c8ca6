"""Walking the normalised tar stream: its entries with their byte spans, and what they add up to.

``entries()`` yields each entry of a POSIX.1-2001 pax (or ustar) stream, as tree.write_tar
writes it, with the span of bytes it takes (PAX header included); ``read_facts()`` walks them
once over a mapping of the file, hashing every byte a window behind the walk, and recomputes
what sizes an image (file blocks, directories, entries, content bytes) and every regular
file's size. A caller that needs the hash state at an entry (the splice) names it: the walk
itself knows no path.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from ..formats import Shape
from ..hashing import WINDOW, hash_mapped

BLOCK = 4096
ZERO_BLOCK = b"\0" * 512
RECORD = 20 * 512  # tarfile.RECORDSIZE: tarfile pads a stream to whole records after two zero blocks


def _number(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def pax_records(data: bytes) -> dict[str, str]:
    """A pax extended header's records (``LENGTH KEY=VALUE\\n`` each); ValueError when one is
    malformed (of the stream, a corrupt cached tar; of a package, one tarfile reads instead)."""
    out = {}
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length <= 0 or data[pos + length - 1 : pos + length] != b"\n":
            raise ValueError(f"a malformed pax record at byte {pos}")
        key, eq, value = data[space + 1 : pos + length - 1].partition(b"=")
        if not eq:
            raise ValueError(f"a pax record without '=' at byte {pos}")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def blocks(size: int) -> int:
    """4 KiB blocks of file data (what sizes an ext4 image)."""
    return (size + BLOCK - 1) // BLOCK


class Entry(NamedTuple):
    name: str  # without a trailing "/"
    kind: bytes  # the ustar type flag: b"0" file, b"5" directory, b"1" hard link, b"2" symlink, ...
    start: int  # offset of its first header (its PAX header's, if it has one)
    end: int  # offset just after its data
    size: int  # its data's size
    linkname: str


def entries(m: Any, size: int) -> Iterator[Entry]:
    """The entries of the tar in ``m`` (a mapping, or bytes) of ``size`` bytes, in order, up to
    the end-of-archive blocks (the last entry's ``end`` is where they start)."""
    pax: dict[str, str] = {}
    start = pos = 0
    while pos + 512 <= size:
        header = m[pos : pos + 512]
        if header == ZERO_BLOCK:
            return
        kind = header[156:157]
        length = _number(header[124:136])
        padded = (length + 511) // 512 * 512
        if kind in (b"x", b"g"):
            if kind == b"x":
                pax = pax_records(m[pos + 512 : pos + 512 + length])
            pos += 512 + padded
            continue
        name = pax.get("path") or header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if prefix and "path" not in pax:
            name = f"{prefix}/{name}"
        if "size" in pax:  # the data size a pax header gives overrides the ustar field
            length = int(pax["size"])
            padded = (length + 511) // 512 * 512
        pos += 512 + padded
        link = pax.get("linkpath") or header[157:257].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        pax = {}
        yield Entry(name.rstrip("/"), kind, start, pos, length, link)
        start = pos


class Facts(NamedTuple):
    """What a tar holds, recomputed from the tar itself in one read."""

    sha256: str
    shape: Shape
    files: dict[str, int]  # path -> size of regular files (a hard link: its target's)
    spans: dict[str, tuple[int, int, int]]  # path -> (first header offset, end offset, data size)
    end: int  # where the end-of-archive blocks start
    checkpoint: str | None = None  # the entry whose preceding sha256 state is kept ...
    checkpoint_state: Any = None  # ... and that state
    identity: tuple[int, int, int, int] = (0, 0, 0, 0)  # device, inode, size, mtime of the file read


def identity(fd: int) -> tuple[int, int, int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def read_facts(tar: Path, checkpoint: str | None = None) -> Facts:
    """One walk over the tar, mapped, not read (a third faster than through a buffer), hashing a
    window behind the walk, only at entries' ends (never between a PAX header and its entry);
    what is hashed is released (RSS stays small). ``checkpoint``: keep the sha256 state just
    before that entry (a splice then hashes only what follows it)."""
    import mmap

    files: dict[str, int] = {}
    spans: dict[str, tuple[int, int, int]] = {}
    n_blocks = dirs = n_entries = content = 0
    end = hashed = 0
    h = hashlib.sha256()
    state = None
    with open(tar, "rb") as f:
        ident = identity(f.fileno())
        size = ident[2]
        if not size:
            return Facts(h.hexdigest(), Shape(0, 0, 0, 0), {}, {}, 0, checkpoint, None, ident)
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            for e in entries(m, size):
                if e.name == checkpoint:
                    hash_mapped(h, m, hashed, e.start)
                    state, hashed = h.copy(), e.start
                n_entries += 1
                spans[e.name] = (e.start, e.end, e.size)
                end = e.end
                if end - hashed > WINDOW:
                    hash_mapped(h, m, hashed, end)
                    hashed = end
                if e.kind == b"5":
                    dirs += 1
                elif e.kind in (b"0", b"\0"):
                    n_blocks += blocks(e.size)
                    content += e.size
                    files[e.name] = e.size
                elif e.kind == b"1" and e.linkname in files:  # a hard link: the bytes of the file it names
                    files[e.name] = files[e.linkname]
            hash_mapped(h, m, hashed, size)
    shape = Shape(n_blocks, dirs, n_entries, content)
    return Facts(h.hexdigest(), shape, files, spans, end, checkpoint, state, ident)
