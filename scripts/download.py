"""`nox -s download`: the pinned Firecracker, jailer and guest kernel, verified, in bin/.

Upstream layout (firecracker-microvm/firecracker, docs/getting-started.md and the release
assets of every tag): ``firecracker-vX.Y.Z-ARCH.tgz`` (next to it ``...tgz.sha256.txt`` in
sha256sum format) holds one top folder ``release-vX.Y.Z-ARCH/`` with the static binaries
``firecracker-vX.Y.Z-ARCH`` and ``jailer-vX.Y.Z-ARCH``, ``seccomp-filter-vX.Y.Z-ARCH.json``,
``SHA256SUMS`` and other tools. Guest kernels come from Firecracker's CI bucket
(``s3.amazonaws.com/spec.ccfc.min/firecracker-ci/<dated prefix>/<arch>/vmlinux-<version>``);
no checksum is published next to them, so pins.json carries our own. The HTTP side is fetch.py.
"""

from __future__ import annotations

import argparse
import hashlib
import tarfile
from pathlib import Path
from typing import IO

from . import atomic, cli, log, paths, stamps
from .errors import ArchiveError, ChecksumError
from .fetch import cached
from .pins import Pins
from .pins import load as load_pins
from .step import Check

EXECUTABLE = 0o755


def _publish_bytes(src: IO[bytes], dest: Path, mode: int) -> str:
    h = hashlib.sha256()
    with atomic.replacing(dest, mode) as tmp, open(tmp, "wb") as f:
        while chunk := src.read(1 << 20):
            f.write(chunk)
            h.update(chunk)
    return h.hexdigest()


def _sha256sums(text: str) -> dict[str, str]:
    sums = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2:
            sums[fields[1].lstrip("*")] = fields[0].lower()
    return sums


def extract_firecracker(tgz: Path, version: str, arch: str, out: Path) -> list[Path]:
    """Put ``firecracker`` and ``jailer`` from the release archive into ``out``."""
    top = f"release-v{version}-{arch}"
    wanted = {f"{top}/firecracker-v{version}-{arch}": "firecracker", f"{top}/jailer-v{version}-{arch}": "jailer"}
    written: dict[str, str] = {}
    sums: dict[str, str] = {}
    with tarfile.open(tgz, "r:gz") as tar:
        for member in tar:
            if member.name == f"{top}/SHA256SUMS" and member.isfile():
                f = tar.extractfile(member)
                assert f is not None
                sums = _sha256sums(f.read().decode("utf-8", "replace"))
            elif member.name in wanted and member.isfile():
                f = tar.extractfile(member)
                assert f is not None
                written[member.name] = _publish_bytes(f, out / wanted[member.name], EXECUTABLE)
    missing = sorted(set(wanted) - set(written))
    if missing:
        for name in written:
            (out / wanted[name]).unlink(missing_ok=True)
        raise ArchiveError(
            f"{tgz.name}: Firecracker archive lacks {', '.join(missing)}",
            hint=f"is firecracker.version ({version}) right for this URL? The archive must hold {top}/",
        )
    for name, digest in written.items():  # the archive's own SHA256SUMS, when present
        base = name.rsplit("/", 1)[1]
        if base in sums and sums[base] != digest:
            for n in written:
                (out / wanted[n]).unlink(missing_ok=True)
            raise ChecksumError(f"{tgz.name}: {base} does not match the archive's SHA256SUMS")
    return [out / wanted[n] for n in sorted(written)]


def install_kernel(src: Path, dest: Path) -> Path:
    with open(src, "rb") as f:
        _publish_bytes(f, dest, 0o644)
    return dest


def parser() -> argparse.ArgumentParser:
    return cli.parser("download", "Download the pinned Firecracker, jailer and guest kernel into bin/ (verified).")


def check(args: argparse.Namespace, dry: bool) -> list[Check[Pins]]:
    pins, arch = load_pins(), args.arch
    out = paths.bin_dir(arch)
    stamp = paths.stamp_path(out, "download")
    inputs = {"arch": arch, "firecracker": pins.firecracker.entry(arch), "kernel": pins.kernel.entry(arch)}
    outputs = [paths.vmm(arch, "firecracker"), paths.vmm(arch, "jailer"), paths.kernel(arch)]
    why = stamps.outdated(stamp, inputs, paths.out_root())
    return [Check(f"download ({arch})", stamp, inputs, outputs, why, paths.out_root(), pins)]


def run(args: argparse.Namespace, check: Check[Pins]) -> None:
    pins, arch = check.context, args.arch
    out = paths.bin_dir(arch)
    out.mkdir(parents=True, exist_ok=True)
    fc = pins.firecracker
    tgz = cached(fc.url_for(arch), fc.sha256_for(arch))
    kernel = cached(pins.kernel.url_for(arch), pins.kernel.sha256_for(arch))
    extract_firecracker(tgz, fc.version, arch, out)
    install_kernel(kernel, paths.kernel(arch))
    stamps.write(check.stamp, check.inputs, check.base, check.outputs)
    for p in check.outputs:
        log.info(f"  {p.relative_to(check.base)}")
