"""Splicing a new agent into a cached stream: an agent change without merging every package again.

The stream of the same packages and configuration with another agent is byte for byte what
assembling it gives (a test compares the two): its bytes up to the agent's entry, copied by the
kernel, the new entry, the rest, and the end of archive as tarfile writes it.
"""

from __future__ import annotations

from pathlib import Path

from .. import sparse
from ..errors import BuildError
from ..formats import Shape
from . import AGENT
from .stream import Stream
from .tarwalk import RECORD, Facts, blocks, identity


def agent_entry(agent: bytes, epoch: int) -> bytes:
    """The agent's entry exactly as Tree.write_tar writes it, by its own header writer
    (configure.vulcan(): a file of mode 0755, owned by root, no mtime of its own, so the epoch)."""
    import tarfile  # here: 8 ms of imports that only an agent change needs

    from .tree import pax_header

    header = pax_header(AGENT, 0o755, 0, 0, len(agent), epoch, tarfile.REGTYPE, "", None, {})
    return header + agent + b"\0" * (-len(agent) % 512)


def splice_agent(base: Stream, facts: Facts, agent: bytes, epoch: int, scratch: Path) -> Stream:
    """The stream of ``base``'s packages and configuration with another agent: its bytes up to
    the agent's entry, the new entry, the rest, and the end of archive as tarfile writes it.
    Byte for byte what assembling from the packages gives (a test compares the two), without
    decompressing and merging every package again when only the agent changed. ``facts``: the
    base's, from the verification that came first (which read and hashed all of it).

    The bytes before the entry are copied by the kernel (copy_file_range), not read, and their
    hash is the verification's own state at that offset; only what follows the entry (in path
    order, after usr/local/: usr/sbin, usr/share, var) is read and hashed again."""
    if AGENT not in facts.spans or facts.checkpoint != AGENT or facts.checkpoint_state is None:
        raise BuildError(f"{base.tar}: no {AGENT} entry to replace")
    start, stop, old_size = facts.spans[AGENT]
    entry = agent_entry(agent, epoch)
    out = scratch / "rootfs.tar"
    h = facts.checkpoint_state.copy()
    with open(base.tar, "rb") as src, open(out, "wb") as f:
        if identity(src.fileno()) != facts.identity:  # the hash below is of the file verified, not another
            raise BuildError(f"{base.tar} changed after it was verified", hint="run the build again")
        sparse.copy_range(src.fileno(), f.fileno(), 0, start)
        f.seek(start)
        h.update(entry)
        f.write(entry)
        src.seek(stop)
        left = facts.end - stop
        while left:
            chunk = src.read(min(left, 1 << 20))
            if not chunk:
                raise BuildError(f"{base.tar} is truncated")
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
        written = facts.end - (stop - start) + len(entry) + 1024
        trailer = b"\0" * (1024 + (-written % RECORD))
        h.update(trailer)
        f.write(trailer)
    shape = Shape(
        base.shape.file_blocks - blocks(old_size) + blocks(len(agent)),
        base.shape.dirs,
        base.shape.entries,
        base.shape.content_bytes - old_size + len(agent),
    )
    return Stream(
        out, h.hexdigest(), shape, base.files, base.install_scripts, base.busybox_links, base.os_release, base.packages
    )
