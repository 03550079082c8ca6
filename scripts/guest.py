"""`nox -s guest`: a reproducible, static vulcan-guest agent from pinned inputs.

Toolchain: the Go pinned in pins.json (downloaded and cached like everything else), or
``VULCAN_GO=/path/to/go`` for a local one (any Go at least as new as the ``go`` line of the
source's go.mod: 1.22 for guest/; the stamp records which toolchain built the agent, and the
bytes can differ between Go versions). Source: ``guest.source`` / ``guest.package`` in pins.json
(default: this repository's ``guest/``), or ``VULCAN_GUEST_SOURCE=dir[:package]``.
Reproducibility: CGO off, -trimpath, -buildvcs=false, an empty build id, and a Go
environment built from scratch (GOENV=off, no user GOFLAGS, isolated module cache,
GOTOOLCHAIN=local so Go never fetches another toolchain).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import atomic, cli, log, paths, settings, stamps, workspace
from .arch import GOARCH, host_arch
from .elf import check_static_binary
from .errors import ArchiveError, PinError
from .fetch import cached, file_lock, writable
from .pins import REPO_ROOT, Pins
from .pins import load as load_pins
from .run import minimal_env, run_tool
from .step import Check, Unsure

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
    override = settings.guest_source()
    if override is not None:
        src, pkg = override
    else:
        src, pkg = Path(pins.guest.source), pins.guest.package
        if not src.is_absolute():
            src = REPO_ROOT / src
    if not (src / "go.mod").is_file():
        raise PinError(
            f"guest source {src} has no go.mod",
            hint="point guest.source in pins.json (or VULCAN_GUEST_SOURCE=dir[:package]) at a Go module",
        )
    return src.resolve(), pkg


def go_line(src: Path) -> str | None:
    """The ``go 1.NN`` line of the source's go.mod: the oldest Go that can build it."""
    m = re.search(r"^go\s+(\S+)", (src / "go.mod").read_text(), re.MULTILINE)
    return m.group(1) if m else None


def toolchain(pins: Pins, fetch: bool = True) -> tuple[Path, dict[str, str]]:
    """The go binary to use and how to describe it in the stamp (Unsure: not unpacked, fetch=False)."""
    go = settings.local_go()
    if go is not None:
        version = run_tool([go, "env", "GOVERSION"], quiet=True, env=minimal_env(GOENV="off", GOTOOLCHAIN="local"))
        return go, {"kind": "local (VULCAN_GO)", "path": str(go), "version": version.stdout.decode().strip()}
    if pins.go is None:
        raise PinError(f"{pins.path.name}: go: missing", hint="pin a Go toolchain, or set VULCAN_GO=/path/to/go")
    arch = host_arch()
    sha = pins.go.sha256_for(arch)
    root = paths.cache_dir() / "go" / f"go{pins.go.version}-{GOARCH[arch]}-{sha[:12]}"
    go = root / "go" / "bin" / "go"
    if not fetch and not go.exists():
        raise Unsure("the pinned Go is not unpacked yet")
    if fetch and not go.exists():
        log.info(f"using the pinned Go {pins.go.version} (set VULCAN_GO=/path/to/go to use a local Go instead)")
    with file_lock(root):
        if not go.exists():
            tgz = cached(pins.go.url_for(arch), sha)
            log.info(f"unpacking Go {pins.go.version} into {root}")
            with workspace.scratch(root.parent, "go") as tmp:
                import tarfile  # only when the pinned toolchain is unpacked

                with tarfile.open(tgz, "r:gz") as tar:
                    # sha256-pinned archive; the "data" filter (Python >= 3.11.4) also refuses odd members
                    extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                    tar.extractall(tmp, **extra)  # type: ignore[arg-type]
                if not (tmp / "go" / "bin" / "go").is_file():
                    raise ArchiveError(f"{pins.go.url_for(arch)}: the archive has no go/bin/go")
                shutil.rmtree(root, ignore_errors=True)
                os.replace(tmp, root)
    return go, {"kind": "pinned", "version": pins.go.version, "sha256": sha}


def parser() -> argparse.ArgumentParser:
    return cli.parser("guest", "Build the static vulcan-guest agent into bin/ (reproducibly, from pinned inputs).")


@dataclass(frozen=True)
class Build:
    """What run() builds the agent from: the source, its package and the go binary."""

    source: Path
    package: str
    go: Path


def check(args: argparse.Namespace, dry: bool) -> list[Check[Build]]:
    pins, arch = load_pins(), args.arch
    src, pkg = source(pins)
    go, tool = toolchain(pins, fetch=not dry)
    inputs = {
        "arch": arch,
        "toolchain": tool,
        "source": {"path": str(src), "package": pkg, "sha256": tree_digest(src)},
        "flags": BUILD_FLAGS,
    }
    out = paths.bin_dir(arch)
    stamp = paths.stamp_path(out, "guest")
    why = stamps.outdated(stamp, inputs, paths.out_root())
    return [Check(f"guest ({arch})", stamp, inputs, [paths.agent(arch)], why, paths.out_root(), Build(src, pkg, go))]


def go_build_cache() -> Path:
    """``VULCAN_GOCACHE``, else ``go-build`` in the download cache; when that cache is
    read-only (a CI cache restore, a shared cache), a private directory in /tmp instead, said."""
    gocache = paths.safe(settings.go_cache(), "Go's build cache", "VULCAN_GOCACHE")  # its objects are linked in
    if settings.go_cache_is_set() or writable(gocache / "x"):
        if gocache.is_relative_to(paths.cache_dir()):
            paths.claim_cache()  # the Go build cache may be the cache's first entry
        return gocache
    fallback = Path(tempfile.gettempdir()) / f"vulcan-go-build-{os.getuid()}"
    if not workspace.private_dir(fallback):  # /tmp is shared: only a directory of ours, 0700
        fallback = Path(tempfile.mkdtemp(prefix="vulcan-go-build-"))
    log.info(f"the cache {paths.cache_dir()} is read-only: Go's build cache is {fallback} instead "
             "(set VULCAN_GOCACHE to choose)")  # fmt: skip
    return fallback


def run(args: argparse.Namespace, check: Check[Build]) -> None:
    src, pkg, go = check.context.source, check.context.package, check.context.go
    arch = args.arch
    out_dir = paths.bin_dir(arch)
    output = check.outputs[0]
    if check.inputs["toolchain"]["kind"] != "pinned":
        want = go_line(src)
        log.info(f"building with {check.inputs['toolchain']['version']} from VULCAN_GO (the source needs go >= {want})")
    gocache = go_build_cache()
    with workspace.scratch(out_dir, "guest") as scratch:
        env = minimal_env(
            HOME=str(scratch),
            GOENV="off",
            GOFLAGS="",
            GOTOOLCHAIN="local",
            GOWORK="off",
            GO111MODULE="on",
            GOPROXY=settings.go_proxy(),
            GOMODCACHE=str(scratch / "gomodcache"),
            GOCACHE=str(gocache),
            GOPATH=str(scratch / "gopath"),
            CGO_ENABLED="0",
            GOOS="linux",
            GOARCH=GOARCH[arch],
            GOAMD64="v1",
            GOARM64="v8.0",
        )
        built = scratch / "vulcan-guest"
        run_tool([go, "build", *BUILD_FLAGS, "-o", built, pkg], env=env, cwd=src)
        check_static_binary(built, arch)
        atomic.publish(built, output, mode=0o755)
    stamps.write(check.stamp, check.inputs, check.base, [output])
    digest = stamps.output_sha256(check.stamp, str(output.relative_to(check.base)))
    log.info(
        f"  {output.relative_to(check.base)}: static {arch} ELF, {log.human(output.stat().st_size)}, sha256 {digest}"
    )
