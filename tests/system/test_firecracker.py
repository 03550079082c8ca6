"""The slow part of tests/quick/test_firecracker.py (see its docstring)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from scripts.vm.firecracker import NESTED_KVM
from tests.quick.test_firecracker import _boot, _scratch_left
from tests.support.mounts import tmpfs
from tests.support.world import (
    World,
    file_state,
)

pytestmark = pytest.mark.skipif(shutil.which("tar2sqfs") is None, reason="squashfs-tools-ng is not installed")


@pytest.mark.parametrize(
    ("fmt", "extra", "wanted"),
    [
        ("ext4", [], {"root=/dev/vda", "rw"}),
        ("ext4", ["--read-only"], {"root=/dev/vda", "ro", "rootfstype=ext4", "init=/etc/vulcan/overlay-init",
                                   "vulcan.overlay=tmpfs"}),
        ("squashfs", [], {"root=/dev/vda", "ro", "rootfstype=squashfs", "init=/etc/vulcan/overlay-init",
                          "vulcan.overlay=tmpfs"}),
        ("squashfs", ["--overlay", "disk"], {"root=/dev/vda", "ro", "rootfstype=squashfs", "vulcan.overlay=/dev/vdb"}),
    ],
    ids=["ext4", "ext4-read-only", "squashfs-tmpfs", "squashfs-disk"],
)  # fmt: skip
def test_every_boot_shape_is_started_by_real_firecracker(
    fc: World, tmp_path: Path, fmt: str, extra: list[str], wanted: set[str]
) -> None:
    """Firecracker accepts the config we write and starts the VM; the guest kernel gets exactly
    the command line we meant; then this host's KVM stops it, and boot says that at once."""
    image = fc.out / "images" / f"python.{fmt}"
    before, left_before = file_state(image), _scratch_left()
    code, result, _ = _boot(fc, tmp_path, "--vmm", "firecracker", "--format", fmt, *extra)
    assert code == 1 and not result["ok"]
    assert result["detail"] == NESTED_KVM
    assert result["seconds"] < 60  # it stopped when Firecracker did, not at the timeout
    console = Path(result["console"]).read_text()
    assert "Successfully started microvm that was configured from one single json" in console
    line = next(x for x in console.splitlines() if "Command line: " in x).split("Command line: ", 1)[1]
    args = set(line.split())
    assert wanted | {"console=ttyS0", "reboot=k", "panic=1", "vulcan.port=52"} <= args, line
    if fmt == "ext4" and not extra:
        assert not any(a.startswith(("init=", "vulcan.overlay")) for a in args), line
    assert file_state(image) == before  # the published image: same bytes, mode and owner
    assert _scratch_left() == left_before  # the scratch copy, config and sockets are gone


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed")
def test_auto_leaves_firecracker_for_qemu_and_says_why(fc: World, tmp_path: Path) -> None:
    code, result, err = _boot(fc, tmp_path, "--vmm", "auto", "--accel", "tcg")
    assert code == 0 and result["ok"] and result["vmm"].startswith("qemu"), result
    assert f"leaving Firecracker: {NESTED_KVM}; booting with QEMU instead" in err


def test_a_jailed_boot_leaves_the_published_image_as_it_was(fc: World, tmp_path: Path) -> None:
    """Through the real jailer (chroot, uid/gid 65534). The read-only image is hard-linked into
    the jail only as it is: it used to be chmod-ed there, changing the published image's mode."""
    if os.geteuid() != 0:
        pytest.skip("the jailer needs root")
    image = fc.out / "images" / "python.squashfs"
    image.chmod(0o640)  # not world-readable: the jail gets a copy it may change, not a link
    before, left_before = file_state(image), _scratch_left()
    code, result, err = _boot(fc, tmp_path, "--vmm", "firecracker", "--jailer", "--format", "squashfs")
    assert code == 1 and result["detail"] == NESTED_KVM, result
    if not Path("/sys/fs/cgroup/cgroup.controllers").is_file():
        assert re.search(r"jailed WITHOUT a memory limit: /sys/fs/cgroup is not a cgroup v2 hierarchy", err), err
    assert file_state(image) == before
    image.chmod(0o644)
    assert _scratch_left() == left_before  # the jail went with the scratch directory
    # images/ on another file system than the jail (a hard link cannot be made): a copy, and
    # the published image is still as it was
    with tmpfs(tmp_path / "other-fs", "256m") as other:
        # without the snapshots test_snapshot may have made in this shared world (256 MiB each)
        shutil.copytree(fc.out, other / "out", symlinks=True, ignore=shutil.ignore_patterns("snapshots"))
        moved = other / "out" / "images" / "python.squashfs"
        before = file_state(moved)
        report = tmp_path / "other.json"
        proc = fc.run("boot", "--report", str(report), "--timeout", "120", "--vmm", "firecracker", "--jailer",
                      "--format", "squashfs", "python", VULCAN_OUT=str(other / "out"))  # fmt: skip
        assert proc.returncode == 1 and json.loads(report.read_text())[0]["detail"] == NESTED_KVM, proc.stderr
        assert file_state(moved) == before


def test_the_api_socket_starts_the_same_vm_as_the_config_file(fc: World, tmp_path: Path) -> None:
    """boot --api: PUT /boot-source, /drives/<id>, /machine-config, /vsock, /actions on the
    socket, as Vulcan hosts drive Firecracker: the guest kernel gets the same command line."""
    lines = {}
    for mode in ([], ["--api"]):
        code, result, _ = _boot(fc, tmp_path, "--vmm", "firecracker", "--format", "squashfs", *mode, "--debug")
        assert code == 1 and result["detail"] == NESTED_KVM, result
        console = Path(result["console"]).read_text()
        lines[bool(mode)] = next(x for x in console.splitlines() if "Command line: " in x).split("Command line: ")[1]
    assert lines[True] == lines[False]
