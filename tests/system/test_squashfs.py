"""The slow part of tests/quick/test_squashfs.py (see its docstring)."""

from __future__ import annotations

import json
import lzma
import shutil

import pytest

from scripts.arch import host_arch
from tests.quick.test_squashfs import TEST_KERNEL, sha
from tests.support.world import World

pytestmark = [
    pytest.mark.skipif(shutil.which("tar2sqfs") is None, reason="squashfs-tools-ng (tar2sqfs) is not installed"),
    pytest.mark.skipif(shutil.which("mke2fs") is None, reason="e2fsprogs is not installed"),
]
BOTH = ["ext4", "squashfs"]


@pytest.mark.skipif(host_arch() != "x86_64", reason="the x86_64 test kernel")
@pytest.mark.skipif(not TEST_KERNEL.is_file(), reason="../shared/testdata/kernel/vmlinux.xz is absent")
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed")
@pytest.mark.parametrize(("fmt", "extra"), [("squashfs", []), ("squashfs", ["--overlay", "disk"]),
                                            ("ext4", ["--read-only"])])  # fmt: skip
def test_a_read_only_image_boots_with_a_writable_overlay_and_is_not_changed(
    squashfs_built: World, fmt: str, extra: list[str]
) -> None:
    """The image is attached read-only and in place: nothing is copied, /work and /etc are
    writable in the guest (the overlay), and the image file is the same afterwards."""
    kernel = squashfs_built.tmp / "vmlinux"
    if not kernel.exists():
        kernel.write_bytes(lzma.decompress(TEST_KERNEL.read_bytes()))
    image = squashfs_built.out / "images" / f"python.{fmt}"
    before = sha(image)
    report = squashfs_built.tmp / f"boot-{fmt}-{'-'.join(extra)}.json"
    proc = squashfs_built.run("boot", "--vmm", "qemu", "--kernel", str(kernel), "--format", fmt, *extra,
                     "--report", str(report), "python")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(report.read_text())[0]
    assert result["ok"] and result["format"] == fmt and result["copied_bytes"] == 0
    assert "root=overlay writable=/work,/etc" in result["detail"], result
    # overlay-init detached the read-only root and the upper layer: a sandbox sees neither
    assert "vulcan-mounts=none" in result["detail"], result
    assert sha(image) == before


@pytest.mark.skipif(host_arch() != "x86_64", reason="the x86_64 test kernel")
@pytest.mark.skipif(not TEST_KERNEL.is_file(), reason="../shared/testdata/kernel/vmlinux.xz is absent")
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed")
@pytest.mark.parametrize(
    ("append", "refused"),
    [
        ("vulcan.overlay=/dev/vda", "vulcan-overlay: fail vulcan.overlay=/dev/vda: expected tmpfs or a drive"),
        ("vulcan.overlay_size=1m,nr_inodes=1", "vulcan-overlay: fail vulcan.overlay_size=1m,nr_inodes=1: expected"),
        ("vulcan.overlay_size=64m", None),
    ],
)
def test_overlay_init_takes_only_a_known_upper_layer_and_a_plain_size(
    squashfs_built: World, append: str, refused: str | None
) -> None:
    """The last word of the command line wins: a device that is not a spare drive, or mount
    options smuggled into the size, stop the boot with a console message; a plain size boots."""
    kernel = squashfs_built.tmp / "vmlinux"
    if not kernel.exists():
        kernel.write_bytes(lzma.decompress(TEST_KERNEL.read_bytes()))
    report = squashfs_built.tmp / f"boot-append-{abs(hash(append))}.json"
    proc = squashfs_built.run("boot", "--vmm", "qemu", "--kernel", str(kernel), "--format", "squashfs",
                              "--append", append, "--report", str(report), "--timeout", "120", "python")  # fmt: skip
    result = json.loads(report.read_text())[0]
    if refused is None:
        assert proc.returncode == 0 and result["ok"], result
        assert "vulcan-mounts=none" in result["detail"], result
    else:
        assert proc.returncode == 1 and not result["ok"], result
        assert refused in result["detail"], result
