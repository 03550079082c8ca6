"""The real Firecracker (1.12.1, from ../shared) as the oracle of our Firecracker path: a real
release downloaded and verified, every boot shape started by it as far as this machine allows
(the guest kernel's early boot: with this test kernel, the host's KVM then stops the guest),
its own errors said, the jailer for real. Init, the agent and the vsock round trip under the
real Firecracker: tests/test_guest_vm.py, with a kernel this host runs to user space."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.vm.firecracker import NESTED_KVM
from tests.support.mounts import tmpfs
from tests.support.world import (
    SHARED,
    World,
    file_state,
    require_real_firecracker,
)

TEST_KERNEL = SHARED / "kernel" / "vmlinux.xz"
pytestmark = pytest.mark.skipif(shutil.which("tar2sqfs") is None, reason="squashfs-tools-ng is not installed")


def test_a_real_release_is_downloaded_and_verified(fc: World) -> None:
    rows = {(r["artifact"], r["check"]): r for r in json.loads(fc.run("verify", "--json").stdout)["rows"]}
    assert rows[("bin/firecracker", "--version")] == {"artifact": "bin/firecracker", "check": "--version",
                                                      "result": "pass", "detail": "Firecracker v1.12.1"}  # fmt: skip
    assert rows[("bin/jailer", "--version")]["detail"] == "Jailer v1.12.1"
    assert rows[("bin/firecracker", "ELF machine")]["result"] == "pass"


# boot makes its Firecracker scratch in the temporary directory: the module gets a private one,
# so runs beside this one cannot touch the count (made by the fixture: a run that selects none
# of these tests leaves no directory behind)
PRIVATE_TMP = Path("/nonexistent")


@pytest.fixture(scope="module", autouse=True)
def _private_tmp() -> Iterator[None]:
    global PRIVATE_TMP
    PRIVATE_TMP = Path(tempfile.mkdtemp(prefix="vfc", dir="/tmp"))
    yield
    shutil.rmtree(PRIVATE_TMP, ignore_errors=True)


def _boot(fc: World, tmp_path: Path, *args: str) -> tuple[int, dict, str]:  # type: ignore[type-arg]
    report = tmp_path / "report.json"
    proc = fc.run("boot", "--report", str(report), "--timeout", "120", *args, "python", TMPDIR=str(PRIVATE_TMP))
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(report.read_text())[0], proc.stderr


def _scratch_left() -> set[str]:
    return {p.name for p in PRIVATE_TMP.glob(".vulcan-fc-*")}


@pytest.mark.slow
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


def test_firecrackers_own_error_reaches_the_user(fc: World, tmp_path: Path) -> None:
    code, result, err = _boot(fc, tmp_path, "--vmm", "firecracker", "--kernel", "/etc/passwd")
    assert code == 1
    assert result["detail"].startswith("Firecracker refused the VM: "), result
    assert "Invalid Elf magic number" in result["detail"]
    # a failed boot is not reported with a boot-to-ready time
    [said] = [x for x in err.splitlines() if "FAILED via firecracker" in x]
    assert re.search(r"FAILED via firecracker after \d+\.\d s: Firecracker refused the VM", said), said
    assert "boot-to-ready" not in said


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86 is not installed")
def test_auto_leaves_firecracker_for_qemu_and_says_why(fc: World, tmp_path: Path) -> None:
    code, result, err = _boot(fc, tmp_path, "--vmm", "auto", "--accel", "tcg")
    assert code == 0 and result["ok"] and result["vmm"].startswith("qemu"), result
    assert f"leaving Firecracker: {NESTED_KVM}; booting with QEMU instead" in err


@pytest.mark.slow
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


@pytest.mark.slow
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


def test_a_request_firecracker_refuses_on_the_api_socket_is_said_in_its_words(fc: World, tmp_path: Path) -> None:
    code, result, err = _boot(fc, tmp_path, "--vmm", "firecracker", "--api", "--kernel", "/etc/passwd", "--debug")
    assert code == 1
    assert result["detail"].startswith("Firecracker refused PUT /actions (HTTP 400): "), result
    assert "Invalid Elf magic number" in result["detail"]
    assert "debug: api PUT /boot-source" in err and "-> 204" in err  # the requests, logged under --debug


@pytest.mark.parametrize("broken", ["drive", "vsock"])
def test_a_config_firecracker_refuses_is_said_in_its_words_naming_the_file(tmp_path: Path, broken: str) -> None:
    """The real Firecracker on a config we wrote with a drive that is not there, or a vsock
    socket in a directory that is not there: its own message, with the path, is what boot says."""
    import subprocess

    from scripts.vm.firecracker import why_not_ready
    from scripts.vm.firecracker_config import config

    real = require_real_firecracker()
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF")
    drive = tmp_path / ("missing.ext4" if broken == "drive" else "root.ext4")
    if broken != "drive":
        drive.write_bytes(b"\0" * 4096)
    uds = tmp_path / ("no-such-dir" if broken == "vsock" else ".") / "v.sock"
    (tmp_path / "vm.json").write_text(json.dumps(config(kernel, drive, uds)))
    proc = subprocess.run([str(real / "firecracker"), "--no-api", "--config-file", str(tmp_path / "vm.json")],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    tail = (proc.stdout + proc.stderr).splitlines()[-15:]
    why, by_host = why_not_ready(None, proc.returncode, tail, 60)
    assert proc.returncode == 1 and not by_host
    assert why.startswith("Firecracker refused the VM: "), why
    if broken == "drive":
        assert "No such file or directory" in why and str(drive) in why
    else:
        assert "Error binding to the host-side Unix socket: No such file or directory" in why
