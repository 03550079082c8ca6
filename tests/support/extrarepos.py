"""Extra Alpine repositories for the tests: a team's, a tagged edge one and a local directory,
each signed by its own key, served beside the real v3.19 repository (tests of
alpine.extra_repositories; the world the ``real`` fixture builds)."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.support.apkrepo import Entry, Pkg, key_fingerprint, public_pem
from tests.support.apkrepo import repository as repo_files

ARCH = "x86_64"
TEAM, EDGE, DEV = "acme-team-61a0c0de.rsa.pub", "acme-edge-61a0c0df.rsa.pub", "dev@example.com-61a0c0e0.rsa.pub"
TEAM_URL = "https://packages.acme.test/alpine/v3.19/acme"
EDGE_URL = "https://packages.acme.test/alpine/edge/acme"


def tree(*paths: str) -> list[Entry]:
    """Entries with every parent directory (real apk refuses a data tar without its dirents) and
    abuild's per-file checksums (real apk 2.14 counts a package without them as an error)."""
    out: dict[str, Entry] = {}
    for p in paths:
        parts = p.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            out.setdefault(d, Entry(d, kind="dir", mode=0o755))
        out[p] = Entry(p, f"#!/bin/sh\necho {parts[-1]}\n".encode(), 0o755, checksum=True)
    return list(out.values())


def team_packages() -> list[Pkg]:
    return [Pkg("team-tool", "1.0-r0", entries=tree("usr/bin/team-tool"), depends=["musl"], key=TEAM)]


def edge_packages() -> list[Pkg]:
    return [
        Pkg("newthing", "2.0-r0", entries=tree("usr/bin/newthing"), depends=["edgelib"], key=EDGE),
        Pkg("edgelib", "2.0-r0", entries=tree("usr/lib/edgelib/edge.sh"), key=EDGE),
        # a newer team-tool in the tagged repository: an untagged world entry must never take it
        Pkg("team-tool", "9.0-r0", entries=tree("usr/bin/team-tool"), key=EDGE),
    ]


def dev_packages(version: str = "0.1-r0") -> list[Pkg]:
    return [Pkg("devpkg", version, entries=tree("usr/share/devpkg/hello"), key=DEV)]


def key_entry(name: str, url: str | None = None, path: str | None = None) -> dict[str, str]:
    return {"sha256": key_fingerprint(name), **({"url": url} if url else {"path": path or ""})}


def extra_repositories(local: str = "local-repo") -> dict[str, object]:
    return {
        "acme": {"url": TEAM_URL, "supplier": "Acme", "keys": {TEAM: key_entry(TEAM, f"{TEAM_URL}/{TEAM}")}},
        "acme-edge": {"url": EDGE_URL, "tag": "edge", "keys": {EDGE: key_entry(EDGE, f"{EDGE_URL}/{EDGE}")}},
        "local": {"path": local, "keys": {DEV: key_entry(DEV, path=f"keys/{DEV}")}},
    }


def serve_extra(mirror: object, tmp: Path, dev: list[Pkg] | None = None) -> None:
    """The team's and the tagged repository on the mirror, the local one and its key in ``tmp``."""
    for url, key, pkgs in ((TEAM_URL, TEAM, team_packages()), (EDGE_URL, EDGE, edge_packages())):
        mirror.add(f"{url}/{key}", public_pem(key))  # type: ignore[attr-defined]
        for name, data in repo_files(pkgs, key=key).items():
            mirror.add(f"{url}/{ARCH}/{name}", data)  # type: ignore[attr-defined]
    write_local(tmp / "local-repo", dev or dev_packages())
    (tmp / "keys").mkdir(exist_ok=True)
    (tmp / "keys" / DEV).write_bytes(public_pem(DEV))


def write_local(repo: Path, pkgs: list[Pkg], key: str = DEV) -> None:
    d = repo / ARCH
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    for name, data in repo_files(pkgs, key=key).items():
        (d / name).write_bytes(data)


BRANCH = "v3.19"
BASE = ["alpine-baselayout", "alpine-keys", "alpine-release", "busybox", "busybox-binsh", "musl"]
WORLD = ["team-tool", "newthing@edge", "devpkg"]
