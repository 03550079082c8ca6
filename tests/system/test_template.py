"""Templates through the real docker-registry (the slow part of tests/quick/test_template.py).

The real Debian bookworm OCI image (glibc python3): built as an ordinary user in both formats,
rebuilt bit for bit from an empty cache, verified, booted under QEMU (both formats) and the real
Firecracker (the emulated-host kernel), snapshotted and restored, published and pulled. Small
images made here of real Alpine v3.19.1 packages: OCI and Docker media types, gzip, zstd and
uncompressed layers, indexes, tags, a swapped layer, credentials, an artifact, TLS, the mirror."""

from __future__ import annotations

import copy
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from scripts.hashing import sha256_file
from tests.support import figures, ociimages
from tests.support.mirror import serve
from tests.support.ociimages import GZ, TAR, ZSTD, Image, entry, layer_tar
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


# -- small images of real Alpine packages, through the real registry: media types, indexes, the bad cases --


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    ociimages.require_skopeo()
    with running_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="module")
def alpine_layers() -> list[bytes]:
    ociimages.require_alpine_packages()
    base = ociimages.apk_layer(["musl", "busybox", "alpine-baselayout-data"])
    # alpine-baselayout-data's /etc/motd is whited out (as a Dockerfile's RUN rm -f /etc/motd leaves it)
    extra = layer_tar([entry("etc/vulcan-test", b"from the upper layer\n"), entry("etc/.wh.motd", b"")])
    return [base, extra]


def _template_world(tmp: Path, agent_bin: Path, gocache: Path, reference: str) -> World:
    from tests.support.mirror import Mirror

    w = World(Mirror(), tmp, copy.deepcopy(BASE_PINS), gocache, agent_bin)
    w.pins["alpine"]["runtimes"] = {"small": {"image": {"reference": reference}, "check": ["busybox", "true"],
                                              "binary": "/bin/busybox"}}  # fmt: skip
    w.use_agent()
    w.write_pins()
    return w


MEDIA = [("oci-gzip", GZ, []), ("oci-zstd", ZSTD, []), ("oci-tar", TAR, ["--preserve-digests"]),
         ("docker-v2s2", GZ, ["--format", "v2s2"])]  # fmt: skip


def test_a_small_image_in_every_media_type_builds_the_same_stream(
    registry: RunningRegistry, alpine_layers: list[bytes], agent_bin: Path, go_build_cache: Path, tmp_path: Path
) -> None:
    streams = {}
    for name, media, args in MEDIA:
        layout = tmp_path / name / "layout"
        ociimages.write_layout(layout, [Image([(t, media) for t in alpine_layers])])
        ociimages.copy_to(registry.host, str(layout), f"small/{name}:1", *args)
        w = _template_world(tmp_path / name / "w", agent_bin, go_build_cache, f"{registry.host}/small/{name}:1")
        env = {"VULCAN_REGISTRY_INSECURE": registry.host, "VULCAN_KEEP_TAR": str(tmp_path / name / "tar")}
        lock = w.run("lock", "--arch", "x86_64", **env)
        assert lock.returncode == 0, lock.stderr
        locked = json.loads((w.pins_path.parent / "alpine.lock.json").read_text())["entries"]["small/x86_64"]["image"]
        want = {"application/vnd.docker.image.rootfs.diff.tar.gzip"} if "v2s2" in args else {media}  # Docker Hub's
        assert {x["media_type"] for x in locked["layers"]} == want, name
        build = w.run("rootfs", "--arch", "x86_64", **env)
        assert build.returncode == 0, build.stderr
        with tarfile.open(tmp_path / name / "tar" / "small-x86_64.tar") as t:
            names = set(t.getnames())
            assert t.extractfile("etc/vulcan-test").read() == b"from the upper layer\n"  # type: ignore[union-attr]
        assert "etc/motd" not in names and "bin/busybox" in names and "lib/ld-musl-x86_64.so.1" in names
        manifest = json.loads((w.out / "images" / "small.manifest.json").read_text())
        assert manifest["template"]["manifest"] == locked["manifest"]
        assert manifest["template"]["package_database"] == "none found"  # the layers hold no apk database
        streams[name] = manifest["tar_sha256"]
    assert len(set(streams.values())) == 1, streams  # the same files, however they were packed


def test_an_index_is_resolved_per_architecture_and_a_missing_one_said(
    registry: RunningRegistry, alpine_layers: list[bytes], agent_bin: Path, go_build_cache: Path, tmp_path: Path
) -> None:
    layout = tmp_path / "layout"
    digests = ociimages.write_layout(layout, [Image([(alpine_layers[0], GZ)], "amd64"),
                                              Image([(layer_tar([entry("arm", b"64")]), GZ)], "arm64")])  # fmt: skip
    ociimages.copy_to(registry.host, str(layout), "small/multi:1", "--all")
    w = _template_world(tmp_path / "w", agent_bin, go_build_cache, f"{registry.host}/small/multi@{digests['index']}")
    env = {"VULCAN_REGISTRY_INSECURE": registry.host}
    assert w.run("lock", **env).returncode == 0
    entries = json.loads((w.pins_path.parent / "alpine.lock.json").read_text())["entries"]
    assert entries["small/x86_64"]["image"]["index"] == digests["index"]
    assert entries["small/x86_64"]["image"]["manifest"] == digests["amd64"]
    assert entries["small/aarch64"]["image"]["manifest"] == digests["arm64"]
    # an image without this architecture: the lock says so and goes on; a build says it plainly
    one = tmp_path / "one"
    ociimages.write_layout(one, [Image([(alpine_layers[0], GZ)], "amd64")])
    ociimages.copy_to(registry.host, str(one), "small/amd64-only:1")
    w2 = _template_world(tmp_path / "w2", agent_bin, go_build_cache, f"{registry.host}/small/amd64-only:1")
    proc = w2.run("lock", **env)
    assert proc.returncode == 0 and "lock small/aarch64:" in proc.stderr, proc.stderr
    assert "its config says linux/amd64, not linux/arm64; not locked" in proc.stderr


def test_a_tag_is_refused_by_a_build_and_a_digest_is_resolved_once(
    registry: RunningRegistry, alpine_layers: list[bytes], agent_bin: Path, go_build_cache: Path, tmp_path: Path
) -> None:
    layout = tmp_path / "layout"
    digests = ociimages.write_layout(layout, [Image([(alpine_layers[0], GZ)])])
    ociimages.copy_to(registry.host, str(layout), "small/pinned:1")
    env = {"VULCAN_REGISTRY_INSECURE": registry.host}
    w = _template_world(tmp_path / "w", agent_bin, go_build_cache, f"{registry.host}/small/pinned:1")
    proc = w.run("rootfs", "--arch", "x86_64", **env)
    assert proc.returncode == 2 and "names a tag, which a build does not resolve" in proc.stderr
    assert "run 'nox -s lock'" in proc.stderr and not (w.out / "images").exists()
    w = _template_world(tmp_path / "w2", agent_bin, go_build_cache,
                        f"{registry.host}/small/pinned@{digests['amd64']}")  # fmt: skip
    assert w.run("rootfs", "--arch", "x86_64", "--frozen", **env).returncode == 4  # --frozen: the lock decides
    proc = w.run("rootfs", "--arch", "x86_64", **env)
    assert proc.returncode == 0, proc.stderr
    assert "resolving the template small/x86_64" in proc.stderr
    # plain HTTP only for a registry named in VULCAN_REGISTRY_INSECURE
    w3 = _template_world(tmp_path / "w3", agent_bin, go_build_cache, f"{registry.host}/small/pinned@{digests['amd64']}")
    proc = w3.run("rootfs", "--arch", "x86_64")
    assert proc.returncode == 3 and "127.0.0.1" in proc.stderr, proc.stderr


def test_a_registry_serving_other_bytes_for_a_layer_is_refused_and_nothing_kept(
    registry: RunningRegistry, alpine_layers: list[bytes], agent_bin: Path, go_build_cache: Path, tmp_path: Path
) -> None:
    layout = tmp_path / "layout"
    ociimages.write_layout(layout, [Image([(alpine_layers[0], GZ)])])
    ociimages.copy_to(registry.host, str(layout), "small/swapped:1")
    env = {"VULCAN_REGISTRY_INSECURE": registry.host}
    w = _template_world(tmp_path / "w", agent_bin, go_build_cache, f"{registry.host}/small/swapped:1")
    assert w.run("lock", "--arch", "x86_64", **env).returncode == 0
    layer = json.loads((w.pins_path.parent / "alpine.lock.json").read_text())["entries"]["small/x86_64"]["image"][
        "layers"][0]["digest"]  # fmt: skip
    data = next(p for p in registry.storage.rglob("data") if p.parent.name == layer[7:])
    original = data.read_bytes()
    data.write_bytes(original[:-10] + b"X" * 10)  # the registry's own store, changed under it
    try:
        proc = w.run("rootfs", "--arch", "x86_64", **env)
    finally:
        data.write_bytes(original)
    assert proc.returncode == 6 and f"layer {layer} was served as" in proc.stderr and "refused" in proc.stderr
    kept = [p.name for p in (w.cache / "sha256").rglob(layer[7:] + "*") if p.suffix != ".lock"]
    assert kept == [] and not (w.out / "images").exists()


def test_credentials_come_from_docker_config_by_host_never_from_the_publish_variables(
    alpine_layers: list[bytes], agent_bin: Path, go_build_cache: Path, tmp_path: Path
) -> None:
    """VULCAN_REGISTRY_USER/PASSWORD name no registry: a build that may reach several registries
    (one per template) does not send them anywhere; Docker's config.json says whose they are."""
    import base64

    from tests.support.registry import PASSWORD, USER

    ociimages.require_skopeo()
    layout = tmp_path / "layout"
    digests = ociimages.write_layout(layout, [Image([(alpine_layers[0], GZ)])])
    with running_registry(tmp_path / "reg", auth="htpasswd") as reg:
        proc = subprocess.run([ociimages.require_skopeo(), "copy", "-q", "--dest-tls-verify=false", "--dest-creds",
                               f"{USER}:{PASSWORD}", f"oci:{layout}", f"docker://{reg.host}/private/x:1"],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        ref = f"{reg.host}/private/x@{digests['amd64']}"
        env = {"VULCAN_REGISTRY_INSECURE": reg.host, "VULCAN_REGISTRY_USER": USER, "VULCAN_REGISTRY_PASSWORD": PASSWORD}
        w = _template_world(tmp_path / "w", agent_bin, go_build_cache, ref)
        proc = w.run("rootfs", "--arch", "x86_64", **env)
        assert proc.returncode == 3 and "401" in proc.stderr, proc.stderr
        docker = tmp_path / "docker"
        docker.mkdir()
        token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        (docker / "config.json").write_text(json.dumps({"auths": {reg.host: {"auth": token}}}))
        proc = w.run("rootfs", "--arch", "x86_64", DOCKER_CONFIG=str(docker), **env)
        assert proc.returncode == 0, proc.stderr


def test_an_artifact_is_not_a_template_and_a_tls_registry_needs_its_ca(
    alpine_layers: list[bytes], agent_bin: Path, go_build_cache: Path, tmp_path: Path
) -> None:
    """An OCI artifact (a signature, a chart) named as a template is said to be one; a registry
    with a certificate of a private CA is reached with VULCAN_REGISTRY_CA, and refused without."""
    from scripts.registry import oci
    from scripts.registry.client import Registry

    ociimages.require_skopeo()
    with running_registry(tmp_path / "reg", tls=True) as reg:
        assert reg.ca is not None
        client = Registry(reg.host, ca=reg.ca.cert)
        config = oci.empty_config()
        layer = oci.Blob("application/vnd.cncf.helm.chart.content.v1.tar+gzip", *_digest_size(b"chart"), data=b"chart")
        for blob in (config, layer):
            client.push_blob("art/chart", blob)
        body = oci.manifest("application/vnd.cncf.helm.config.v1+json", [layer])
        client.put_manifest("art/chart", "1", body, oci.MANIFEST)
        w = _template_world(tmp_path / "w", agent_bin, go_build_cache, f"{reg.host}/art/chart:1")
        proc = w.run("lock", "--arch", "x86_64", VULCAN_REGISTRY_CA=str(reg.ca.cert))
        assert proc.returncode == 4 and "is not an image config" in proc.stderr, proc.stderr
        assert "an artifact (a Helm chart, a signature) is not an image" in proc.stderr
        # an image on the same registry: the CA makes it reachable, and only the CA
        layout = tmp_path / "layout"
        digests = ociimages.write_layout(layout, [Image([(alpine_layers[0], GZ)])])
        ociimages.copy_to(reg.host, str(layout), "img/x:1")
        w2 = _template_world(tmp_path / "w2", agent_bin, go_build_cache, f"{reg.host}/img/x@{digests['amd64']}")
        proc = w2.run("rootfs", "--arch", "x86_64")
        assert proc.returncode == 3 and "certificate" in proc.stderr.lower(), proc.stderr
        proc = w2.run("rootfs", "--arch", "x86_64", VULCAN_REGISTRY_CA=str(reg.ca.cert))
        assert proc.returncode == 0, proc.stderr


def _digest_size(data: bytes) -> tuple[str, int]:
    return "sha256:" + hashlib.sha256(data).hexdigest(), len(data)


def test_a_mirror_directory_holds_a_template_and_a_build_from_it_needs_no_registry(
    registry: RunningRegistry, alpine_layers: list[bytes], agent_bin: Path, go_build_cache: Path, tmp_path: Path
) -> None:
    """`nox -s mirror` writes the template's manifest, config and layers at the registry URLs that
    serve them; `VULCAN_MIRROR=DIR` builds the same bytes from them without the registry (which,
    on plain HTTP and not named in VULCAN_REGISTRY_INSECURE, the build could not reach anyway)."""
    import shutil

    from tests.support import imagerepo
    from tests.support.mirror import serve
    from tests.support.world import go_release, serve_vmm

    layout = tmp_path / "layout"
    ociimages.write_layout(layout, [Image([(t, GZ) for t in alpine_layers])])
    ociimages.copy_to(registry.host, str(layout), "small/mirrored:1")
    mirror, server = serve()
    try:
        (tmp_path / "w").mkdir()
        w = serve_vmm(World(mirror, tmp_path / "w", copy.deepcopy(BASE_PINS), go_build_cache, agent_bin))
        imagerepo.setup(w)
        for arch, goarch in (("x86_64", "amd64"), ("aarch64", "arm64")):
            data = go_release(f"#!/bin/sh\necho go {arch}\n")
            w.pins["go"]["sha256"][arch] = sha256(data)
            w.mirror.add(w.pins["go"]["url"].format(version=w.pins["go"]["version"], goarch=goarch), data)
        w.pins["alpine"]["runtimes"] = {"small": {"image": {"reference": f"{registry.host}/small/mirrored:1"},
                                                  "check": ["busybox", "true"], "binary": "/bin/busybox"}}  # fmt: skip
        w.pins["alpine"]["formats"] = ["ext4", "squashfs"]
        w.use_agent()
        online = {"VULCAN_REGISTRY_INSECURE": registry.host}
        assert w.run("lock", "--arch", "x86_64", **online).returncode == 0
        d = tmp_path / "mirror"
        proc = w.run("mirror", str(d), "--arch", "x86_64", "--frozen", "--no-wheels", **online)
        assert proc.returncode == 0, proc.stderr
        files = json.loads((d / "vulcan-mirror.json").read_text())["files"]
        image = json.loads((w.pins_path.parent / "alpine.lock.json").read_text())["entries"]["small/x86_64"]["image"]
        base = f"https://{registry.host}/v2/small/mirrored"
        want = {f"{base}/manifests/{image['manifest']}", f"{base}/blobs/{image['config']}"}
        want |= {f"{base}/blobs/{x['digest']}" for x in image["layers"]}
        assert want <= set(files)
        assert w.run("rootfs", "--arch", "x86_64", **online).returncode == 0  # the connected build
        out, cache = tmp_path / "out", tmp_path / "cache"
        shutil.copytree(w.out / "bin", out / "bin")
        offline = {"VULCAN_OUT": str(out), "VULCAN_CACHE": str(cache), "VULCAN_MIRROR": f"file://{d}"}
        proc = w.run("rootfs", "--arch", "x86_64", "--frozen", **offline)
        assert proc.returncode == 0, proc.stderr
        for fmt in ("ext4", "squashfs"):
            assert sha256(( out / "images" / f"small.{fmt}").read_bytes()) == sha256(
                (w.out / "images" / f"small.{fmt}").read_bytes())  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
