"""The slow part of tests/quick/test_verify_boot.py (see its docstring)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.quick.test_verify_boot import ARCH, TEST_KERNEL
from tests.support.world import World

pytestmark = pytest.mark.skipif(shutil.which("mke2fs") is None, reason="e2fsprogs is not installed")


@pytest.mark.skipif(ARCH != "x86_64", reason="the test kernel is x86_64")
@pytest.mark.skipif(not TEST_KERNEL.is_file(), reason="../shared/testdata/kernel/vmlinux.xz is absent")
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed")
def test_a_qemu_timeout_says_how_far_the_guest_got(full: World, tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    proc = full.run("boot", "--vmm", "qemu", "--accel", "tcg", "--report", str(report), "python",
                    VULCAN_BOOT_TIMEOUT="1")  # fmt: skip
    [r] = json.loads(report.read_text())
    assert proc.returncode == 1 and not r["ok"]
    assert re.match(r"no 'vulcan-smoke' line within 1 s: the VM had reached (nothing|the kernel|init)\b.*raise "
                    r"VULCAN_BOOT_TIMEOUT or --timeout on a slow host", r["detail"]), r["detail"]  # fmt: skip


@pytest.mark.skipif(ARCH != "x86_64", reason="the test kernel is x86_64")
@pytest.mark.skipif(not TEST_KERNEL.is_file(), reason="../shared/testdata/kernel/vmlinux.xz is absent")
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed")
def test_qemu_boots_the_image_and_the_agent_reports_smoke_ok(full: World) -> None:
    proc = full.run("boot", "--vmm", "qemu", "python", "go")
    assert proc.returncode == 0, proc.stderr
    assert "boot python (ext4, writable copy): ok via qemu" in proc.stderr and "Python 3.14.7" in proc.stderr
    assert "boot go (ext4, writable copy): ok via qemu" in proc.stderr
    log_text = (full.out / "images/.boot/python.ext4.qemu.console.log").read_text()
    assert "vulcan-smoke: ok Python 3.14.7" in log_text
    # the image in images/ was not modified by the VM
    manifest = json.loads((full.out / "images/python.manifest.json").read_text())
    from scripts.hashing import sha256_file

    assert sha256_file(full.out / "images/python.ext4") == manifest["sha256"]
    print("\n" + "\n".join(line for line in proc.stderr.splitlines() if "boot-to-smoke" in line))


@pytest.mark.skipif(ARCH != "x86_64", reason="the test kernel is x86_64")
@pytest.mark.skipif(not TEST_KERNEL.is_file(), reason="../shared/testdata/kernel/vmlinux.xz is absent")
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed")
def test_qemu_boot_succeeds_while_every_core_is_busy(full: World) -> None:
    # CI machines are noisy. Before tcg_kernel_args, a TCG guest on a busy host failed TSC
    # calibration and hung before init, every time; the stall retry could not save it.
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range((os.cpu_count() or 1) + 1)]
    try:
        proc = full.run("boot", "--vmm", "qemu", "python")
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert proc.returncode == 0, proc.stderr
    assert "hung early" not in proc.stderr
    log_text = (full.out / "images/.boot/python.ext4.qemu.console.log").read_text()
    assert "tsc_early_khz=" in log_text  # on the kernel command line the guest printed
    assert "could not calculate TSC khz" not in log_text
    assert "vulcan-smoke: ok Python 3.14.7" in log_text


@pytest.mark.skipif(ARCH != "x86_64", reason="the test kernel is x86_64")
@pytest.mark.skipif(not TEST_KERNEL.is_file(), reason="../shared/testdata/kernel/vmlinux.xz is absent")
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed")
@pytest.mark.skipif(shutil.which(f"qemu-system-{ARCH}") is None, reason=f"qemu-system-{ARCH} is not installed")
def test_a_kernel_qemu_cannot_load_is_said_in_qemus_words_at_once(full: World, tmp_path: Path) -> None:
    """`boot --kernel /etc/passwd` used to blame KVM and wait for a smoke line for 300 s."""
    report = tmp_path / "r.json"
    proc = full.run("boot", "--vmm", "qemu", "--accel", "tcg", "--kernel", "/etc/passwd", "--report", str(report),
                    "python")  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    result = json.loads(report.read_text())[0]
    assert result["detail"].startswith("QEMU exited with status 1 after"), result
    assert result["detail"].endswith("before the guest's smoke check: qemu: invalid kernel header"), result
    assert result["seconds"] < 60
