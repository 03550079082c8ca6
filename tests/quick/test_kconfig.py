"""The guest kernel's embedded configuration: verify says whether it can mount the images, and
boot refuses a kernel that cannot, before starting a VM. The kernel that lacks an option is made
here (an ELF carrying an IKCFG_ST gzip blob); the real test kernels must pass."""

from __future__ import annotations

import gzip
import json
import lzma
from pathlib import Path

import pytest

from scripts import kconfig
from tests.support import imagerepo
from tests.support.world import SHARED, World, sha256

KERNELS = {"x86_64": SHARED / "kernel" / "vmlinux.xz", "aarch64": SHARED / "kernel" / "arm64" / "Image.xz"}
FULL = ["VIRTIO_BLK", "VIRTIO_VSOCKETS", "DEVTMPFS", "PID_NS", "EXT4_FS", "SQUASHFS", "SQUASHFS_ZSTD", "OVERLAY_FS",
        "TMPFS"]  # fmt: skip


def fake_kernel(options: list[str]) -> bytes:
    config = "".join(f"CONFIG_{o}=y\n" for o in options) + "# CONFIG_EROFS_FS is not set\n"
    return b"\x7fELF" + b"\0" * 4000 + b"IKCFG_ST" + gzip.compress(config.encode(), mtime=0) + b"IKCFG_ED" + b"\0" * 64


@pytest.mark.parametrize("arch", sorted(KERNELS))
def test_the_real_test_kernels_can_mount_both_formats(arch: str, tmp_path: Path) -> None:
    if not KERNELS[arch].is_file():
        pytest.skip(f"{KERNELS[arch]} is absent")
    kernel = tmp_path / "k"
    kernel.write_bytes(lzma.decompress(KERNELS[arch].read_bytes()))
    config = kconfig.read(kernel)
    assert config is not None and config.get("IKCONFIG") == "y"
    assert kconfig.missing(config, ["ext4", "squashfs"]) == []


def test_a_missing_option_is_named(tmp_path: Path) -> None:
    k = tmp_path / "k"
    k.write_bytes(fake_kernel([o for o in FULL if o != "SQUASHFS_ZSTD"]))
    config = kconfig.read(k)
    assert config is not None
    assert kconfig.missing(config, ["ext4"]) == []
    assert kconfig.missing(config, ["ext4", "squashfs"]) == ["CONFIG_SQUASHFS_ZSTD"]
    k.write_bytes(b"\x7fELF" + b"\0" * 100)
    assert kconfig.read(k) is None


def test_a_kernel_without_pid_namespaces_is_named_and_vsock_loopback_is_a_warning(tmp_path: Path) -> None:
    """The agent contains each program in a PID namespace; vsock loopback lets a guest process
    reach guest-side vsock listeners (the agent refuses it; a sandbox kernel should not have it)."""
    k = tmp_path / "k"
    k.write_bytes(fake_kernel([o for o in FULL if o != "PID_NS"] + ["VSOCKETS_LOOPBACK"]))
    config = kconfig.read(k)
    assert config is not None
    assert kconfig.missing(config, ["ext4"]) == ["CONFIG_PID_NS"]
    assert [r.split(":")[0] for r in kconfig.risky(config)] == ["CONFIG_VSOCKETS_LOOPBACK=y"]
    k.write_bytes(fake_kernel(FULL))
    assert kconfig.risky(kconfig.read(k) or {}) == []


def _with_kernel(world: World, data: bytes) -> None:
    imagerepo.setup(world, runtimes={"python": imagerepo.RUNTIMES["python"]})
    world.pins["alpine"]["formats"] = ["ext4", "squashfs"]
    kernel = world.pins["kernel"]
    for arch in ("x86_64", "aarch64"):
        kernel["sha256"][arch] = sha256(data)
        world.mirror.add(kernel["url"].format(version=kernel["version"], arch=arch), data)
    world.run("download", check=True)


def test_verify_fails_naming_the_option_a_kernel_lacks(world: World) -> None:
    _with_kernel(world, fake_kernel([o for o in FULL if o != "OVERLAY_FS"]))
    rows = json.loads(world.run("verify", "--json").stdout)["rows"]
    row = next(r for r in rows if r["check"].startswith("config can mount"))
    assert row["result"] == "FAIL" and row["detail"] == "lacks CONFIG_OVERLAY_FS"
    assert row["check"] == "config can mount ext4, squashfs"


def test_verify_skips_a_kernel_without_an_embedded_configuration(world: World) -> None:
    _with_kernel(world, b"\x7fELF" + b"no config here" * 100)
    rows = json.loads(world.run("verify", "--json").stdout)["rows"]
    row = next(r for r in rows if r["check"].startswith("config can mount"))
    assert row["result"] == "skip" and "CONFIG_IKCONFIG" in row["detail"]


def test_boot_refuses_a_kernel_that_cannot_mount_squashfs(world: World, tmp_path: Path) -> None:
    _with_kernel(world, fake_kernel([o for o in FULL if o != "SQUASHFS"]))
    images = world.out / "images"
    images.mkdir(parents=True)
    (images / "python.squashfs").write_bytes(b"hsqs")  # never opened: the kernel is refused first
    proc = world.run("boot", "--vmm", "qemu", "--format", "squashfs", "python")
    assert proc.returncode == 8 and "Traceback" not in proc.stderr
    assert "its configuration lacks CONFIG_SQUASHFS" in proc.stderr and "hint:" in proc.stderr
