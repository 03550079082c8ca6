"""`nox -s guest`: a reproducible, static vulcan-guest agent from pinned inputs.

Toolchain: the Go pinned in pins.json (downloaded and cached like everything else), or
``VULCAN_GO=/path/to/go`` for a local one. Source: ``guest.source`` / ``guest.package`` in
pins.json (default: this repository's ``guest/``), or ``VULCAN_GUEST_SOURCE=dir[:package]``.
Reproducibility: CGO off, -trimpath, -buildvcs=false, an empty build id, and a Go
environment built from scratch (GOENV=off, no user GOFLAGS, isolated module cache,
GOTOOLCHAIN=local so Go never fetches another toolchain).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from . import cli, log, paths, stamps
from .elf import check_static_binary
from .errors import ArchiveError, PinError
from .fetch import cached, file_lock
from .pins import GOARCH, REPO_ROOT, Pins
from .pins import load as load_pins
from .run import minimal_env, run

LDFLAGS = "-s -w -buildid="
BUILD_FLAGS = ["-trimpath", "-buildvcs=false", f"-ldflags={LDFLAGS}"]


def tree_digest(root: Path) -> str:
    """sha256 over every file's relative path, mode and bytes (dot-directories skipped)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath, name)
            if not p.is_file():
                continue
            rel = p.relative_to(root).as_posix()
            h.update(f"{rel}\0{p.stat().st_mode & 0o111:o}\0".encode())
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def source(pins: Pins) -> tuple[Path, str]:
    env = os.environ.get("VULCAN_GUEST_SOURCE")
    if env:
        directory, _, package = env.partition(":")
        src, pkg = Path(directory), package or "."
    else:
        sec = pins.raw.get("guest", {})
        src = Path(sec.get("source", "guest"))
        pkg = sec.get("package", ".")
        if not src.is_absolute():
            src = REPO_ROOT / src
    if not (src / "go.mod").is_file():
        raise PinError(
            f"guest source {src} has no go.mod",
            hint="point guest.source in pins.json (or VULCAN_GUEST_SOURCE=dir[:package]) at a Go module",
        )
    return src.resolve(), pkg


def toolchain(pins: Pins, fetch: bool = True) -> tuple[Path, dict[str, str]] | None:
    """The go binary to use and how to describe it in the stamp (None: not unpacked, fetch=False)."""
    local = os.environ.get("VULCAN_GO")
    if local:
        go = Path(local)
        if not go.is_file() or not os.access(go, os.X_OK):
            raise PinError(f"VULCAN_GO={local} is not an executable file", hint="point it at a go binary, or unset it")
        version = run([go, "env", "GOVERSION"], quiet=True, env=minimal_env(GOENV="off", GOTOOLCHAIN="local"))
        return go, {"kind": "local (VULCAN_GO)", "path": str(go), "version": version.stdout.decode().strip()}
    if pins.go is None:
        raise PinError(f"{pins.path.name}: go: missing", hint="pin a Go toolchain, or set VULCAN_GO=/path/to/go")
    from .pins import host_arch

    arch = host_arch()
    sha = pins.go.sha256_for(arch)
    root = paths.cache_dir() / "go" / f"go{pins.go.version}-{GOARCH[arch]}-{sha[:12]}"
    go = root / "go" / "bin" / "go"
    if not fetch and not go.exists():
        return None
    with file_lock(root):
        if not go.exists():
            tgz = cached(pins.go.url_for(arch), sha)
            log.info(f"unpacking Go {pins.go.version} into {root}")
            tmp = Path(tempfile.mkdtemp(prefix=".go-", dir=root.parent))
            try:
                import tarfile  # only when the pinned toolchain is unpacked

                with tarfile.open(tgz, "r:gz") as tar:
                    # sha256-pinned archive; the "data" filter (Python >= 3.11.4) also refuses odd members
                    extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                    tar.extractall(tmp, **extra)  # type: ignore[arg-type]
                if not (tmp / "go" / "bin" / "go").is_file():
                    raise ArchiveError(f"{pins.go.url_for(arch)}: the archive has no go/bin/go")
                shutil.rmtree(root, ignore_errors=True)
                os.replace(tmp, root)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return go, {"kind": "pinned", "version": pins.go.version, "sha256": sha}


def _state(pins: Pins, arch: str, fetch: bool = True) -> tuple[Path, str, Path, dict[str, Any], str | None] | None:
    """Source, package, go binary, the stamp's inputs and why the agent is out of date (None: it
    is not); None instead of all that when fetch=False and the pinned Go is not unpacked."""
    src, pkg = source(pins)
    found = toolchain(pins, fetch)
    if found is None:
        return None
    go, tool = found
    inputs = {
        "arch": arch,
        "toolchain": tool,
        "source": {"path": str(src), "package": pkg, "sha256": tree_digest(src)},
        "flags": BUILD_FLAGS,
    }
    why = stamps.outdated(paths.stamp_path(paths.bin_dir(arch), "guest"), inputs, paths.out_root())
    return src, pkg, go, inputs, why


def up_to_date(argv: list[str]) -> str | None:
    """For the noxfile's in-process check: the log line if nothing is to be done, else None."""
    arch = _parser().parse_args(argv).arch
    state = _state(load_pins(), arch, fetch=False)
    return _done(arch) if state is not None and state[4] is None else None


def _done(arch: str) -> str:
    return f"guest ({arch}): up to date: {(paths.bin_dir(arch) / 'vulcan-guest').relative_to(paths.out_root())}"


def build(pins: Pins, arch: str) -> Path:
    state = _state(pins, arch)
    assert state is not None  # fetch=True always finds a toolchain
    src, pkg, go, inputs, why = state
    out_dir = paths.bin_dir(arch)
    base = paths.out_root()
    output = out_dir / "vulcan-guest"
    stamp = paths.stamp_path(out_dir, "guest")
    if why is None:
        log.info(_done(arch))
        return output
    log.info(f"guest ({arch}): {why}")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".guest-", dir=out_dir) as tmp:
        scratch = Path(tmp)
        env = minimal_env(
            HOME=str(scratch),
            GOENV="off",
            GOFLAGS="",
            GOTOOLCHAIN="local",
            GOWORK="off",
            GO111MODULE="on",
            GOPROXY=os.environ.get("VULCAN_GOPROXY", "off"),
            GOMODCACHE=str(scratch / "gomodcache"),
            GOCACHE=os.environ.get("VULCAN_GOCACHE") or str(paths.cache_dir() / "go-build"),
            GOPATH=str(scratch / "gopath"),
            CGO_ENABLED="0",
            GOOS="linux",
            GOARCH=GOARCH[arch],
            GOAMD64="v1",
            GOARM64="v8.0",
        )
        built = scratch / "vulcan-guest"
        run([go, "build", *BUILD_FLAGS, "-o", built, pkg], env=env, cwd=src)
        check_static_binary(built, arch)
        os.chmod(built, 0o755)
        os.replace(built, output)
    stamps.write(stamp, inputs, base, [output])
    digest = stamps.output_sha256(stamp, str(output.relative_to(base)))
    log.info(f"  {output.relative_to(base)}: static {arch} ELF, {log.human(output.stat().st_size)}, sha256 {digest}")
    return output


def _parser() -> argparse.ArgumentParser:
    return cli.parser("guest", "Build the static vulcan-guest agent into bin/ (reproducibly, from pinned inputs).")


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    build(load_pins(), args.arch)
    return 0
