"""The normalised tar stream of an image: assembled from verified packages, or taken from the cache.

Assembling: fetch and verify the locked packages, merge them (tree.py), do what install
scripts would (configure.py), write the sorted, normalised tar. The stream and what the
build learnt about it are cached (``rootfs/<inputs digest>.tar`` + ``.json``, and under the
digest of everything but the agent in ``rootfs/base/``), so a warm rebuild of a deleted image
is the writer plus checks, and an agent change splices the new agent into the base
(``splice_agent``; make.py writes that stream in RAM and does not store it).

Nothing in the cache is trusted as it is: ``verify()`` re-hashes the tar against the sidecar's
sha256 and recomputes from the tar itself everything that shapes an image (file blocks,
directories, entries, content bytes) and that every file the manifest lists by package is in
the tar with that size. A sidecar that disagrees is a corrupt cache entry: assembled again.
Storing the stream is an optimisation: a cache that cannot take it (full, read-only) costs a
warning, never the build.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .. import atomic, log, paths
from ..errors import BuildError, NoSpace, no_space
from ..fetch import WINDOW, hash_mapped
from ..formats import Shape
from . import AGENT
from .plan import Plan

if TYPE_CHECKING:
    from .tree import Tree

BLOCK = 4096


class _HashingWriter:
    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.h = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.h.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


@dataclass
class Stream:
    """The stream and what the build learnt assembling it."""

    tar: Path
    sha256: str
    shape: Shape
    files: dict[str, dict[str, int]]  # package -> {path: size}
    install_scripts: list[dict[str, str]]
    busybox_links: int
    os_release: str | None

    def sidecar(self) -> dict[str, Any]:
        side = {
            "sha256": self.sha256,
            "shape": self.shape.__dict__,
            "files": self.files,
            "install_scripts": self.install_scripts,
            "busybox_links": self.busybox_links,
            "os_release": self.os_release,
        }
        return {**side, "binding": _binding(side)}


class Corrupt(Exception):
    """A cached stream whose sidecar cannot be used (unreadable, or not bound to its tar)."""


def _binding(side: dict[str, Any]) -> str:
    """What binds a sidecar to its tar: the sha256 of all of it, the tar's sha256 included. What
    the tar itself shows (shape, file sizes) is recomputed from it; the rest (each package's
    files, the install scripts, busybox's links, os-release) is known only from the assembly,
    so an edit of any of it breaks the binding and the stream is assembled again."""
    body = {k: v for k, v in side.items() if k != "binding"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _cache_path(digest: str, kind: str = "") -> Path:
    """``rootfs/<digest>.tar``: a stream; ``rootfs/base/<digest>.tar``: the last stream of the
    same packages and configuration with any agent (what an agent change splices)."""
    return paths.cache_dir() / "rootfs" / kind / digest[:2] / f"{digest}.tar"


def cached(digest: str, kind: str = "") -> Stream | None:
    """The cached stream as its sidecar describes it (None: absent), not yet verified against
    its tar; ``Corrupt`` when the sidecar is unreadable or not bound to what it says."""
    tar = _cache_path(digest, kind)
    if not tar.is_file():
        return None
    try:
        side = json.loads(tar.with_suffix(".json").read_text())
        if side.get("binding") != _binding(side):
            raise Corrupt("its sidecar was changed after it was written (or by an older version)")
        return Stream(
            tar=tar,
            sha256=str(side["sha256"]),
            shape=Shape(**side["shape"]),
            files={str(k): {str(p): int(n) for p, n in v.items()} for k, v in side["files"].items()},
            install_scripts=list(side["install_scripts"]),
            busybox_links=int(side["busybox_links"]),
            os_release=side["os_release"],
        )
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise Corrupt(f"its sidecar is unreadable: {exc}") from None


def store(stream: Stream, names: list[tuple[str, str]]) -> None:
    """Keep the stream for the next build under each (digest, kind) name; skipped with one
    warning when the cache cannot take it."""
    for digest, kind in names:
        dest = _cache_path(digest, kind)
        try:
            paths.claim_cache()
            dest.parent.mkdir(parents=True, exist_ok=True)
            with atomic.replacing(dest) as tmp:
                tmp.unlink()
                try:
                    os.link(stream.tar, tmp)  # same file system: no copy
                except OSError:
                    shutil.copyfile(stream.tar, tmp)
            atomic.write_text(dest.with_suffix(".json"), json.dumps(stream.sidecar()))
        except OSError as exc:  # a tar without its sidecar is never used (cached() needs both)
            why = "the cache file system is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            log.warn(f"not keeping the tar stream in the cache ({why}: {dest.parent}); "
                     "the next rebuild assembles it again")  # fmt: skip
            return
        except NoSpace:  # atomic.replacing says ENOSPC this way
            log.warn(f"not keeping the tar stream in the cache (its file system is full: {dest.parent}); "
                     "the next rebuild assembles it again")  # fmt: skip
            return


def _number(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax(data: bytes) -> dict[str, str]:
    out = {}
    pos = 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _blocks(size: int) -> int:
    """4 KiB blocks of file data (what sizes an ext4 image)."""
    return (size + BLOCK - 1) // BLOCK


@dataclass(frozen=True)
class Facts:
    """What a tar holds, recomputed from the tar itself in one read."""

    sha256: str
    shape: Shape
    files: dict[str, int]  # path -> size of regular files (a hard link: its target's)
    spans: dict[str, tuple[int, int, int]]  # path -> (first header offset, end offset, data size)
    end: int  # where the end-of-archive blocks start
    # the sha256 state just before the agent's entry: a splice hashes only what follows it
    before_agent: Any = field(default=None, compare=False, repr=False)
    identity: tuple[int, int, int, int] = (0, 0, 0, 0)  # device, inode, size, mtime of the file read


def _identity(fd: int) -> tuple[int, int, int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def read_facts(tar: Path) -> Facts:
    """Walks the ustar/PAX headers (POSIX.1-2001 pax format, as tree.write_tar writes it),
    hashing every byte a window behind the walk. The file is mapped, not read: a third faster
    than reading it through a buffer; what is hashed is released (RSS stays small)."""
    import mmap

    files: dict[str, int] = {}
    spans: dict[str, tuple[int, int, int]] = {}
    blocks = dirs = entries = content = 0
    pax: dict[str, str] = {}
    start = pos = hashed = 0
    h = hashlib.sha256()
    before_agent = None
    with open(tar, "rb") as f:
        identity = _identity(f.fileno())
        size = identity[2]
        if not size:
            return Facts(h.hexdigest(), Shape(0, 0, 0, 0), {}, {}, 0, None, identity)
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
            while pos + 512 <= size:
                header = m[pos : pos + 512]
                if header == ZERO_BLOCK:
                    break
                kind = header[156:157]
                length = _number(header[124:136])
                padded = (length + 511) // 512 * 512
                if kind in (b"x", b"g"):
                    if kind == b"x":
                        pax = _pax(m[pos + 512 : pos + 512 + length])
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
                pax_link = pax.get("linkpath")
                pax = {}
                name = name.rstrip("/")
                if name == AGENT:  # a splice hashes only what follows the agent's entry
                    hash_mapped(h, m, hashed, start)
                    before_agent, hashed = h.copy(), start
                entries += 1
                spans[name] = (start, pos, length)
                start = pos
                if start - hashed > WINDOW:  # only at an entry's end: never between a PAX header and its entry
                    hash_mapped(h, m, hashed, start)
                    hashed = start
                if kind == b"5":
                    dirs += 1
                elif kind in (b"0", b"\0"):
                    blocks += _blocks(length)
                    content += length
                    files[name] = length
                elif kind == b"1":  # a hard link: the same bytes as the file it names (written before it)
                    target = pax_link or header[157:257].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                    if target in files:
                        files[name] = files[target]
            hash_mapped(h, m, hashed, size)
    return Facts(h.hexdigest(), Shape(blocks, dirs, entries, content), files, spans, start, before_agent, identity)


ZERO_BLOCK = b"\0" * 512
RECORD = 20 * 512  # tarfile.RECORDSIZE: tarfile pads a stream to whole records after two zero blocks


def agent_entry(agent: bytes, epoch: int) -> bytes:
    """The agent's entry exactly as Tree.write_tar writes it (configure.vulcan(): a file of
    mode 0755, owned by root, no mtime of its own, so the epoch)."""
    import tarfile

    info = tarfile.TarInfo(AGENT)
    info.mode, info.uid, info.gid, info.uname, info.gname = 0o755, 0, 0, "", ""
    info.mtime, info.size = epoch, len(agent)
    header = info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "surrogateescape")
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
    if AGENT not in facts.spans or facts.before_agent is None:
        raise BuildError(f"{base.tar}: no {AGENT} entry to replace")
    start, stop, old_size = facts.spans[AGENT]
    entry = agent_entry(agent, epoch)
    out = scratch / "rootfs.tar"
    h = facts.before_agent.copy()
    with open(base.tar, "rb") as src, open(out, "wb") as f:
        if _identity(src.fileno()) != facts.identity:  # the hash below is of the file verified, not another
            raise BuildError(f"{base.tar} changed after it was verified", hint="run the build again")
        atomic.copy_range(src.fileno(), f.fileno(), 0, start)
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
        base.shape.file_blocks - _blocks(old_size) + _blocks(len(agent)),
        base.shape.dirs,
        base.shape.entries,
        base.shape.content_bytes - old_size + len(agent),
    )
    return Stream(out, h.hexdigest(), shape, base.files, base.install_scripts, base.busybox_links, base.os_release)


def disagreement(stream: Stream, facts: Facts) -> str | None:
    """None if the tar is what its sidecar says, else what is wrong (a corrupt cache entry)."""
    if facts.sha256 != stream.sha256:
        return f"sha256 {facts.sha256} != {stream.sha256}"
    if facts.shape != stream.shape:
        return f"the sidecar's shape {stream.shape} is not the tar's {facts.shape}"
    for pkg, listed in stream.files.items():
        for path, size in listed.items():
            if facts.files.get(path) != size:
                return f"the sidecar lists {path} ({pkg}, {size} bytes), the tar has {facts.files.get(path)}"
    return None


def verify(stream: Stream) -> tuple[str | None, Facts | None]:
    """What is wrong with a cached stream (None: nothing), and the facts read to find out."""
    try:
        facts = read_facts(stream.tar)
    except (OSError, ValueError) as exc:
        return f"unreadable ({exc})", None
    return disagreement(stream, facts), facts


def os_release_problem(tree: Tree, installed: set[str]) -> str | None:
    """What is wrong with the image's /etc/os-release (os-release(5): KEY=value lines with an
    ID), said as what to do; None when it is a good one."""
    node = tree.nodes.get("etc/os-release")
    if node is None:
        if "alpine-release" in installed:
            return "alpine-release is in the image but ships no /etc/os-release: is it a real Alpine alpine-release?"
        return "no /etc/os-release in the image: add alpine-release to alpine.base"
    path = "etc/os-release"
    for _ in range(8):  # Alpine >= 3.17: etc/os-release -> ../usr/lib/os-release
        if node.kind != "symlink":
            break
        target = os.path.normpath(os.path.join(os.path.dirname(path), node.linkname)).lstrip("/")
        nxt = tree.nodes.get(target)
        if nxt is None:
            return f"/etc/os-release (from {node.owner}) links to {node.linkname}, which is not in the image"
        path, node = target, nxt
    data = tree.read(path)
    if data is None:
        return f"/{path} (from {node.owner}) is a {node.kind}, not a file"
    lines = data.decode("utf-8", "replace").splitlines()
    if not any(line.startswith("ID=") for line in lines):
        return f"/{path} (from {node.owner}) has no ID= line: it is not an os-release file (os-release(5))"
    return None


def assemble(plan: Plan, verified: list[Any], scratch: Path) -> Stream:
    """Merge the verified packages, do what install scripts would, write the tar."""
    from ..apk import keys  # the merge's modules: a warm rebuild or a splice needs none of them
    from ..apk.package import control_files
    from . import configure
    from .tree import Tree

    alpine = plan.pins.alpine
    rt = plan.rt
    tree = Tree(scratch)
    try:
        scripts: dict[str, list[str]] = {}
        installed = []
        for locked, v in zip(plan.closure, verified, strict=True):
            replaces = {r.split("=")[0].split("<")[0].split(">")[0] for r in v.pkginfo.get("replaces", [])}
            with log.phase("decompress+merge packages"):
                tree.add_package(locked.name, v.path, v.data_offset, replaces)
            names = [n for n in control_files(v.control) if n.startswith(".") and n != ".PKGINFO"]
            if names:
                scripts[locked.name] = names
            installed.append(configure.InstalledPackage(v.checksum, v.pkginfo, locked.repo, locked.size, locked.arch))
        with log.phase("configure (scripts, accounts, agent, apk db)"):
            report = configure.review_scripts(scripts)
            links = configure.busybox_links(tree)
            configure.accounts(tree, "bin/busybox" in tree.nodes)
            configure.vulcan(tree, rt.check, plan.runtime, plan.guest.read_bytes())
            world = [*alpine.base, *rt.world]
            repos = [f"{alpine.mirror.rstrip('/')}/{alpine.branch}/{r}" for r in alpine.repositories]
            configure.apk_database(tree, installed, world, repos, keys.key_pems(alpine), plan.arch)
            _require(
                tree, "sbin/init", "no /sbin/init in the image (busybox's applet link): is busybox in alpine.base?"
            )
            _require(tree, rt.binary.lstrip("/"), f"the runtime binary {rt.binary} is not in the image")
        os_release = tree.nodes.get("etc/os-release")
        problem = os_release_problem(tree, {p.pkginfo["pkgname"][0] for p in installed})
        if problem is not None:
            log.warn(problem)
        tar_path = scratch / "rootfs.tar"
        try:
            with log.phase("write tar (+ sha256)"), open(tar_path, "wb") as f:
                w = _HashingWriter(f)
                tree.write_tar(w, plan.epoch)  # type: ignore[arg-type]
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise no_space(tar_path, tree.content_size(), "writing the tar stream") from None
            raise
        per_package: dict[str, dict[str, int]] = {}
        files = [n for n in tree.nodes.values() if n.kind == "file"]
        for n in files:
            if n.owner != "vulcan":
                per_package.setdefault(n.owner, {})[n.path] = n.size
        stream = Stream(
            tar=tar_path,
            sha256=w.h.hexdigest(),
            shape=Shape(
                file_blocks=sum(_blocks(n.size) for n in files),
                dirs=sum(1 for n in tree.nodes.values() if n.kind == "dir"),
                entries=len(tree.nodes),
                content_bytes=tree.content_size(),
            ),
            files={k: dict(sorted(v.items())) for k, v in per_package.items()},
            install_scripts=[r.__dict__ for r in report],
            busybox_links=links,
            os_release=os_release.owner if os_release else None,
        )
    finally:
        tree.close()
    for r in report:
        if r.action == "not supported":
            log.warn(f"{r.package} {r.script}: not supported; its effect is not in the image (see the manifest)")
    return stream


def _require(tree: Tree, path: str, message: str) -> None:
    if path not in tree.nodes:
        raise BuildError(message)
