"""The test world: a mirror, pins, a cache and an output directory, and a way to run the tool in it."""

from __future__ import annotations

import contextlib
import copy
import functools
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from scripts.arch import host_arch
from tests.support.mirror import Mirror, serve
from tests.support.toolchains import find_go

REPO = Path(__file__).resolve().parent.parent.parent
SHARED = REPO.parent / "shared" / "testdata"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@functools.lru_cache(maxsize=8)
def file_state(p: Path) -> tuple[str, int, int, int]:
    """A file's sha256, mode, owner and group: what "left as it was" compares."""
    st = p.stat()
    return hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mode, st.st_uid, st.st_gid


def go_release(script: str) -> bytes:
    """A Go-release-shaped archive (go/bin/go) whose go is ``script``, a shell script."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = script.encode()
        info = tarfile.TarInfo("go/bin/go")
        info.size, info.mode = len(data), 0o755
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def version_program(text: str, arch: str) -> bytes:
    """A static ELF printing ``text`` (like firecracker --version), built with Debian's
    musl-gcc when it can target ``arch``; otherwise a shell script."""
    cc = shutil.which("musl-gcc")
    if cc and arch == host_arch():
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "v.c"
            src.write_text(f'#include <stdio.h>\nint main(void) {{ puts("{text}"); return 0; }}\n')
            subprocess.run([cc, "-static", "-Os", "-s", "-o", f"{tmp}/v", str(src)], check=True)
            return Path(tmp, "v").read_bytes()
    return f'#!/bin/sh\necho "{text}"\n'.encode()


def firecracker_tgz(version: str, arch: str, extra_member: bool = True, real: Path | None = None) -> bytes:
    """A Firecracker-release-shaped archive whose binaries print their version; with ``real``
    (a directory holding firecracker and jailer), the real binaries in the upstream layout."""
    top = f"release-v{version}-{arch}"
    fc = (real / "firecracker").read_bytes() if real else version_program(f"Firecracker v{version}", arch)
    jailer = (real / "jailer").read_bytes() if real else version_program(f"Jailer v{version}", arch)
    members = {
        f"{top}/firecracker-v{version}-{arch}": fc,
        f"{top}/jailer-v{version}-{arch}": jailer,
        f"{top}/seccomp-filter-v{version}-{arch}.json": b"{}\n",
    }
    sums = "".join(f"{sha256(d)}  {n.rsplit('/', 1)[1]}\n" for n, d in members.items())
    if extra_member:
        members[f"{top}/SHA256SUMS"] = sums.encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buf.getvalue(), mtime=0)  # deterministic: the same bytes every call


BASE_PINS = json.loads((REPO / "pins.json").read_text())


# Where every world of a test session builds mke2fs's helpers (VULCAN_TOOLS): once, not once per
# cache (~0.4 s each; conftest sets it). Unset (the bench), each cache builds its own, as a user's does.
SHARED_TOOLS: Path | None = None


@dataclass
class World:
    """A test world: mirror + pins + cache + output dir, and a way to run the tool in it."""

    mirror: Mirror
    tmp: Path
    pins: dict  # type: ignore[type-arg]
    gocache: Path
    agent_bin: Path | None = None  # bin/ with the session's one agent build (conftest's agent_bin)

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    @property
    def cache(self) -> Path:
        return self.tmp / "cache"

    @property
    def pins_path(self) -> Path:
        return self.tmp / "pins.json"

    def use_agent(self) -> None:
        """bin/ with the agent, as `nox -s guest` leaves it: a copy of the session's one build."""
        assert self.agent_bin is not None, "this world was made without the session's agent"
        shutil.copytree(self.agent_bin, self.out / "bin", symlinks=True, dirs_exist_ok=True)

    def write_pins(self) -> None:
        self.pins_path.write_text(json.dumps(self.pins, indent=2))

    def in_process(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """This process as the tool run in this world (for the engine called in-process): the
        world's VULCAN_* settings in os.environ until the test ends."""
        for k, v in self.env().items():
            if k.startswith("VULCAN_"):
                monkeypatch.setenv(k, v)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VULCAN_")}
        env.update(
            VULCAN_PINS=str(self.pins_path),
            VULCAN_MIRROR=self.mirror.url,
            VULCAN_CACHE=str(self.cache),
            VULCAN_OUT=str(self.out),
            PYTHONPATH=str(REPO),
            VULCAN_GOCACHE=str(self.gocache),
        )
        if SHARED_TOOLS is not None:
            env["VULCAN_TOOLS"] = str(SHARED_TOOLS)
        env.update(extra)
        return env

    def run(self, *args: str, check: bool = False, **extra: str) -> subprocess.CompletedProcess[str]:
        self.write_pins()
        proc = subprocess.run(
            [sys.executable, "-m", "scripts", *args],
            cwd=REPO,
            env=self.env(**extra),
            capture_output=True,
            text=True,
            timeout=600,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def popen(self, *args: str, **extra: str) -> subprocess.Popen[str]:
        self.write_pins()
        return subprocess.Popen(
            [sys.executable, "-m", "scripts", *args],
            cwd=REPO,
            env=self.env(**extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


def require_shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"../shared/testdata is absent (looked in {SHARED}); it holds the real Alpine data")
    return SHARED


def serve_vmm(w: World) -> World:
    """Pin Firecracker and the kernel to generated bytes that the world's mirror serves."""
    fc, kernel = w.pins["firecracker"], w.pins["kernel"]
    for arch in ("x86_64", "aarch64"):
        tgz = firecracker_tgz(fc["version"], arch)
        fc["sha256"][arch] = sha256(tgz)
        w.mirror.add(fc["url"].format(version=fc["version"], arch=arch), tgz)
        vmlinux = b"\x7fELF" + f"test kernel {arch}".encode() * 1000
        kernel["sha256"][arch] = sha256(vmlinux)
        w.mirror.add(kernel["url"].format(version=kernel["version"], arch=arch), vmlinux)
    return w


def agent_world(mirror: Mirror, tmp: Path, gocache: Path) -> Path:
    """Build the agent once (the suite's session fixture does, on the session Go cache) and
    return its bin/ directory: every built world starts from a copy of it."""
    w = World(mirror, tmp, copy.deepcopy(BASE_PINS), gocache)
    w.run("guest", check=True, VULCAN_GO=find_go())
    return w.out / "bin"


@contextlib.contextmanager
def built_world(
    tmp: Path,
    gocache: Path,
    agent_bin: Path,
    *,
    prepare: Callable[[World], None] | None = None,
    runtimes: dict | None = None,  # type: ignore[type-arg]
    formats: list[str] | None = None,
    download: bool = False,
) -> Iterator[World]:
    """A world whose images are built, for a test module to share: its own mirror (the test
    repository, or what ``prepare`` serves instead), pins, cache and outputs, the agent copied
    from the session's one build (the stamp comes with it: `guest` is then up to date), then
    `download` if asked and `rootfs --all`. ``w.build`` is that build's process."""
    from tests.support import imagerepo

    mirror, server = serve()
    w = serve_vmm(World(mirror, tmp, copy.deepcopy(BASE_PINS), gocache, agent_bin))
    try:
        if prepare is None:
            imagerepo.setup(w, runtimes=runtimes)
        else:
            prepare(w)
        if formats is not None:
            w.pins["alpine"]["formats"] = formats
        w.write_pins()
        w.use_agent()
        if download:
            w.run("download", check=True)
        w.build = w.run("rootfs", "--all", check=True)  # type: ignore[attr-defined]
        yield w
    finally:
        server.shutdown()
        server.server_close()


REAL_FIRECRACKER = SHARED / "firecracker-v1.12.1" / "x86_64"
REAL_FIRECRACKER_VERSION = "1.12.1"


def require_real_firecracker() -> Path:
    """The real Firecracker 1.12.1 and jailer in ../shared (a test oracle), or a skip saying why."""
    if host_arch() != "x86_64":
        pytest.skip("the real Firecracker in ../shared is an x86_64 build")
    if not (REAL_FIRECRACKER / "firecracker").is_file():
        pytest.skip(f"no real Firecracker at {REAL_FIRECRACKER} (../shared/testdata/firecracker-v1.12.1)")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is not usable here: Firecracker cannot start a VM")
    return REAL_FIRECRACKER


def serve_real_firecracker(w: World) -> None:
    """Pin Firecracker to the real 1.12.1, served from the mirror as GitHub serves a release."""
    fc = w.pins["firecracker"]
    fc["version"] = REAL_FIRECRACKER_VERSION
    for arch in ("x86_64", "aarch64"):
        tgz = firecracker_tgz(fc["version"], arch, real=REAL_FIRECRACKER if arch == "x86_64" else None)
        fc["sha256"][arch] = sha256(tgz)
        w.mirror.add(fc["url"].format(version=fc["version"], arch=arch), tgz)
