"""``images/<runtime>.manifest.json``: what an image is, what it was built from, and how.

verify.py reads it back (sha256, packaged files and their sizes, the runtime check).
"""

from __future__ import annotations

from typing import Any

from .. import TOOL_VERSION
from . import AGENT
from .plan import Image, Plan
from .stream import Stream


def package_rows(plan: Plan, stream: Stream) -> list[dict[str, Any]]:
    if plan.image is not None:  # a template: what its own package database says
        return [{**p, "files": stream.files.get(p["name"], {})} for p in stream.packages]
    repos = {r.name: r for r in plan.pins.alpine.repositories_of(plan.runtime)}
    rows = []
    for p in plan.closure:
        repo = repos[p.repo]
        row = {
            "name": p.name,
            "version": p.version,
            "arch": p.arch,
            "repo": p.repo,
            "repository": repo.location,
            "key": p.key,
            "checksum": p.checksum,
            "size": p.size,
            "license": p.license,
            "origin": p.origin,
            "url": p.url,
            "download": f"{repo.arch_url(plan.arch)}/{p.filename}" if repo.local is None else "",
            "supplier": repo.supplier,
            "files": stream.files.get(p.name, {}),
        }
        if p.tag:
            row["tag"] = p.tag
        rows.append(row)
    return rows


def manifest(plan: Plan, stream: Stream, rows: list[dict[str, Any]], images: list[Image]) -> dict[str, Any]:
    """``images``: as built, in the plan's order. The first one's figures stay at the top level,
    where manifests of one image had them."""
    rt = plan.rt
    first = images[0]
    written = first.written
    doc: dict[str, Any] = {
        "image": first.output.image.name,
        "format": first.format,
        "sha256": first.sha256,
        "size": written.size,
        "runtime": plan.runtime,
        "arch": plan.arch,
        "check": list(rt.check),
        "binary": rt.binary,
        **_source(plan, stream),
        "packages": rows,
        "guest": {"path": f"/{AGENT}", "sha256": plan.guest_sha},
        "pins_sha256": plan.pins.digest,
        "lock_sha256": plan.lock_sha256,
        "tar_sha256": stream.sha256,
        "source_date_epoch": plan.epoch,
        **written.manifest,
        "reproducible": "yes" if written.reproducible else "no",
        "images": [
            {
                "image": i.output.image.name,
                "format": i.format,
                "sha256": i.sha256,
                "size": i.written.size,
                "reproducible": i.written.reproducible,
                **i.written.manifest,
            }
            for i in images
        ],
        "install_scripts": stream.install_scripts,
        "busybox_links": stream.busybox_links,
        "os_release": stream.os_release,
        "tool_version": TOOL_VERSION,
    }
    return doc


def _source(plan: Plan, stream: Stream) -> dict[str, Any]:
    """What the image was made from: an OCI image (a template), or the Alpine world."""
    alpine, rt = plan.pins.alpine, plan.rt
    if plan.image is not None:
        database = stream.packages[0].get("database", "") if stream.packages else ""
        return {"template": {**plan.image.to_json(), "package_database": database or "none found"}}
    return {
        "alpine": {
            "branch": alpine.branch,
            "repositories": list(alpine.repositories),
            "world": [*alpine.base, *rt.world],
            "extra_repositories": [
                {
                    "name": r.name,
                    "location": r.location,
                    "tag": r.tag,
                    "local": r.local is not None,
                    "keys": {k.name: k.sha256 for k in r.keys},
                }
                for r in alpine.extra_repositories + rt.extra_repositories
            ],
        },
    }
