"""The real apk-tools 2.14.0, as a test oracle: installed from the real Alpine v3.19.1 repository in
../shared by our own engine, and run through its own musl loader. Nothing of it is built here."""

from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from scripts.apk.index import Package, parse_index
from scripts.apk.package import read_index, verify_package
from scripts.apk.solver import Solver
from scripts.apk.trust import Keyring
from scripts.arch import host_arch
from scripts.formats.squashfs_read import EXTRACT
from scripts.rootfs.inflate import inflate
from scripts.rootfs.tree import Tree
from tests.support.world import SHARED

ISO = SHARED / "alpine-v3.19.1-iso"  # a repository root: <arch>/APKINDEX.tar.gz, as apk wants it
ISO_INDEX = ISO / "x86_64" / "APKINDEX.tar.gz"
KEYS = SHARED / "csmith-apkutils" / "keys"
V316 = SHARED / "chainguard-dev-apko/pkg/apk/apk/testdata/alpine-316/APKINDEX.tar.gz"  # main, x86_64
V317 = SHARED / "chainguard-dev-apko/pkg/apk/apk/testdata/alpine-317/APKINDEX.tar.gz"  # main, aarch64


@functools.cache
def keyring() -> Keyring:
    return Keyring.from_pems({p.name: p.read_bytes() for p in KEYS.iterdir()})


@functools.cache
def index(path: Path, arch: str) -> tuple[Package, ...]:
    text = read_index(path.read_bytes(), keyring(), str(path))[0]
    return tuple(p for p in parse_index(text, repo="main").packages if p.arch in ("", "noarch", arch))


@dataclass(frozen=True)
class Apk:
    """A runnable apk: ``argv`` starts it (its musl loader, its libraries, sbin/apk)."""

    root: Path

    @property
    def argv(self) -> list[str]:
        r = self.root
        return [str(r / "lib/ld-musl-x86_64.so.1"), "--library-path", f"{r}/lib:{r}/usr/lib", str(r / "sbin/apk")]

    def run(self, *args: str, root: Path, arch: str = "x86_64", epoch: int | None = None, keys: str = str(KEYS)
            ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """apk on ``root``, offline, trusting ``keys`` (default Alpine's; or an image's own)."""
        env = None if epoch is None else {**os.environ, "SOURCE_DATE_EPOCH": str(epoch)}
        return subprocess.run(
            [*self.argv, "--root", str(root), "--arch", arch, "--keys-dir", keys, "--no-network", "--no-cache",
             *args],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip


@functools.cache
def _installed(dest: Path) -> Apk:
    """apk-tools and what it needs, resolved, verified and merged by our engine, then unpacked."""
    closure = Solver(index(ISO_INDEX, "x86_64"), "x86_64", ["main"]).solve(["apk-tools"])
    scratch = Path(tempfile.mkdtemp(prefix="vulcan-apk-"))
    try:
        tree = Tree(scratch)
        for p in closure:
            v = verify_package(ISO / "x86_64" / f"{p.name}-{p.version}.apk", p, None, p.name)
            tree.add_package(p.name, inflate(v.path, v.data_offset, scratch / f"{p.name}.tar"), set())
        tar_path = scratch / "apk.tar"
        with open(tar_path, "wb") as f:
            tree.write_tar(f, 0)
        tree.close()
        with tarfile.open(tar_path) as tar:
            tar.extractall(dest, **EXTRACT)  # our own stream, checked paths (tree.py)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return Apk(dest)


@functools.cache
def _home() -> Path:
    """Where this run installs the real apk: its own directory, gone when the run ends."""
    dest = Path(tempfile.mkdtemp(prefix="vulcan-real-apk-"))
    atexit.register(shutil.rmtree, dest, True)
    return dest


def real_apk() -> Apk:
    """The real apk, or a skip that says what is missing."""
    if not ISO_INDEX.is_file():
        pytest.skip(f"the real Alpine repository is absent ({ISO}); it holds apk-tools 2.14.0")
    if host_arch() != "x86_64":
        pytest.skip("the real apk in ../shared is an x86_64 binary")
    apk = _installed(_home())
    probe = subprocess.run([*apk.argv, "--version"], capture_output=True, text=True)
    if probe.returncode != 0 or "apk-tools 2.14" not in probe.stdout:
        pytest.skip(f"the real apk does not run here: {probe.stderr.strip()[:200]}")
    return apk


def empty_root(base: Path, repository: Path | list[Path], arch: str) -> Path:
    """An empty apk root whose repositories are ``repository`` (each holding ``<arch>/APKINDEX.tar.gz``)."""
    repos = repository if isinstance(repository, list) else [repository]
    root = base / f"root-{arch}"
    (root / "etc/apk").mkdir(parents=True, exist_ok=True)
    (root / "lib/apk/db").mkdir(parents=True, exist_ok=True)
    (root / "etc/apk/arch").write_text(f"{arch}\n")
    (root / "etc/apk/world").write_text("")
    (root / "lib/apk/db/installed").write_text("")
    (root / "etc/apk/repositories").write_text("".join(f"{r}\n" for r in repos))
    return root


@dataclass(frozen=True)
class Outcome:
    ok: bool
    packages: frozenset[tuple[str, str]]  # (name, version) installed, when ok
    names: tuple[str, ...]  # when not ok: the packages apk's error names, in order


INSTALLING = re.compile(r"^\(\d+/\d+\) Installing (\S+) \((\S+)\)$", re.M)
ERROR_NAME = re.compile(r"^  (\S+?)(?:-\d\S*)?(?: \(.*\))?:$", re.M)


def simulate(apk: Apk, root: Path, world: list[str], arch: str) -> Outcome:
    proc = apk.run("--simulate", "add", *world, root=root, arch=arch)
    out = proc.stdout + proc.stderr
    if proc.returncode == 0:
        return Outcome(True, frozenset(INSTALLING.findall(out)), ())
    return Outcome(False, frozenset(), tuple(ERROR_NAME.findall(out)))


def serve_as_mirror(mirror: object, branch: str, keys: dict[str, dict[str, str]]) -> None:
    """The real v3.19.1 repository as ``branch``'s main on the test mirror (upstream-shaped),
    and the real Alpine keys ``keys`` (pins.json's alpine.keys) at their URLs."""
    from tests.support.apkrepo import CDN

    for f in (ISO / "x86_64").iterdir():
        mirror.add(f"{CDN}/{branch}/main/x86_64/{f.name}", f.read_bytes())  # type: ignore[attr-defined]
    for name, entry in keys.items():
        mirror.add(entry["url"], (KEYS / name).read_bytes())  # type: ignore[attr-defined]
