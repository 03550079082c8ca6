"""Cross-arch: an aarch64 image is built on this host without emulation (no package code
runs), with a cross-compiled agent; verify checks machine types and runs the aarch64 runtime
under qemu-user; the image boots under qemu-system-aarch64 in both formats."""

from __future__ import annotations

import json
import lzma
import shutil

import pytest

from scripts.arch import host_arch
from scripts.elf import read_elf
from scripts.formats import ext4_read as debugfs
from tests.support import imagerepo
from tests.support.toolchains import find_go
from tests.support.world import SHARED, World

pytestmark = [
    pytest.mark.skipif(shutil.which("mke2fs") is None, reason="e2fsprogs is not installed"),
    pytest.mark.skipif(host_arch() != "x86_64", reason="written for an x86_64 host building aarch64"),
]


def test_aarch64_image_on_an_x86_64_host(world: World) -> None:
    imagerepo.setup(world, arch="aarch64")
    world.run("guest", "--arch", "aarch64", check=True, VULCAN_GO=find_go())
    proc = world.run("rootfs", "--arch", "aarch64", "--runtime", "python", check=True)
    assert "rootfs python (aarch64)" in proc.stderr
    img = world.out / "images/aarch64/python.ext4"
    manifest = json.loads((world.out / "images/aarch64/python.manifest.json").read_text())
    assert manifest["arch"] == "aarch64" and {p["arch"] for p in manifest["packages"]} == {"aarch64"}
    agent = world.tmp / "agent"
    agent.write_bytes(debugfs.cat(img, "usr/local/bin/vulcan-guest"))
    assert read_elf(agent).machine == "aarch64"
    assert debugfs.cat(img, "etc/apk/arch") == b"aarch64\n"
    assert not (world.out / "images/python.ext4").exists()  # the host arch's place is untouched
    out = world.run("verify", "--arch", "aarch64", "--json")
    report = json.loads(out.stdout)
    rows = {(r["artifact"], r["check"]): r for r in report["rows"]}
    assert out.returncode == 0, [r for r in report["rows"] if r["result"] == "FAIL"]
    assert rows[("bin/aarch64/vulcan-guest", "static aarch64 ELF")]["result"] == "pass"
    runs = rows[("images/aarch64/python.ext4", "runtime runs")]
    if shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64"):
        assert runs["result"] == "pass" and "Python 3.14.7" in runs["detail"] and "qemu-aarch64" in runs["detail"], runs
    else:
        assert runs["result"] == "skip" and "install qemu-user-static" in runs["detail"]
    assert rows[("images/aarch64/python.ext4", "package files intact")]["result"] == "pass"


ARM64_KERNEL = SHARED / "kernel" / "arm64" / "Image.xz"


@pytest.mark.skipif(not ARM64_KERNEL.is_file(), reason="../shared/testdata/kernel/arm64/Image.xz is absent")
@pytest.mark.skipif(shutil.which("qemu-system-aarch64") is None, reason="qemu-system-arm is not installed")
@pytest.mark.skipif(imagerepo.static_busybox("aarch64") is None,
                    reason=f"no arm64 busybox-static in {imagerepo.ARM64} (.ci/setup-debian unpacks it)")  # fmt: skip
def test_aarch64_images_boot_under_qemu_in_both_formats(world: World) -> None:
    """An aarch64 image, ext4 and squashfs (read-only, overlay), boots under qemu-system-aarch64
    (TCG) with the arm64 test kernel to the agent's smoke check."""
    imagerepo.setup(world, arch="aarch64", runtimes={"python": imagerepo.RUNTIMES["python"]})
    formats = ["ext4", "squashfs"] if shutil.which("tar2sqfs") else ["ext4"]
    world.pins["alpine"]["formats"] = formats
    world.run("guest", "--arch", "aarch64", check=True, VULCAN_GO=find_go())
    world.run("rootfs", "--arch", "aarch64", "--runtime", "python", check=True)
    kernel = world.tmp / "Image"
    kernel.write_bytes(lzma.decompress(ARM64_KERNEL.read_bytes()))
    for fmt in formats:
        report = world.tmp / f"boot-{fmt}.json"
        proc = world.run("boot", "--arch", "aarch64", "--vmm", "qemu", "--kernel", str(kernel), "--format", fmt,
                         "--report", str(report), "python")  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        result = json.loads(report.read_text())[0]
        assert result["ok"] and "Python 3.14.7" in result["detail"], result
        assert ("root=overlay" if fmt == "squashfs" else "root=ext4") in result["detail"]
