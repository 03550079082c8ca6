"""`nox -s rootfs-<runtime>`: one image per runtime in pins.json, from the lock, as any user.

Steps: lock (no network when it is fresh) -> stamp check -> fetch + verify packages (shared
cache) -> merged tree -> what install scripts would do -> normalised tar -> ext4 ->
e2fsck -> manifest + SPDX -> publish with os.replace (an interrupted build leaves no image).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid as uuidlib
from pathlib import Path
from typing import IO, Any

from .. import TOOL_VERSION, cli, ext4, log, paths, sbom, stamps
from ..apk import repo
from ..apk.package import control_files
from ..errors import BuildError, PinError
from ..fetch import sha256_file
from ..pins import Pins
from ..pins import load as load_pins
from . import configure
from .tree import Tree


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


def source_date_epoch(closure: list[repo.Locked]) -> int:
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env:
        if not env.isdigit():
            raise PinError(f"SOURCE_DATE_EPOCH={env!r} is not a number of seconds")
        return int(env)
    return max((p.build_time for p in closure), default=0)


def _scratch_parent(out_dir: Path) -> Path:
    env = os.environ.get("VULCAN_SCRATCH")
    return Path(env) if env else out_dir


def build(pins: Pins, runtime: str, arch: str, frozen: bool) -> Path:
    alpine = pins.alpine
    if runtime not in alpine.runtimes:
        raise PinError(f"unknown runtime {runtime!r}", hint=f"runtimes in pins.json: {', '.join(alpine.runtimes)}")
    rt = alpine.runtimes[runtime]
    base = paths.out_root()
    out_dir = paths.images_dir(arch)
    image = out_dir / f"{runtime}.ext4"
    manifest_path = out_dir / f"{runtime}.manifest.json"
    spdx_path = out_dir / f"{runtime}.spdx.json"
    guest = paths.bin_dir(arch) / "vulcan-guest"
    if not guest.is_file():
        raise BuildError(f"{guest} is missing", hint=f"run 'nox -s guest -- --arch {arch}' first")
    closure = repo.ensure_locked(pins, runtime, arch, frozen)
    guest_sha = sha256_file(guest)
    epoch = source_date_epoch(closure)
    how = ext4.method()
    headroom = rt.headroom_mib if rt.headroom_mib is not None else alpine.headroom_mib
    stamp = paths.stamp_path(out_dir, f"rootfs-{runtime}")
    inputs = {
        "arch": arch,
        "runtime": {"world": list(rt.world), "check": list(rt.check), "binary": rt.binary, "headroom_mib": headroom},
        "alpine": {"branch": alpine.branch, "repositories": list(alpine.repositories), "base": list(alpine.base)},
        "packages": [f"{p.name}-{p.version} {p.checksum}" for p in closure],
        "guest_sha256": guest_sha,
        "source_date_epoch": epoch,
        "e2fsprogs": ext4.version_text(),
        "mke2fs_input": how,
    }
    why = stamps.outdated(stamp, inputs, base)
    if why is None:
        log.info(f"rootfs {runtime} ({arch}): up to date: {image.relative_to(base)}")
        return image
    log.info(f"rootfs {runtime} ({arch}): {why}")
    start = time.monotonic()
    closure, verified = repo.packages_for(pins, runtime, arch, frozen)
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch_parent = _scratch_parent(out_dir)
    scratch_parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".rootfs-{runtime}-", dir=scratch_parent))
    try:
        tree = Tree(scratch)
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
        keys = repo.key_pems(alpine)
        world = [*alpine.base, *rt.world]
        repos = [f"{alpine.mirror.rstrip('/')}/{alpine.branch}/{r}" for r in alpine.repositories]
        configure.apk_database(tree, installed, world, repos, keys, arch)
        _require(tree, "sbin/init", "no /sbin/init in the image (busybox's applet link): is busybox in alpine.base?")
        _require(tree, rt.binary.lstrip("/"), f"the runtime binary {rt.binary} is not in the image")
        os_release = tree.nodes.get("etc/os-release")
        if os_release is None:
            log.warn("no /etc/os-release in the image: add alpine-release to alpine.base")

        tar_path = scratch / "rootfs.tar"
        with open(tar_path, "wb") as f:
            w = _HashingWriter(f)
            tree.write_tar(w, epoch)  # type: ignore[arg-type]
        tar_sha = w.h.hexdigest()
        files = [n for n in tree.nodes.values() if n.kind == "file"]
        lay = ext4.layout(tree.content_size(), sum((n.size + 4095) // 4096 for n in files), len(tree.nodes), headroom)
        fs_uuid, hash_seed = _derived_uuid(tar_sha, "uuid"), _derived_uuid(tar_sha, "hash_seed")
        built = scratch / "image.ext4"
        used = ext4.make_image(tar_path, built, lay, fs_uuid, hash_seed, epoch, f"vulcan-{runtime}"[:16])
        ext4.fsck(built)
        tree.close()
        image_sha = sha256_file(built)
        per_package: dict[str, dict[str, int]] = {}
        for n in tree.nodes.values():
            if n.kind == "file" and n.owner != "vulcan":
                per_package.setdefault(n.owner, {})[n.path] = n.size
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
                "files": dict(sorted(per_package.get(p.name, {}).items())),
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
            "alpine": {"branch": alpine.branch, "repositories": list(alpine.repositories), "world": world},
            "packages": pkg_rows,
            "guest": {"path": "/usr/local/bin/vulcan-guest", "sha256": guest_sha},
            "pins_sha256": pins.digest,
            "lock_sha256": hashlib.sha256(json.dumps(inputs["packages"]).encode()).hexdigest(),
            "tar_sha256": tar_sha,
            "source_date_epoch": epoch,
            "filesystem": {
                "uuid": fs_uuid,
                "hash_seed": hash_seed,
                "inodes": lay.inodes,
                "content_bytes": tree.content_size(),
            },
            "e2fsprogs": ext4.version_text(),
            "mke2fs_input": "tar stream" if used == "tar" else "staging directory",
            "reproducible": "yes" if reproducible else "no",
            "reproducible_note": "bit-identical on any host with e2fsprogs >= 1.47.1"
            if reproducible
            else f"e2fsprogs {ext4.version_text()} cannot read tar: built from a staging directory, so the image "
            "is not guaranteed bit-identical across hosts (the tar stream still is: see tar_sha256)",
            "install_scripts": [r.__dict__ for r in report],
            "busybox_links": links,
            "os_release": os_release.owner if os_release else None,
            "tool_version": TOOL_VERSION,
        }
        (scratch / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        doc = sbom.document(image.name, image_sha, runtime, arch, alpine.branch, pkg_rows, guest_sha, epoch)
        (scratch / "spdx.json").write_text(json.dumps(doc, indent=1) + "\n")
        unsupported = [r for r in report if r.action == "not supported"]
        for r in unsupported:
            log.warn(f"{r.package} {r.script}: not supported; its effect is not in the image (see the manifest)")
        _publish(scratch / "image.ext4", image)
        _publish(scratch / "manifest.json", manifest_path)
        _publish(scratch / "spdx.json", spdx_path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    stamps.write(stamp, inputs, base, [image, manifest_path, spdx_path])
    log.info(
        f"rootfs {runtime} ({arch}): {image.relative_to(base)} {lay.size_bytes >> 20} MiB "
        f"({len(closure)} packages, {tree.content_size() >> 20} MiB content) in {time.monotonic() - start:.1f}s, "
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


def main(argv: list[str]) -> int:
    pins = load_pins()
    p = cli.parser("rootfs-RUNTIME", "Build the ext4 root filesystem image of one runtime (or all) into images/.")
    p.add_argument("--runtime", action="append", help="runtime from pins.json alpine.runtimes (repeatable)")
    p.add_argument("--all", action="store_true", help="every runtime in pins.json")
    args = p.parse_args(argv)
    runtimes = list(pins.alpine.runtimes) if args.all or not args.runtime else args.runtime
    for rt in runtimes:
        build(pins, rt, args.arch, args.frozen)
    return 0
