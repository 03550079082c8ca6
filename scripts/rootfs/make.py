"""Build one image from a Plan (see build.py): packages -> tar stream -> ext4 -> manifest, SBOM."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid as uuidlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from .. import TOOL_VERSION, ext4, log, paths, sbom, stamps
from ..apk import repo
from ..apk.package import control_files
from ..errors import BuildError, VulcanError
from ..fetch import sha256_file
from ..pins import Pins
from . import configure
from .tree import Tree

if TYPE_CHECKING:
    from .build import Plan


class _HashingWriter:
    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.h = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.h.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def _derived_uuid(seed: str, purpose: str) -> str:
    """A UUID from the content: same tar stream -> same filesystem UUID and hash seed."""
    digest = hashlib.sha256(f"{purpose}:{seed}".encode()).digest()[:16]
    return str(uuidlib.UUID(bytes=digest, version=4))


def _scratch_parent(out_dir: Path) -> Path:
    env = os.environ.get("VULCAN_SCRATCH")
    return Path(env) if env else out_dir


@dataclass
class Stream:
    """The normalised tar stream of an image and what the build learnt assembling it.

    Kept in the cache (``rootfs/<inputs digest>.tar`` + ``.json``), so a warm rebuild of a
    deleted image is mke2fs plus checks; the tar is re-hashed before it is used."""

    tar: Path
    sha256: str
    file_blocks: int
    dirs: int
    entries: int
    content_bytes: int
    files: dict[str, dict[str, int]]  # package -> {path: size}
    install_scripts: list[dict[str, str]]
    busybox_links: int
    os_release: str | None

    def sidecar(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("tar")
        return d


def _stream_cache(digest: str) -> Path:
    return paths.cache_dir() / "rootfs" / digest[:2] / f"{digest}.tar"


def cached_stream(digest: str) -> Stream | None:
    """The cached stream and its sidecar (its sha256 is checked while mke2fs reads it)."""
    tar = _stream_cache(digest)
    try:
        return Stream(tar=tar, **json.loads(tar.with_suffix(".json").read_text())) if tar.is_file() else None
    except (OSError, ValueError, TypeError):
        return None


def store_stream(digest: str, stream: Stream) -> None:
    dest = _stream_cache(digest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        os.link(stream.tar, tmp)  # same file system: no copy
    except OSError:
        shutil.copyfile(stream.tar, tmp)
    os.replace(tmp, dest)
    side = dest.with_suffix(".json")
    side.with_name(f".{side.name}.tmp").write_text(json.dumps(stream.sidecar()))
    os.replace(side.with_name(f".{side.name}.tmp"), side)


def assemble(
    pins: Pins, runtime: str, arch: str, frozen: bool, guest: Path, epoch: int, scratch: Path
) -> tuple[Stream, list[repo.Locked]]:
    """Fetch and verify the packages, merge them, do what install scripts would, write the tar."""
    alpine = pins.alpine
    rt = alpine.runtimes[runtime]
    closure, verified = repo.packages_for(pins, runtime, arch, frozen)
    tree = Tree(scratch)
    try:
        scripts: dict[str, list[str]] = {}
        installed = []
        for locked, v in zip(closure, verified, strict=True):
            replaces = {r.split("=")[0].split("<")[0].split(">")[0] for r in v.pkginfo.get("replaces", [])}
            tree.add_package(locked.name, v.path, v.data_offset, replaces)
            names = [n for n in control_files(v.control) if n.startswith(".") and n != ".PKGINFO"]
            if names:
                scripts[locked.name] = names
            installed.append(configure.InstalledPackage(v.checksum, v.pkginfo, locked.repo))
        report = configure.review_scripts(scripts)
        links = configure.busybox_links(tree)
        configure.accounts(tree, "bin/busybox" in tree.nodes)
        configure.vulcan(tree, rt.check, runtime, guest.read_bytes())
        world = [*alpine.base, *rt.world]
        repos = [f"{alpine.mirror.rstrip('/')}/{alpine.branch}/{r}" for r in alpine.repositories]
        configure.apk_database(tree, installed, world, repos, repo.key_pems(alpine), arch)
        _require(tree, "sbin/init", "no /sbin/init in the image (busybox's applet link): is busybox in alpine.base?")
        _require(tree, rt.binary.lstrip("/"), f"the runtime binary {rt.binary} is not in the image")
        os_release = tree.nodes.get("etc/os-release")
        if os_release is None:
            log.warn("no /etc/os-release in the image: add alpine-release to alpine.base")
        tar_path = scratch / "rootfs.tar"
        with open(tar_path, "wb") as f:
            w = _HashingWriter(f)
            tree.write_tar(w, epoch)  # type: ignore[arg-type]
        per_package: dict[str, dict[str, int]] = {}
        files = [n for n in tree.nodes.values() if n.kind == "file"]
        for n in files:
            if n.owner != "vulcan":
                per_package.setdefault(n.owner, {})[n.path] = n.size
        stream = Stream(
            tar=tar_path,
            sha256=w.h.hexdigest(),
            file_blocks=sum((n.size + 4095) // 4096 for n in files),
            dirs=sum(1 for n in tree.nodes.values() if n.kind == "dir"),
            entries=len(tree.nodes),
            content_bytes=tree.content_size(),
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
    return stream, closure


def make(plan: Plan) -> Path:
    """Assemble the tar stream (or reuse the cached one), write and check the image, publish, stamp."""
    pins, runtime, arch, frozen, closure = plan.pins, plan.runtime, plan.arch, plan.frozen, plan.closure
    guest, guest_sha, epoch, headroom = plan.guest, plan.guest_sha, plan.epoch, plan.headroom_mib
    content_inputs, inputs, stamp, base = plan.content_inputs, plan.inputs, plan.stamp, plan.base
    out_dir, image, manifest_path, spdx_path = plan.out_dir, plan.image, plan.manifest, plan.spdx
    alpine = pins.alpine
    rt = alpine.runtimes[runtime]
    start = time.monotonic()
    digest = hashlib.sha256(json.dumps([TOOL_VERSION, content_inputs], sort_keys=True).encode()).hexdigest()
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch_parent = _scratch_parent(out_dir)
    scratch_parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".rootfs-{runtime}-", dir=scratch_parent))
    try:
        stream = None if os.environ.get("VULCAN_REASSEMBLE") else cached_stream(digest)
        if stream is not None:
            log.info(f"rootfs {runtime} ({arch}): same packages, agent and config as a cached build: reusing its tar")
        built = scratch / "image.ext4"
        # Two cores: hash the cached stream while mke2fs reads it, and the image while e2fsck does.
        with ThreadPoolExecutor(max_workers=1) as pool:
            for _ in range(2):
                if stream is None:
                    stream, closure = assemble(pins, runtime, arch, frozen, guest, epoch, scratch)
                    store_stream(digest, stream)
                    check = None
                else:
                    check = pool.submit(sha256_file, stream.tar)
                lay = ext4.layout(stream.file_blocks, stream.dirs, stream.entries, headroom)
                fs_uuid, hash_seed = _derived_uuid(stream.sha256, "uuid"), _derived_uuid(stream.sha256, "hash_seed")
                failed: VulcanError | None = None
                try:
                    used = ext4.make_image(stream.tar, built, lay, fs_uuid, hash_seed, epoch, f"vulcan-{runtime}"[:16])
                except VulcanError as exc:  # a corrupt cached stream can make mke2fs fail: check first
                    failed = exc
                if check is None or check.result() == stream.sha256:
                    if failed is not None:
                        raise failed
                    break
                log.warn(f"cached tar stream {stream.tar} is corrupt; assembling it again")
                stream.tar.unlink(missing_ok=True)
                stream = None
            assert stream is not None
            fsck = pool.submit(ext4.fsck, built)
            image_sha = sha256_file(built)
            fsck.result()
        keep = os.environ.get("VULCAN_KEEP_TAR")  # debugging and the benchmark: keep the stream
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(stream.tar, Path(keep) / f"{runtime}-{arch}.tar")
        pkg_rows = [
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
                "download": f"{alpine.repo_url(p.repo, arch)}/{p.filename}",
                "files": stream.files.get(p.name, {}),
            }
            for p in closure
        ]
        reproducible = used == "tar"
        manifest: dict[str, Any] = {
            "image": image.name,
            "sha256": image_sha,
            "size": lay.size_bytes,
            "runtime": runtime,
            "arch": arch,
            "check": list(rt.check),
            "binary": rt.binary,
            "alpine": {
                "branch": alpine.branch,
                "repositories": list(alpine.repositories),
                "world": [*alpine.base, *rt.world],
            },
            "packages": pkg_rows,
            "guest": {"path": "/usr/local/bin/vulcan-guest", "sha256": guest_sha},
            "pins_sha256": pins.digest,
            "lock_sha256": hashlib.sha256(json.dumps(content_inputs["packages"]).encode()).hexdigest(),
            "tar_sha256": stream.sha256,
            "source_date_epoch": epoch,
            "filesystem": {
                "uuid": fs_uuid,
                "hash_seed": hash_seed,
                "inodes": lay.inodes,
                "content_bytes": stream.content_bytes,
            },
            "e2fsprogs": ext4.version_text(),
            "mke2fs_input": "tar stream" if used == "tar" else "staging directory",
            "reproducible": "yes" if reproducible else "no",
            "reproducible_note": "bit-identical on any host with e2fsprogs >= 1.47.1"
            if reproducible
            else f"e2fsprogs {ext4.version_text()} cannot read tar: built from a staging directory, so the image "
            "is not guaranteed bit-identical across hosts (the tar stream still is: see tar_sha256)",
            "install_scripts": stream.install_scripts,
            "busybox_links": stream.busybox_links,
            "os_release": stream.os_release,
            "tool_version": TOOL_VERSION,
        }
        (scratch / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        doc = sbom.document(image.name, image_sha, runtime, arch, alpine.branch, pkg_rows, guest_sha, epoch)
        (scratch / "spdx.json").write_text(json.dumps(doc, indent=1) + "\n")
        _publish(scratch / "image.ext4", image)
        _publish(scratch / "manifest.json", manifest_path)
        _publish(scratch / "spdx.json", spdx_path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    stamps.write(stamp, inputs, base, [image, manifest_path, spdx_path], known={image: image_sha})
    log.info(
        f"rootfs {runtime} ({arch}): {image.relative_to(base)} {lay.size_bytes >> 20} MiB "
        f"({len(closure)} packages, {stream.content_bytes >> 20} MiB content) in {time.monotonic() - start:.1f}s, "
        f"sha256 {image_sha}"
    )
    return image


def _require(tree: Tree, path: str, message: str) -> None:
    if path not in tree.nodes:
        raise BuildError(message)


def _publish(src: Path, dest: Path) -> None:
    try:
        os.replace(src, dest)
    except OSError:  # scratch on another file system (VULCAN_SCRATCH): copy next to it first
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
