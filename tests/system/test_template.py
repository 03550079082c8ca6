"""A template from the real Debian bookworm OCI image (glibc python3), served by the real docker-registry:
built as an ordinary user in both formats, rebuilt bit for bit from an empty cache, verified,
booted under QEMU (both formats) and the real Firecracker (the emulated-host kernel), snapshotted
and restored, published and pulled."""

from __future__ import annotations

import copy
import json
import lzma
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from scripts.hashing import sha256_file
from tests.support import figures, ociimages
from tests.support.mirror import serve
from tests.support.registry import RunningRegistry, running_registry
from tests.support.world import (
    BASE_PINS,
    REPO,
    SHARED,
    World,
    require_real_firecracker,
    serve_real_firecracker,
    sha256,
)

ARCH = "x86_64"
TEST_KERNEL = SHARED / "kernel" / "vmlinux.xz"
EMULATED_KERNEL = SHARED / "kernel-fc-emulated" / "vmlinux.xz"
NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--")
RUNTIME = {"check": ["python3", "--version"], "binary": "/usr/bin/python3",
           "program": ["python3", "-c", "print(6*7)"], "expect": "42"}  # fmt: skip
pytestmark = pytest.mark.skipif(shutil.which("tar2sqfs") is None, reason="squashfs-tools-ng is not installed")


@dataclass
class Debian:
    world: World  # root's, its images built from an empty cache
    registry: RunningRegistry
    reference: str
    user_out: Path  # what the ordinary user built
    user_build: subprocess.CompletedProcess[str]

    def image(self, fmt: str) -> Path:
        return self.world.out / "images" / f"debian.{fmt}"


# what a build imports besides the standard library: the versions of this run's own environment
# (requirements.txt), not Debian's older ones
BUILD_DEPENDENCIES = ("requests", "urllib3", "idna", "certifi", "charset_normalizer")


def _as_nobody(tmp: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The tool run by an ordinary user (uid 65534) with Debian's python3 of the same version as
    this run's: the checkout and its virtualenv may be root's alone (CI's clone), so the user runs
    a copy of scripts/ and of the pure-Python packages a build imports."""
    import importlib

    tool = Path(tempfile.mkdtemp(prefix="tool-", dir=tmp))
    shutil.copytree(REPO / "scripts", tool / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    for name in BUILD_DEPENDENCIES:
        src = Path(importlib.import_module(name).__file__ or "").parent
        shutil.copytree(src, tool / name, ignore=shutil.ignore_patterns("__pycache__"))
    for d, _, files in os.walk(tool):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(Path(d) / f, 0o644)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp), **env}
    argv = [
        *NOBODY,
        "/usr/bin/python3",
        "-I",
        "-c",
        "import sys; sys.path.insert(0, ''); import runpy; runpy.run_module('scripts', run_name='__main__')",
        *args,
    ]
    return subprocess.run(argv, cwd=tool, capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def debian(tmp_path_factory: pytest.TempPathFactory, go_build_cache: Path, agent_bin: Path) -> Iterator[Debian]:
    ociimages.require_debian()
    ociimages.require_skopeo()
    base = tmp_path_factory.mktemp("template")
    mirror, server = serve()
    try:
        with running_registry(base / "registry") as reg:
            ociimages.copy_to(reg.host, str(ociimages.DEBIAN) + ":bookworm-python3", "debian-python:3")
            reference = f"{reg.host}/debian-python:3"
            w = World(mirror, base / "root", copy.deepcopy(BASE_PINS), go_build_cache, agent_bin)
            w.pins["alpine"]["runtimes"] = {"debian": {"image": {"reference": reference}, **RUNTIME}}
            w.pins["alpine"]["formats"] = ["ext4", "squashfs"]
            w.use_agent()
            env = {"VULCAN_REGISTRY_INSECURE": reg.host}
            lock = w.run("lock", "--arch", ARCH, **env)
            assert lock.returncode == 0, lock.stderr
            # the ordinary user: its own output and cache, and a copy of the pins and lock (pytest's
            # directories are root's alone), in a directory of its own
            user = Path(tempfile.mkdtemp(prefix="vulcan-user-"))
            shutil.copy(w.pins_path, user / "pins.json")
            shutil.copy(w.pins_path.parent / "alpine.lock.json", user / "alpine.lock.json")
            (user / "out" / "bin").mkdir(parents=True)
            shutil.copy(w.out / "bin" / "vulcan-guest", user / "out" / "bin" / "vulcan-guest")
            for p in (user, user / "out", user / "out" / "bin", user / "out" / "bin" / "vulcan-guest"):
                shutil.chown(p, 65534, 65534)
            user_build = None
            if os.getuid() == 0 and shutil.which("setpriv") and _same_python():
                mine = {"VULCAN_PINS": str(user / "pins.json"), "VULCAN_OUT": str(user / "out"),
                        "VULCAN_CACHE": str(user / "cache"), **env}  # fmt: skip
                user_build = _as_nobody(user, mine, "rootfs", "--arch", ARCH)
            # root's build, from another empty cache: the images every later test uses
            build = w.run("rootfs", "--arch", ARCH, **env)
            assert build.returncode == 0, build.stderr
            try:
                yield Debian(w, reg, reference, user / "out", user_build)  # type: ignore[arg-type]
            finally:
                shutil.rmtree(user, ignore_errors=True)
    finally:
        server.shutdown()
        server.server_close()


def _same_python() -> bool:
    import sys

    found = subprocess.run(["/usr/bin/python3", "-c", "import sys; print(sys.version_info[:2])"], capture_output=True,
                           text=True)  # fmt: skip
    return found.stdout.strip() == str(sys.version_info[:2])


def test_an_ordinary_user_builds_both_formats_and_an_empty_cache_gives_the_same_bytes(debian: Debian) -> None:
    if debian.user_build is None:
        pytest.skip("needs root, setpriv and a /usr/bin/python3 of this run's version, to be an ordinary user")
    assert debian.user_build.returncode == 0, debian.user_build.stderr
    for fmt in ("ext4", "squashfs"):
        mine = debian.user_out / "images" / f"debian.{fmt}"
        assert mine.stat().st_uid == 65534
        assert sha256_file(mine) == sha256_file(debian.image(fmt)), fmt  # two empty caches, two users: same bytes
    manifest = json.loads((debian.world.out / "images" / "debian.manifest.json").read_text())
    assert manifest["template"]["manifest"] == ociimages.DEBIAN_MANIFEST
    assert manifest["template"]["package_database"] == "dpkg"
    assert manifest["source_date_epoch"] == ociimages.EPOCH  # the config's created
    packages = {p["name"]: p for p in manifest["packages"]}
    assert len(packages) == 68 and packages["python3.11-minimal"]["version"] == "3.11.2-6+deb12u8"
    assert "usr/bin/python3.11" in packages["python3.11-minimal"]["files"]
    spdx = json.loads((debian.world.out / "images" / "debian.spdx.json").read_text())
    purls = {r["referenceLocator"] for p in spdx["packages"] for r in p.get("externalRefs", [])}
    assert "pkg:deb/debian/libc6@2.36-9%2Bdeb12u14?arch=amd64" in purls
    layers = [p for p in spdx["packages"] if p["SPDXID"].startswith("SPDXRef-Layer-")]
    assert [p["versionInfo"] for p in layers] == [x["digest"] for x in manifest["template"]["layers"]]


def test_the_image_holds_the_flattened_layers_and_vulcans_part(debian: Debian, tmp_path: Path) -> None:
    from scripts.formats import squashfs_read

    found = squashfs_read.entries(debian.image("squashfs"))
    assert "etc/motd" not in found  # layer 2's whiteout
    assert [p for p in found if p.startswith("usr/share/doc/")] == []  # its opaque directory: emptied
    assert found["usr/sbin/init"].inode.target == "/usr/local/bin/vulcan-guest"  # through the merged /usr
    assert found["work"].inode.uid == 1000
    passwd = squashfs_read.cat(debian.image("squashfs"), "etc/passwd").decode()
    assert "sandbox:x:1000:1000:Vulcan sandbox:/work:/bin/sh" in passwd.splitlines()


def test_verify_checks_every_packaged_file_against_the_layers_and_runs_the_glibc_python(debian: Debian) -> None:
    proc = debian.world.run("verify", "--json", "--reproduce", "--arch", ARCH,
                            VULCAN_REGISTRY_INSECURE=debian.registry.host)  # fmt: skip
    rows = {(r["artifact"], r["check"]): r for r in json.loads(proc.stdout)["rows"]}
    for fmt in ("ext4", "squashfs"):
        name = f"images/debian.{fmt}"
        for check in ("sha256 = manifest", "agent = bin/vulcan-guest", "/sbin/init starts the agent",
                      "package files intact", "package files = layers", "runtime runs", "--reproduce"):  # fmt: skip
            assert rows[(name, check)]["result"] == "pass", rows[(name, check)]
        assert rows[(name, "runtime runs")]["detail"] == "python3 --version: Python 3.11.2"
        assert rows[(name, "package files = layers")]["detail"].endswith("files, sha256 each")


def test_verify_finds_a_file_that_is_not_what_the_layers_give(debian: Debian) -> None:
    """An image whose os.py was changed in place (same size), with a manifest that agrees with it:
    only the comparison with the layers finds it."""
    w = debian.world
    image, manifest = debian.image("ext4"), w.out / "images" / "debian.manifest.json"
    saved = {image: image.read_bytes(), manifest: manifest.read_bytes()}
    try:
        found = subprocess.run(["debugfs", "-R", "bmap /usr/lib/python3.11/os.py 0", str(image)], capture_output=True,
                               text=True, check=True)  # fmt: skip
        with open(image, "r+b") as f:  # the file's first block, in the image itself
            f.seek(int(found.stdout.split()[0]) * 4096)
            f.write(b"#")
        doc = json.loads(saved[manifest])
        doc["sha256"] = doc["images"][0]["sha256"] = sha256_file(image)
        manifest.write_text(json.dumps(doc))
        proc = w.run("verify", "--json", "--arch", ARCH, VULCAN_REGISTRY_INSECURE=debian.registry.host)
        rows = {(r["artifact"], r["check"]): r for r in json.loads(proc.stdout)["rows"]}
        assert rows[("images/debian.ext4", "package files intact")]["result"] == "pass"  # sizes: as packaged
        row = rows[("images/debian.ext4", "package files = layers")]
        assert row["result"] == "FAIL" and "/usr/lib/python3.11/os.py" in row["detail"], row
    finally:
        for path, data in saved.items():
            path.write_bytes(data)


@pytest.mark.skipif(not TEST_KERNEL.is_file(), reason="../shared/testdata/kernel/vmlinux.xz is absent")
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed")
@pytest.mark.parametrize("fmt", ["ext4", "squashfs"])
def test_qemu_boots_the_template_to_the_agent_in_both_formats(debian: Debian, tmp_path: Path, fmt: str) -> None:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(lzma.decompress(TEST_KERNEL.read_bytes()))
    before = sha256_file(debian.image(fmt))
    proc = debian.world.run("boot", "--vmm", "qemu", "--format", fmt, "--kernel", str(kernel), "debian")
    assert proc.returncode == 0, proc.stderr
    root = "ext4" if fmt == "ext4" else "overlay"  # squashfs: the agent was overlay-init (no shell, no mount)
    assert f"Python 3.11.2 | root={root} writable=/work,/etc vulcan-mounts=none" in proc.stderr, proc.stderr
    assert sha256_file(debian.image(fmt)) == before


def test_publish_and_pull_deliver_the_template_signed(debian: Debian, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    pem, pub = tmp_path / "k.pem", tmp_path / "k.pub"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))  # fmt: skip
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    out = tmp_path / "published.json"
    proc = debian.world.run("publish", "--to", f"{debian.registry.host}/acme/templates", "--key", str(pem),
                            "--digests", str(out), "--insecure", "--arch", ARCH)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ref = json.loads(out.read_text())["published"]["debian"]["reference"]
    dest = tmp_path / "host"
    proc = debian.world.run("pull", ref, "--dest", str(dest), "--trust", str(pub), "--insecure")
    assert proc.returncode == 0, proc.stderr
    for fmt in ("ext4", "squashfs"):
        assert sha256_file(dest / "images" / f"debian.{fmt}") == sha256_file(debian.image(fmt))


# -- the real Firecracker, to user space (a kernel this machine's KVM runs: minutes) ------------------


@pytest.fixture(scope="module")
def firecracker(debian: Debian) -> Debian:
    require_real_firecracker()
    if not EMULATED_KERNEL.is_file():
        pytest.skip(f"{EMULATED_KERNEL} is absent: no kernel this machine's KVM runs to user space")
    w = debian.world
    serve_real_firecracker(w)
    kernel = w.pins["kernel"]
    vmlinux = lzma.decompress(EMULATED_KERNEL.read_bytes())
    kernel["sha256"][ARCH] = sha256(vmlinux)
    w.mirror.add(kernel["url"].format(version=kernel["version"], arch=ARCH), vmlinux)
    proc = w.run("download", "--arch", ARCH)
    assert proc.returncode == 0, proc.stderr
    return debian


@pytest.mark.userspace
def test_firecracker_boots_the_template_and_its_glibc_python_prints_42(firecracker: Debian, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    proc = firecracker.world.run("boot", "--vmm", "firecracker", "--format", "ext4", "--report", str(report), "debian")
    [r] = json.loads(report.read_text())
    assert proc.returncode == 0 and r["ok"], (r, proc.stderr)
    assert r["detail"] == "Python 3.11.2; program printed '42'", r
    figures.add(f"boot template debian ext4 (Firecracker): boot-to-ready {r['seconds']:.1f} s")


@pytest.mark.userspace
def test_a_snapshot_of_the_template_restores_and_runs_the_program(firecracker: Debian, tmp_path: Path) -> None:
    w = firecracker.world
    proc = w.run("snapshot", "--format", "ext4", "debian")
    assert proc.returncode == 0, proc.stderr
    report = tmp_path / "r.json"
    proc = w.run(
        "boot", "--restore", "--format", "ext4", "--count", "2", "--no-cold", "--report", str(report), "debian"
    )
    assert proc.returncode == 0, proc.stderr
    [r] = json.loads(report.read_text())
    assert r["ok"] and [c["detail"] for c in r["clones"]] == ["program printed '42'"] * 2, r
