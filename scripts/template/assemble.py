"""A template's normalised tar stream, from its image's layers.

The layers are fetched (in parallel, verified, cached: source.py), applied in order (layers.py),
Vulcan's part is added (configure.py), and the stream is written as the Alpine path writes it.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .. import log, settings
from ..rootfs.plan import Plan
from ..rootfs.stream import Stream, os_release_problem, write_tar
from . import configure, ospackages, source
from .layers import LayerTree

PARALLEL = 4  # layer downloads at once (a registry serves each blob on its own connection)


def fetched(image: source.LockedImage) -> tuple[dict[str, Any], list[Path]]:
    """The image's config and its layers' cache entries: from the cache, else VULCAN_MIRROR when it
    is set (at the registry URLs, as ``nox -s mirror`` writes them), else the registry (connected
    only when something is missing). Every byte is checked against its digest whatever served it;
    the manifest must list the layers the lock does."""
    src = source.Source(image.reference)
    urls = source.upstream_urls(image)  # every digest the image needs: manifest, config, layers
    have: set[str] = set()  # each checked once here (a layer may be hundreds of MiB to hash)
    if settings.mirror():  # by digest through VULCAN_MIRROR first (nox -s mirror wrote them there)
        from ..errors import DownloadError
        from ..fetch import cached

        for digest, url in urls.items():
            try:
                cached(url, digest.removeprefix("sha256:"))  # the cache entry if good, else the mirror's
                have.add(digest)
            except DownloadError as exc:
                if exc.status != 404:
                    raise
                log.info(f"{digest} is not in VULCAN_MIRROR: asking the registry")
    else:
        have = {digest for digest in urls if source._cached(digest) is not None}
    missing = [x for x in image.layers if x.digest not in have]
    need = missing or image.config not in have or image.manifest not in have
    if not need:
        _check_manifest(image, json.loads(source.cache_path(image.manifest).read_bytes()))
        return source.config_of(image), [source.cache_path(x.digest) for x in image.layers]
    ref = src.parsed
    with src.registry() as (reg, repo):
        doc = source.document(src, reg, repo, image.manifest, "the manifest")[0]
        _check_manifest(image, doc)
        size = int((doc.get("config") or {}).get("size", 0))
        source.config_json(src, reg, repo, image.config, size)
        if missing:
            total = sum(x.size for x in missing)
            log.info(f"{ref.registry}/{ref.repository}: fetching {len(missing)} layers, {log.human(total)}")
            with ThreadPoolExecutor(PARALLEL) as pool:
                list(pool.map(lambda x: source.layer(src, reg, repo, x), sorted(missing, key=lambda x: -x.size)))
    return source.config_of(image), [source.cache_path(x.digest) for x in image.layers]


def _check_manifest(image: source.LockedImage, doc: dict[str, Any]) -> None:
    """The manifest (its bytes are its digest's) lists the config and layers the lock records."""
    listed = [(d.get("digest"), d.get("size")) for d in doc.get("layers") or [] if isinstance(d, dict)]
    config = doc["config"].get("digest") if isinstance(doc.get("config"), dict) else None
    if listed != [(x.digest, x.size) for x in image.layers] or config != image.config:
        raise source.TemplateError(
            f"{image.reference}: manifest {image.manifest} does not list the layers and config the lock records",
            hint=source.LOCK_HINT,
        )


def _applied(image: source.LockedImage, blobs: list[Path], scratch: Path) -> LayerTree:
    tree = LayerTree(scratch)
    try:
        with log.phase("apply layers"):
            for x, blob in zip(image.layers, blobs, strict=True):
                tree.add_layer(x, blob, scratch)
    except BaseException:
        tree.close()
        raise
    return tree


def flattened(image: source.LockedImage, scratch: Path, files: set[str]) -> dict[str, str]:
    """The sha256 of each of ``files`` as the image's layers give it (verify's reference: the
    layers by digest, applied again; nothing the build wrote is read)."""
    tree = _applied(image, fetched(image)[1], scratch)
    try:
        out = {}
        for path in files:
            node = tree.nodes.get(path)
            if node is not None and node.kind == "file":
                h = hashlib.sha256()
                for chunk in tree._chunks(node):
                    h.update(chunk)
                out[path] = h.hexdigest()
        return out
    finally:
        tree.close()


def assemble(plan: Plan, image: source.LockedImage, scratch: Path) -> Stream:
    rt = plan.rt
    with log.phase("fetch layers"):
        config, blobs = fetched(image)
    tree = _applied(image, blobs, scratch)
    try:
        with log.phase("configure (accounts, agent, init)"):
            kind, rows = ospackages.installed(tree)
            configure.vulcan(tree, rt.check, plan.runtime, plan.guest.read_bytes(), config, image.reference)
            binary = tree.nodes.get(tree.resolve_parent(rt.binary.lstrip("/"), "vulcan"))
            if binary is None:
                raise source.TemplateError(
                    f"{image.reference}: the runtime binary {rt.binary} is not in the image",
                    hint=f"fix alpine.runtimes.{plan.runtime}.binary",
                )
        os_release = tree.nodes.get("etc/os-release")
        problem = os_release_problem(tree, set(), alpine=False)
        if problem is not None:
            log.warn(problem)
        tar_path, sha256, shape = write_tar(tree, plan.epoch, scratch)
        return Stream(
            tar=tar_path,
            sha256=sha256,
            shape=shape,
            files={r["name"]: r["files"] for r in rows if r["files"]},
            install_scripts=[],
            busybox_links=0,
            os_release=os_release.owner if os_release else None,
            packages=[{k: v for k, v in r.items() if k != "files"} | {"database": kind} for r in rows],
        )
    finally:
        tree.close()
        for p in scratch.glob("layer-*.tar"):
            p.unlink(missing_ok=True)
