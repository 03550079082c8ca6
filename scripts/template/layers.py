"""An OCI image's layers, applied in order into one tree as a container runtime would (no root).

Each layer is decompressed once into a scratch tar (streamed: memory stays a few MiB whatever the
layer's size); the tree keeps only metadata and where each file's bytes are, as it does for
packages (../rootfs/tree.py), and writes the same normalised stream. The OCI image spec's
changeset rules (image-spec layer.md): a later layer's entry replaces what a lower one had at
that path (a directory's metadata too; a non-directory replaces a whole directory), ``.wh.NAME``
deletes NAME from the layers below, ``.wh..wh..opq`` in a directory deletes everything the
layers below had in it. Hard links may name files of any layer below. Refused, naming the
layer's digest: paths that leave the root (``..``, absolute names), paths through a symlink
that leads out of it or through an absolute symlink, whiteouts of ``.``/``..`` or of nothing.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path
from typing import Any

from ..rootfs import pkgtar
from ..rootfs.inflate import Data
from ..rootfs.tree import Node, Tree, _Pkg
from .source import Layer, TemplateError

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
BUFFER = 1 << 20


class LayerTree(Tree):
    UNIT = "layer"
    ABSOLUTE_LINKS = False
    links = 0  # hard links put so far (an upper bound of those in the tree)

    def add_layer(self, layer: Layer, blob: Path, scratch: Path) -> int:
        """Apply one layer (its cached blob, decompressed into ``scratch``); returns its entries."""
        tar = scratch / f"layer-{len(self.packages)}.tar"
        _decompress(layer, blob, tar)
        index = len(self.packages)
        self.packages.append(_Pkg(layer.digest, frozenset(), Data(None, tar)))
        members = _members(layer, tar)
        # whiteouts apply to the layers below only: first every deletion, then the layer's entries
        entries = []
        for m in members:
            parent, _, base = m.name.rstrip("/").rpartition("/")
            if base == OPAQUE:
                self._opaque(self._whiteout_dir(parent, layer.digest))
            elif base.startswith(WHITEOUT):
                target = base[len(WHITEOUT) :]
                if target in ("", ".", "..") or "/" in target:
                    raise self._refuse(layer.digest, f"whiteout {m.name!r} names {target!r}")
                self._delete(self._whiteout_dir(parent, layer.digest), target)
            else:
                entries.append(m)
        for m in entries:
            self._add_member(m, index, layer.digest)
        return len(members)

    def _whiteout_dir(self, parent: str, digest: str) -> str:
        clean = self.clean_name(parent, digest) if parent else ""
        return self.resolve_parent(clean + "/x", digest)[:-2] if clean else ""

    def _opaque(self, directory: str) -> None:
        prefix = directory + "/" if directory else ""
        gone = [p for p in self.nodes if p.startswith(prefix) and p != directory]
        self._remove(gone)

    def _delete(self, directory: str, name: str) -> None:
        path = f"{directory}/{name}" if directory else name
        if path not in self.nodes:
            return  # a whiteout of what no layer below has: as runtimes do, nothing to delete
        self._remove([p for p in self.nodes if p == path or p.startswith(path + "/")])

    def _remove(self, gone: list[str]) -> None:
        if not gone:
            return
        doomed = set(gone)
        self._keep_links(doomed)
        for p in gone:
            del self.nodes[p]

    def _keep_links(self, doomed: set[str]) -> None:
        """A file about to go (deleted, or replaced) keeps its bytes in the hard links to it that
        stay: the first of them, in path order, becomes the file, the others link to it."""
        if not self.links:
            return  # most images have few hard links: no walk over the tree for each replaced file
        groups: dict[str, list[str]] = {}
        for p, n in self.nodes.items():
            if n.kind == "hardlink" and n.linkname in doomed and p not in doomed:
                groups.setdefault(n.linkname, []).append(p)
        for target, links in groups.items():
            old = self.nodes[target]
            heir, *rest = sorted(links)
            h = self.nodes[heir]
            self.nodes[heir] = Node(
                heir,
                "file",
                old.mode,
                old.uid,
                old.gid,
                h.mtime or old.mtime,
                old.size,
                xattrs=dict(old.xattrs),
                owner=h.owner,
                pkg=h.pkg,
                source=old.source,
            )
            for p in rest:
                self.nodes[p].linkname = heir
            self.links -= 1

    def _put(self, node: Node) -> None:
        """A later layer's entry wins: a directory over a directory takes its metadata, anything
        else replaces what was there (a directory with everything in it)."""
        node.pkg = node.owner
        old = self.nodes.get(node.path)
        if old is not None and not (old.kind == "dir" and node.kind == "dir"):
            if old.kind == "dir":
                self._remove([p for p in self.nodes if p.startswith(node.path + "/")])
            if node.kind == "hardlink" and node.linkname == node.path:
                return  # a link to itself: what is there stays
            self._keep_links({node.path})
        if node.kind == "hardlink":
            self.links += 1
        self.nodes[node.path] = node

    def _record(self, pkg: str, node: Node) -> None:
        """Layers have no package database to write."""


def _members(layer: Layer, tar: Path) -> list[Any]:
    """The layer's entries (metadata only: the bytes stay in the file), read as pkgtar reads a
    package, or by tarfile what pkgtar leaves to it (GNU long names, base-256 numbers)."""
    import tarfile

    try:
        try:
            return pkgtar.members(tar)
        except pkgtar.Unusual:
            with tarfile.open(tar, "r:") as t:
                return t.getmembers()
    except (tarfile.TarError, ValueError) as exc:
        raise TemplateError(f"layer {layer.digest}: not a tar archive ({exc})", hint="refusing the layer") from None


def _decompress(layer: Layer, blob: Path, dest: Path) -> None:
    """The layer's tar, decompressed as it streams (bounded memory)."""
    try:
        with open(blob, "rb") as src, open(dest, "wb") as out:
            if layer.compression == "gzip":
                with gzip.GzipFile(fileobj=src) as z:
                    shutil.copyfileobj(z, out, BUFFER)
            elif layer.compression == "zstd":
                import zstandard  # here: 10 ms of imports that only a zstd layer needs

                with zstandard.ZstdDecompressor().stream_reader(src, read_across_frames=True) as z:
                    shutil.copyfileobj(z, out, BUFFER)
            else:
                shutil.copyfileobj(src, out, BUFFER)
    except (OSError, EOFError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:
            raise
        raise TemplateError(
            f"layer {layer.digest}: its {layer.compression or 'tar'} data is damaged or of another "
            f"kind than {layer.media_type} says ({exc})",
            hint="refusing the layer",
        ) from None
    except Exception as exc:  # zstandard.ZstdError
        if type(exc).__name__ != "ZstdError":
            raise
        raise TemplateError(
            f"layer {layer.digest}: its zstd data is damaged or not zstd ({exc})", hint="refusing the layer"
        ) from None
