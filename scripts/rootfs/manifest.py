"""``images/<runtime>.manifest.json``: what an image is, what it was built from, and how.

verify.py reads it back (sha256, packaged files and their sizes, the runtime check).
"""

from __future__ import annotations

from typing import Any

from .. import TOOL_VERSION
from ..formats import Written
from . import AGENT
from .plan import Plan
from .stream import Stream


def package_rows(plan: Plan, stream: Stream) -> list[dict[str, Any]]:
    alpine = plan.pins.alpine
    return [
        {
            "name": p.name,
            "version": p.version,
            "arch": p.arch,
            "repo": p.repo,
            "checksum": p.checksum,
            "size": p.size,
            "license": p.license,
            "origin": p.origin,
            "url": p.url,
            "download": f"{alpine.repo_url(p.repo, plan.arch)}/{p.filename}",
            "files": stream.files.get(p.name, {}),
        }
        for p in plan.closure
    ]


def manifest(
    plan: Plan, stream: Stream, rows: list[dict[str, Any]], images: dict[str, tuple[Written, str]]
) -> dict[str, Any]:
    """``images``: format -> (what the writer wrote, the image's sha256). The first format's
    figures stay at the top level, where ext4-only manifests had them."""
    alpine = plan.pins.alpine
    rt = plan.rt
    first = plan.outputs[0]
    written, sha = images[first.format]
    doc: dict[str, Any] = {
        "image": first.image.name,
        "format": first.format,
        "sha256": sha,
        "size": written.size,
        "runtime": plan.runtime,
        "arch": plan.arch,
        "check": list(rt.check),
        "binary": rt.binary,
        "alpine": {
            "branch": alpine.branch,
            "repositories": list(alpine.repositories),
            "world": [*alpine.base, *rt.world],
        },
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
                "image": o.image.name,
                "format": o.format,
                "sha256": images[o.format][1],
                "size": images[o.format][0].size,
                "reproducible": images[o.format][0].reproducible,
                **images[o.format][0].manifest,
            }
            for o in plan.outputs
        ],
        "install_scripts": stream.install_scripts,
        "busybox_links": stream.busybox_links,
        "os_release": stream.os_release,
        "tool_version": TOOL_VERSION,
    }
    return doc
