"""A real Alpine image, end to end: the real, Alpine-signed v3.19.1 repository served as a v3.19
mirror; images of the base plus apk-tools and openssl as runtimes; verify runs the real binaries
through the real musl loader; QEMU boots one; and the real apk 2.14.0 accepts our database: it
lists exactly the lock, audits no package file as changed but the ones we edit on purpose, has
nothing to add for the world, and can add and remove a package without losing a record."""

from __future__ import annotations

import difflib
import json
import lzma
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.pins import host_arch
from tests.support import realapk
from tests.support.apkrepo import CDN
from tests.support.world import SHARED, World, built_world

BRANCH = "v3.19"
BASE = ["alpine-baselayout", "alpine-keys", "alpine-release", "busybox", "busybox-binsh", "musl",
        "ca-certificates-bundle"]  # fmt: skip
RUNTIMES = {
    "apk": {"world": ["apk-tools"], "check": ["apk", "--version"], "binary": "/sbin/apk"},
    "openssl": {"world": ["openssl"], "check": ["openssl", "version"], "binary": "/usr/bin/openssl"},
}
# What we write over package files on purpose: accounts (sandbox, shadow, klogd) and the init
EDITED = {"etc/passwd", "etc/group", "etc/shadow", "etc/inittab", "etc/hostname"}
TEST_KERNEL = SHARED / "kernel" / "vmlinux.xz"

pytestmark = pytest.mark.skipif(host_arch() != "x86_64", reason="the real repository in ../shared is x86_64")


@pytest.fixture(scope="module")
def alpine(tmp_path_factory: pytest.TempPathFactory, go_build_cache: Path, agent_bin: Path) -> Iterator[World]:
    apk = realapk.real_apk()  # skips without ../shared

    def prepare(w: World) -> None:
        for f in (realapk.ISO / "x86_64").iterdir():
            w.mirror.add(f"{CDN}/{BRANCH}/main/x86_64/{f.name}", f.read_bytes())
        keys = w.pins["alpine"]["keys"]
        for name, entry in keys.items():
            w.mirror.add(entry["url"], (realapk.KEYS / name).read_bytes())
        w.pins["alpine"] = {"mirror": CDN, "branch": BRANCH, "repositories": ["main"], "keys": keys, "base": BASE,
                            "headroom_mib": 16, "runtimes": RUNTIMES}  # fmt: skip

    with built_world(tmp_path_factory.mktemp("alpine"), go_build_cache, agent_bin, prepare=prepare) as w:
        w.apk = apk  # type: ignore[attr-defined]
        yield w


def image_root(w: World, runtime: str, dest: Path) -> Path:
    """The image's files, copied out with debugfs (owners and modes kept: we are root)."""
    img = w.out / "images" / f"{runtime}.ext4"
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["debugfs", "-R", f"rdump / {dest}", str(img)], check=True, capture_output=True)
    return dest


def real_install(apk: realapk.Apk, root: Path, world: list[str]) -> Path:
    """What real apk installs for ``world`` from the same repository (no scripts)."""
    (root / "etc/apk").mkdir(parents=True)
    (root / "etc/apk/repositories").write_text(f"{realapk.ISO}\n")
    proc = apk.run("--initdb", "--no-scripts", "add", *world, root=root)
    assert proc.returncode == 0, proc.stderr
    return root


def lock_of(w: World, runtime: str) -> list[str]:
    entry = json.loads((w.tmp / "alpine.lock.json").read_text())["entries"][f"{runtime}/x86_64"]
    return sorted(f"{p['name']}-{p['version']}" for p in entry["packages"])


def test_real_images_build_and_verify_runs_the_real_binaries(alpine: World) -> None:
    proc = alpine.run("verify", "--json")
    rows = json.loads(proc.stdout)["rows"]
    runs = {r["artifact"]: r for r in rows if r["check"] == "runtime runs"}
    assert runs["images/apk.ext4"]["result"] == "pass", runs
    assert "apk-tools 2.14.0" in runs["images/apk.ext4"]["detail"]
    assert runs["images/openssl.ext4"]["result"] == "pass" and "OpenSSL 3.1.4" in runs["images/openssl.ext4"]["detail"]
    failed = [r for r in rows if r["result"] == "FAIL" and r["artifact"].startswith("images/")]
    assert not failed, failed


def test_our_installed_database_is_what_real_apk_writes(alpine: World, tmp_path: Path) -> None:
    """Real apk installs the same world from the same repository (no scripts): every record,
    field for field, must equal ours (ours is the same text)."""
    apk: realapk.Apk = alpine.apk  # type: ignore[attr-defined]
    root = real_install(apk, tmp_path / "real", [*BASE, *RUNTIMES["apk"]["world"]])
    theirs = (root / "lib/apk/db/installed").read_text()
    mine = image_root(alpine, "apk", tmp_path / "img").joinpath("lib/apk/db/installed").read_text()
    split = lambda text: {r.split("\nP:", 1)[1].split("\n", 1)[0]: r for r in text.strip("\n").split("\n\n")}  # noqa: E731
    a, b = split(mine), split(theirs)
    assert sorted(a) == sorted(b)
    for name in b:
        diff = difflib.unified_diff(b[name].splitlines(), a[name].splitlines(), "real apk", "ours", lineterm="", n=1)
        assert a[name] == b[name], f"{name}:\n" + "\n".join(list(diff)[:40])
    assert mine == theirs


def test_real_apk_accepts_the_image_database(alpine: World, tmp_path: Path) -> None:
    apk: realapk.Apk = alpine.apk  # type: ignore[attr-defined]
    root = image_root(alpine, "apk", tmp_path / "img")
    (root / "etc/apk/repositories").write_text(f"{realapk.ISO}\n")  # the same repository, offline
    listed = apk.run("info", "-v", root=root)
    assert listed.returncode == 0, listed.stderr
    assert sorted(listed.stdout.split()) == lock_of(alpine, "apk")
    # apk audit on what real apk itself installs for the same world is the baseline (it, too,
    # reports etc/apk/world, arch, repositories and key links as added)
    real = real_install(apk, tmp_path / "real", [*BASE, *RUNTIMES["apk"]["world"]])
    baseline = set(apk.run("audit", root=real).stdout.splitlines())
    audit = set(apk.run("audit", root=root).stdout.splitlines())
    pinned = {f"A etc/apk/keys/{name}" for name in alpine.pins["alpine"]["keys"]}  # we install every pinned key
    ours = {f"U {p}" for p in EDITED} | {"D etc/vulcan/"} | pinned
    assert audit - baseline <= ours, sorted(audit - baseline)
    assert {line for line in audit if line.startswith("U ")} == {f"U {p}" for p in EDITED}, sorted(audit)
    world = (root / "etc/apk/world").read_text().split()
    nothing = apk.run("--simulate", "add", *world, root=root)
    assert nothing.returncode == 0 and "Installing" not in nothing.stdout, nothing.stdout + nothing.stderr


def test_real_apk_adds_and_removes_a_package_without_losing_a_record(alpine: World, tmp_path: Path) -> None:
    apk: realapk.Apk = alpine.apk  # type: ignore[attr-defined]
    root = image_root(alpine, "apk", tmp_path / "img")
    (root / "etc/apk/repositories").write_text(f"{realapk.ISO}\n")
    before = lock_of(alpine, "apk")
    added = apk.run("--no-scripts", "add", "scanelf", root=root)
    assert added.returncode == 0, added.stderr
    listed = apk.run("info", "-v", root=root).stdout.split()
    assert sorted(listed) == sorted([*before, "scanelf-1.3.7-r2"])
    files = apk.run("info", "-L", "libcrypto3", root=root).stdout
    assert "lib/libcrypto.so.3" in files and "usr/lib/engines-3" in files
    removed = apk.run("--no-scripts", "del", "scanelf", root=root)
    assert removed.returncode == 0, removed.stderr
    assert sorted(apk.run("info", "-v", root=root).stdout.split()) == before
    db = (root / "lib/apk/db/installed").read_text()
    assert len(re.findall(r"^P:", db, re.M)) == len(before)


@pytest.mark.slow
@pytest.mark.skipif(not TEST_KERNEL.is_file(), reason="../shared/testdata/kernel/vmlinux.xz is absent")
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed")
def test_a_real_alpine_image_boots(alpine: World) -> None:
    kernel = alpine.tmp / "vmlinux"
    kernel.write_bytes(lzma.decompress(TEST_KERNEL.read_bytes()))
    proc = alpine.run("boot", "--vmm", "qemu", "--kernel", str(kernel), "apk")
    assert proc.returncode == 0, proc.stderr
    assert "vulcan-smoke: ok" in (alpine.out / "images/.boot/apk.ext4.qemu.console.log").read_text()
