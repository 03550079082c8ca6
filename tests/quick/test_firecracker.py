"""The real Firecracker (1.12.1, from ../shared) as the oracle of our Firecracker path: a real
release downloaded and verified, every boot shape started by it as far as this machine allows
(the guest kernel's early boot: with this test kernel, the host's KVM then stops the guest),
its own errors said, the jailer for real. Init, the agent and the vsock round trip under the
real Firecracker: tests/system/test_guest_vm.py, with a kernel this host runs to user space."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.world import (
    SHARED,
    World,
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


def test_firecrackers_own_error_reaches_the_user(fc: World, tmp_path: Path) -> None:
    code, result, err = _boot(fc, tmp_path, "--vmm", "firecracker", "--kernel", "/etc/passwd")
    assert code == 1
    assert result["detail"].startswith("Firecracker refused the VM: "), result
    assert "Invalid Elf magic number" in result["detail"]
    # a failed boot is not reported with a boot-to-ready time
    [said] = [x for x in err.splitlines() if "FAILED via firecracker" in x]
    assert re.search(r"FAILED via firecracker after \d+\.\d s: Firecracker refused the VM", said), said
    assert "boot-to-ready" not in said


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
