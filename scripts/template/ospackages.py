"""The OS packages an image's own package database says are installed, for the manifest and SBOM.

dpkg's ``/var/lib/dpkg/status`` (deb822 paragraphs; installed = ``Status: install ok installed``)
with each package's file list from ``/var/lib/dpkg/info/NAME[:ARCH].list``, or apk's
``/lib/apk/db/installed``. What the database says is what is reported: a layer that deleted
a package's files without telling dpkg leaves them listed (and verify then finds them missing).
"""

from __future__ import annotations

from typing import Any

from ..rootfs.tree import Tree


def _resolved(tree: Tree, path: str) -> str | None:
    try:
        return tree.resolve_parent(path, "the package database")
    except Exception:
        return None


def _files(tree: Tree, listed: list[str], linked: set[str]) -> dict[str, int]:
    """The listed paths that are regular files in the image, with their sizes (through a merged
    /usr); files with hard links are left out (which of a group's paths the stream gives the
    bytes to is the stream's order, not the database's)."""
    out = {}
    for raw in listed:
        path = raw.strip().strip("/")
        if not path:
            continue
        where = _resolved(tree, path)
        node = tree.nodes.get(where) if where else None
        if where and node is not None and node.kind == "file" and where not in linked:
            out[where] = node.size
    return dict(sorted(out.items()))


def _linked(tree: Tree) -> set[str]:
    return {n.linkname for n in tree.nodes.values() if n.kind == "hardlink"}


def dpkg(tree: Tree) -> list[dict[str, Any]] | None:
    status = tree.read("var/lib/dpkg/status")
    if status is None:
        return None
    linked = _linked(tree)
    rows = []
    for para in status.decode("utf-8", "replace").split("\n\n"):
        fields: dict[str, str] = {}
        key = ""
        for line in para.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        name = fields.get("Package")
        if not name or fields.get("Status", "").split()[-1:] != ["installed"]:
            continue
        arch = fields.get("Architecture", "")
        lst = tree.read(f"var/lib/dpkg/info/{name}:{arch}.list") or tree.read(f"var/lib/dpkg/info/{name}.list") or b""
        source = fields.get("Source", "").split(" ")[0] or name
        rows.append(
            {
                "type": "deb",
                "name": name,
                "version": fields.get("Version", ""),
                "arch": arch,
                "origin": source,
                "license": "",  # dpkg does not record it (the package's copyright file says it, in prose)
                "url": fields.get("Homepage", ""),
                "supplier": fields.get("Maintainer", ""),
                "files": _files(tree, lst.decode("utf-8", "surrogateescape").splitlines(), linked),
            }
        )
    return sorted(rows, key=lambda r: r["name"])


def apk(tree: Tree) -> list[dict[str, Any]] | None:
    db = tree.read("lib/apk/db/installed")
    if db is None:
        return None
    linked = _linked(tree)
    rows = []
    for para in db.decode("utf-8", "replace").split("\n\n"):
        row: dict[str, Any] = {
            "type": "apk",
            "name": "",
            "version": "",
            "arch": "",
            "origin": "",
            "license": "",
            "url": "",
            "supplier": "",
            "files": {},
        }
        listed: list[str] = []
        directory = ""
        for line in para.splitlines():
            k, _, v = line.partition(":")
            field = {"P": "name", "V": "version", "A": "arch", "o": "origin", "L": "license", "U": "url"}.get(k)
            if field:
                row[field] = v
            elif k == "F":
                directory = v
            elif k == "R":
                listed.append(f"{directory}/{v}" if directory else v)
        if row["name"]:
            row["files"] = _files(tree, listed, linked)
            rows.append(row)
    return sorted(rows, key=lambda r: r["name"])


def installed(tree: Tree) -> tuple[str, list[dict[str, Any]]]:
    """("dpkg" | "apk" | "", rows)."""
    for kind, read in (("dpkg", dpkg), ("apk", apk)):
        rows = read(tree)
        if rows is not None:
            return kind, rows
    return "", []
