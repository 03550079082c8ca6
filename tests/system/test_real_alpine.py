"""The slow part of tests/quick/test_real_alpine.py (see its docstring)."""

from __future__ import annotations

import lzma
import shutil

import pytest

from scripts.arch import host_arch
from tests.quick.test_real_alpine import TEST_KERNEL
from tests.support.world import World

pytestmark = pytest.mark.skipif(host_arch() != "x86_64", reason="the real repository in ../shared is x86_64")


@pytest.mark.skipif(not TEST_KERNEL.is_file(), reason="../shared/testdata/kernel/vmlinux.xz is absent")
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed")
def test_a_real_alpine_image_boots(alpine: World) -> None:
    kernel = alpine.tmp / "vmlinux"
    kernel.write_bytes(lzma.decompress(TEST_KERNEL.read_bytes()))
    proc = alpine.run("boot", "--vmm", "qemu", "--kernel", str(kernel), "apk")
    assert proc.returncode == 0, proc.stderr
    assert "vulcan-smoke: ok" in (alpine.out / "images/.boot/apk.ext4.qemu.console.log").read_text()
