"""`verify` catches corrupted artifacts; `boot` proves an image boots (QEMU, for real);
the Firecracker path is covered by its config and vsock/agent protocol, since Firecracker
cannot boot a normal guest on these machines (their /dev/kvm runs only patched kernels)."""

from __future__ import annotations

import contextlib
import json
import lzma
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.arch import host_arch
from scripts.formats import ext4
from scripts.vm.agent import AgentClient, vsock_connect
from scripts.vm.firecracker_config import config
from tests.support import imagerepo
from tests.support.world import SHARED, World

pytestmark = pytest.mark.skipif(shutil.which("mke2fs") is None, reason="e2fsprogs is not installed")
ARCH = host_arch()
TEST_KERNEL = SHARED / "kernel/vmlinux.xz"


def verify(w: World, *args: str, out: Path | None = None) -> tuple[int, dict]:  # type: ignore[type-arg]
    proc = w.run("verify", "--json", *args, **({"VULCAN_OUT": str(out)} if out else {}))
    return proc.returncode, json.loads(proc.stdout)


def failures(report: dict) -> set[tuple[str, str]]:  # type: ignore[type-arg]
    return {(r["artifact"], r["check"]) for r in report["rows"] if r["result"] == "FAIL"}


def copy_outputs(w: World, dest: Path) -> Path:
    shutil.copytree(w.out, dest, symlinks=True)
    return dest


def test_verify_passes_on_fresh_outputs(full: World) -> None:
    code, report = verify(full)
    assert code == 0, [r for r in report["rows"] if r["result"] not in ("pass", "skip")]
    rows = {(r["artifact"], r["check"]): r for r in report["rows"]}
    assert rows[("bin/firecracker", "--version")]["detail"] == "Firecracker v1.17.0"
    if TEST_KERNEL.is_file():  # the test kernel has vsock loopback: fine for tests, said for sandboxes
        risk = rows[("bin/vmlinux", "config for sandboxes")]
        assert risk["result"] == "warn" and risk["detail"].startswith("CONFIG_VSOCKETS_LOOPBACK=y"), risk
    assert rows[("images/python.ext4", "package files intact")]["result"] == "pass"
    if imagerepo.musl_python():  # a real musl binary: run through the image's own loader
        assert rows[("images/python.ext4", "runtime runs")] == {
            "artifact": "images/python.ext4", "check": "runtime runs", "result": "pass",
            "detail": "python3 --version: Python 3.14.7"}  # fmt: skip
    proc = full.run("verify")
    assert "images/python.ext4  sha256 = manifest" in proc.stdout.replace("   ", "  ")


def test_flipped_byte_in_an_image_fails(full: World, tmp_path: Path) -> None:
    out = copy_outputs(full, tmp_path / "o")
    img = out / "images/node.ext4"
    data = bytearray(img.read_bytes())
    data[len(data) // 3] ^= 0x40
    img.write_bytes(bytes(data))
    code, report = verify(full, out=out)
    assert code == 1 and ("images/node.ext4", "sha256 = manifest") in failures(report)


def test_replaced_agent_fails(full: World, tmp_path: Path) -> None:
    out = copy_outputs(full, tmp_path / "o")
    agent = out / "bin/vulcan-guest"
    shutil.copyfile("/bin/busybox" if os.path.exists("/bin/busybox") else "/bin/sh", agent)
    code, report = verify(full, out=out)
    bad = failures(report)
    assert code == 1
    assert ("bin/vulcan-guest", "sha256 = stamp") in bad
    assert ("images/python.ext4", "agent = bin/vulcan-guest") in bad


def test_file_deleted_inside_the_image_fails_and_is_named(full: World, tmp_path: Path) -> None:
    out = copy_outputs(full, tmp_path / "o")
    img = out / "images/python.ext4"
    subprocess.run(["debugfs", "-w", "-R", "rm /usr/lib/python3.14/os.py", str(img)], check=True, capture_output=True)
    code, report = verify(full, out=out)
    assert code == 1
    row = next(r for r in report["rows"] if r["check"] == "package files intact" and "python" in r["artifact"])
    assert row["result"] == "FAIL" and "/usr/lib/python3.14/os.py (missing)" in row["detail"]


def test_swapped_images_fail(full: World, tmp_path: Path) -> None:
    out = copy_outputs(full, tmp_path / "o")
    a, b = out / "images/python.ext4", out / "images/go.ext4"
    tmp = out / "images/x"
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    code, report = verify(full, out=out)
    bad = failures(report)
    assert code == 1
    assert ("images/python.ext4", "sha256 = manifest") in bad and ("images/go.ext4", "sha256 = manifest") in bad


def test_missing_artifacts_are_reported_and_nothing_is_a_failure(full: World, tmp_path: Path) -> None:
    code, report = verify(full, out=tmp_path / "empty")
    assert code == 1  # nothing to verify at all
    assert {r["result"] for r in report["rows"]} == {"missing"}


@pytest.mark.skipif(not ext4.e2fsprogs_version() >= ext4.TAR_INPUT_VERSION if shutil.which("mke2fs") else True,
                    reason="needs e2fsprogs >= 1.47.1 for bit-identical rebuilds")  # fmt: skip
def test_reproduce_rebuilds_and_matches(full: World) -> None:
    code, report = verify(full, "--reproduce")
    rows = [r for r in report["rows"] if r["check"] == "--reproduce"]
    assert code == 0 and len(rows) == 3 and all(r["result"] == "pass" for r in rows)


def test_clean_removes_outputs_and_is_idempotent(full: World, tmp_path: Path) -> None:
    out = copy_outputs(full, tmp_path / "o")
    for _ in range(2):
        proc = full.run("clean", VULCAN_OUT=str(out))
        assert proc.returncode == 0
    assert not (out / "bin").exists() and not (out / "images").exists()
    assert full.cache.exists()
    cache = tmp_path / "cache"
    shutil.copytree(full.cache, cache)
    # and mke2fs's helpers, where a cache keeps them unless VULCAN_TOOLS is set (as for these worlds)
    shutil.copytree(full.env()["VULCAN_TOOLS"], cache / "tools")
    full.run("clean", "--all", check=True, VULCAN_OUT=str(out), VULCAN_CACHE=str(cache))
    assert not cache.exists()
    assert list(Path(full.env()["VULCAN_TOOLS"]).iterdir()), "clean --all left VULCAN_TOOLS alone"


# -- Firecracker: configuration, vsock handshake and agent protocol -----------------------------

# Firecracker's documented --config-file fields (docs/getting-started.md, swagger firecracker.yaml)
SCHEMA = {
    "boot-source": {"kernel_image_path": str, "boot_args": str},
    "drives": {"drive_id": str, "path_on_host": str, "is_root_device": bool, "is_read_only": bool},
    "machine-config": {"vcpu_count": int, "mem_size_mib": int, "smt": bool},
    "vsock": {"guest_cid": int, "uds_path": str},
}


def test_firecracker_config_has_the_documented_shape(tmp_path: Path) -> None:
    cfg = config(tmp_path / "vmlinux", tmp_path / "python.ext4", tmp_path / "v.sock", extra_args="vulcan.port=52")
    json.dumps(cfg)  # serialisable
    assert set(cfg) <= {*SCHEMA, "network-interfaces"}
    for section, fields in SCHEMA.items():
        items = cfg[section] if isinstance(cfg[section], list) else [cfg[section]]
        for item in items:
            for key, typ in fields.items():
                assert isinstance(item[key], typ), (section, key)
            assert set(item) <= set(fields), (section, set(item) - set(fields))
    assert cfg["vsock"]["guest_cid"] >= 3
    args = cfg["boot-source"]["boot_args"].split()
    assert {"console=ttyS0", "reboot=k", "panic=1", "vulcan.port=52"} <= set(args)
    assert not any(a.startswith("root=") for a in args)  # Firecracker adds it for the root drive
    assert cfg["drives"][0]["is_root_device"] is True


def test_firecracker_config_of_a_read_only_root_with_a_scratch_drive(tmp_path: Path) -> None:
    from scripts.vm import Disks

    disks = Disks(tmp_path / "python.squashfs", True, "squashfs", tmp_path / "upper.ext4")
    cfg = config(tmp_path / "vmlinux", disks.root, tmp_path / "v.sock", extra_args=disks.kernel_args(with_root=False),
                 read_only=True, scratch=disks.scratch)  # fmt: skip
    root, scratch = cfg["drives"]
    assert (root["path_on_host"], root["is_root_device"], root["is_read_only"]) == (str(disks.root), True, True)
    assert (scratch["is_root_device"], scratch["is_read_only"]) == (False, False)
    for drive in cfg["drives"]:
        assert set(drive) <= set(SCHEMA["drives"]) and all(isinstance(drive[k], t) for k, t in SCHEMA["drives"].items())
    args = cfg["boot-source"]["boot_args"].split()
    assert {"rootfstype=squashfs", "init=/etc/vulcan/overlay-init", "vulcan.overlay=/dev/vdb"} <= set(args)
    assert not any(a.startswith("root=") for a in args)  # Firecracker adds "root=/dev/vda ro" for it


class FakeVsockMuxer:
    """Firecracker's host side of vsock, for the test: a Unix socket that answers
    ``CONNECT <port>`` with ``OK <n>`` and then relays to the (real) agent over TCP. The first
    ``reset`` connections are closed once the host has sent its first request, unanswered: what
    a restored guest's vsock reset does to a connection accepted before it handled the reset."""

    def __init__(self, path: Path, agent_port: int, reset: int = 0) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(4)
        self.agent_port = agent_port
        self.reset = reset
        self.seen: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            line = b""
            while not line.endswith(b"\n"):
                line += conn.recv(1)
            self.seen.append(line)
            if line != b"CONNECT 52\n":
                conn.sendall(b"FAILURE\n")
                conn.close()
                continue
            conn.sendall(b"OK 1073741824\n")
            if self.reset:
                self.reset -= 1
                conn.recv(65536)  # the request, lost with the connection
                conn.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.agent_port))
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        while data := a.recv(65536):
            b.sendall(data)
        b.shutdown(socket.SHUT_WR)


@contextlib.contextmanager
def agent_behind_a_muxer(full: World, sock: Path, reset: int = 0) -> Iterator[FakeVsockMuxer]:
    """The built agent on a TCP port of this host, behind a FakeVsockMuxer at ``sock``."""
    agent = subprocess.Popen(
        [full.out / "bin/vulcan-guest", "-listen", "tcp:127.0.0.1:0", "-cmdline", "/dev/null"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert agent.stdout is not None
        port = int(agent.stdout.readline().split("port=")[1])
        yield FakeVsockMuxer(sock, port, reset)
    finally:
        agent.kill()
        agent.wait()


def test_vsock_handshake_and_agent_protocol(full: World, tmp_path: Path) -> None:
    with agent_behind_a_muxer(full, tmp_path / "v.sock") as mux:
        client = AgentClient(vsock_connect(str(tmp_path / "v.sock"), 52, timeout=10))
        assert client.ping()["version"] == "0.1.0"
        r = client.exec(["sh", "-c", "echo $((6*7))"])
        assert (r.exit_code, r.stdout) == (0, b"42\n")
        assert mux.seen == [b"CONNECT 52\n"]
        client.close()


def test_a_restored_clones_connection_closed_by_the_reset_is_made_again(full: World, tmp_path: Path) -> None:
    """A clone's first requests (a ping, the clock) are sent again on a new connection when the
    restore's vsock reset closed the first one under them; the program after them runs once."""
    from scripts.vm.agent import settled

    with agent_behind_a_muxer(full, tmp_path / "v.sock", reset=2) as mux:
        client, pong = settled(str(tmp_path / "v.sock"), 52, 30, AgentClient.ping)
        assert pong["ok"] and mux.seen == [b"CONNECT 52\n"] * 3
        runs = tmp_path / "runs"
        r = client.exec(["sh", "-c", f"echo ran >> {runs}; cat {runs}"], user="root")
        assert (r.exit_code, r.stdout) == (0, b"ran\n")
        client.close()


def test_firecracker_without_kvm_or_binary_says_what_is_missing(full: World, tmp_path: Path) -> None:
    out = copy_outputs(full, tmp_path / "o")
    (out / "bin/firecracker").unlink()
    proc = full.run("boot", "--vmm", "firecracker", "python", VULCAN_OUT=str(out))
    assert proc.returncode == 8 and "cannot boot with Firecracker" in proc.stderr
    assert "/dev/kvm" in proc.stderr or "bin/firecracker is missing" in proc.stderr


def test_no_vmm_at_all_is_an_error_not_a_skip(full: World, tmp_path: Path) -> None:
    out = copy_outputs(full, tmp_path / "o")
    (out / "bin/firecracker").unlink()
    empty = tmp_path / "empty-path"
    empty.mkdir()
    proc = full.run("boot", "python", VULCAN_OUT=str(out), PATH=str(empty))
    assert (
        proc.returncode == 8 and "no VMM can run here" in proc.stderr and "qemu-system-x86_64 not found" in proc.stderr
    )


def test_a_registered_vmm_is_chosen_and_booted_through_by_the_real_boot(
    full: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One record in scripts/vm/vmms.py is all a VMM is to `boot`: a stand-in registered first
    is what --vmm auto chooses when it can run, gets each target (read-only when asked) and its
    options, and its result is what boot reports; --vmm
    names it; --jailer is refused for a VMM that does not jail."""
    from scripts.vm import BootResult, boot, vmms

    seen: list[tuple[str, str, bool, str]] = []

    def stub_boot(t, rt, kernel, arch, timeout, o):  # type: ignore[no-untyped-def]
        seen.append((t.runtime, t.image.name, t.read_only, o.accel))
        return BootResult(t.runtime, t.fmt, "stub", True, 0.5, f"stub booted {t.image.name}", tmp_path / "c.log")

    stub = vmms.Vmm("stub", "Stub", "boot-to-stub", lambda arch: None, lambda arch: "a stand-in", stub_boot,
                    "nothing to install")  # fmt: skip
    monkeypatch.setattr(vmms, "VMMS", {"stub": stub, **vmms.VMMS})
    monkeypatch.setattr(boot, "VMMS", vmms.VMMS)
    for key, value in full.env().items():
        monkeypatch.setenv(key, value)
    report = tmp_path / "r.json"
    assert boot.main(["--report", str(report), "--accel", "tcg", "python"]) == 0
    assert seen == [("python", "python.ext4", False, "tcg")]
    [r] = json.loads(report.read_text())
    assert (r["vmm"], r["ok"], r["detail"]) == ("stub", True, "stub booted python.ext4")
    assert boot.main(["--vmm", "stub", "--read-only", "python"]) == 0
    assert seen[-1] == ("python", "python.ext4", True, "auto")
    with pytest.raises(boot.BootFailed, match="--jailer and --api start Firecracker, which cannot run here"):
        boot.main(["--vmm", "stub", "--jailer", "python"])


# -- a real boot under QEMU ---------------------------------------------------------------------


def test_host_tsc_rate_comes_from_cpuinfo(tmp_path: Path) -> None:
    from scripts.vm.qemu import host_tsc_khz

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\ncpu MHz\t\t: 2299.998\ncache size\t: 512 KB\n")
    assert host_tsc_khz(cpuinfo) == 2299998
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")  # aarch64 has no "cpu MHz"
    assert host_tsc_khz(cpuinfo) is None
    assert host_tsc_khz(tmp_path / "absent") is None


def test_console_lines_after_the_vm_is_killed_reach_the_log_without_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A VMM's child can still hold the console pipe when the VMM is killed: what it writes
    then is logged, and the reader thread does not die writing to a closed log (a traceback
    in the middle of boot's output, as CI once showed for a Firecracker that refused a kernel)."""
    from scripts.vm import running

    crashes: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", crashes.append)
    log = tmp_path / "console.log"
    vmm = "(echo started; while kill -0 $$ 2>/dev/null; do sleep 0.05; done; seq 1000) & exec sleep 60"
    with running(["sh", "-c", vmm], log) as (_, console):
        assert console.wait_for(("started",), deadline=time.monotonic() + 60) == "started"
    # the "VMM" is killed here; its child writes once it has seen that
    assert crashes == []
    assert log.read_text().split() == ["started", *(str(n) for n in range(1, 1001))]


def _console_of(tmp_path: Path, lines: list[str]) -> object:
    """A Console that read ``lines`` from a process that then ended (a VM's console, replayed)."""
    from scripts.vm import running

    script = "".join(f"echo '{x}'\n" for x in lines)
    with running(["sh", "-c", script], tmp_path / "console.log") as (proc, console):
        proc.wait(timeout=30)
        console.ended.wait(timeout=30)
    return console


KERNEL_BANNER = "[    0.000000] Linux version 6.1.192 (vulcan@test) #1 SMP"
INIT = "[   21.900000] Run /etc/vulcan/overlay-init as init process"


@pytest.mark.parametrize(
    ("lines", "reached"),
    [
        ([], "nothing: Firecracker started, but the guest kernel printed nothing"),
        (["Running Firecracker v1.12.1", KERNEL_BANNER], "the kernel (the kernel after "),
        ([KERNEL_BANNER, "[ 1.0] ACPI: bus type PCI registered", INIT], "init (the kernel after "),
    ],
    ids=["nothing", "kernel", "init"],
)
def test_a_timeout_says_how_far_the_guest_got_and_which_setting_gives_it_longer(
    tmp_path: Path, lines: list[str], reached: str
) -> None:
    from scripts.vm.firecracker import why_not_ready

    console = _console_of(tmp_path, lines)
    why, by_host = why_not_ready(None, None, console.tail, 600, console, "VULCAN_SNAPSHOT_TIMEOUT")  # type: ignore[attr-defined]
    assert not by_host
    assert why.startswith(f"no 'vulcan-guest: ready' within 600 s: the VM had reached {reached}"), why
    assert "raise VULCAN_SNAPSHOT_TIMEOUT or --timeout" in why
    if lines[-1:] == [INIT]:
        assert re.search(r"\(the kernel after \d+\.\d s, init after \d+\.\d s\)", why), why


def test_the_guests_own_reason_to_stop_is_said_before_the_kernels_panic(tmp_path: Path) -> None:
    """overlay-init refusing a value, then PID 1 exits and the kernel panics: boot says the first."""
    from scripts.vm.firecracker import why_not_ready

    fail = "vulcan-overlay: fail vulcan.overlay=/dev/sda: expected tmpfs or a drive /dev/vdb to /dev/vdz"
    panic = "[ 23.1] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100"
    lines = [KERNEL_BANNER, INIT, fail, panic, "[ 23.1] CPU: 0 PID: 1 Comm: overlay-init", "[ 23.1] Call Trace:",
             "[ 23.1]  <TASK>", "[ 23.2] Rebooting"]  # fmt: skip
    console = _console_of(tmp_path, lines)
    why, _ = why_not_ready(None, 0, console.tail, 600, console)  # type: ignore[attr-defined]
    assert why == f"the guest stopped before its agent was ready: {fail}"
    why, _ = why_not_ready(None, 0, console.tail, 600, _console_of(tmp_path, [KERNEL_BANNER, *lines[3:]]))  # type: ignore[attr-defined]
    assert why.startswith("the guest stopped before its agent was ready: [ 23.1] Kernel panic - not syncing"), why


def test_a_bad_vm_timeout_setting_is_refused_naming_it(world: World) -> None:
    cases = [("VULCAN_BOOT_TIMEOUT", "0", ["boot"]), ("VULCAN_BOOT_TIMEOUT", "1e9", ["boot"]),
             ("VULCAN_SNAPSHOT_TIMEOUT", "soon", ["snapshot"]),
             ("VULCAN_RESTORE_TIMEOUT", "-5", ["boot", "--restore"])]  # fmt: skip
    for name, value, command in cases:
        proc = world.run(*command, "python", **{name: value})
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert f"{name}={value!r}: expected seconds, more than 0 and at most 86400" in proc.stderr, proc.stderr


def test_host_kvm_names_the_loaded_module(tmp_path: Path) -> None:
    from scripts.vm import host_kvm

    assert host_kvm(tmp_path) == "none"
    (tmp_path / "kvm").mkdir()
    assert host_kvm(tmp_path) == "kvm"
    (tmp_path / "kvm_intel").mkdir()
    assert host_kvm(tmp_path) == "kvm_intel"
    (tmp_path / "kvm_pvm").mkdir()  # the paravirtual KVM that emulates guest kernel code
    assert host_kvm(tmp_path) == "kvm_pvm"


def test_qemu_boot_of_a_broken_runtime_fails(world: World) -> None:
    runtimes = {"broken": {"world": ["python3"], "check": ["false"], "binary": "/usr/bin/python3"}}
    imagerepo.setup(world, runtimes=runtimes)
    world.use_agent()
    world.run("rootfs", "--runtime", "broken", check=True)
    kernel = world.tmp / "vmlinux"
    kernel.write_bytes(lzma.decompress(TEST_KERNEL.read_bytes()))
    proc = world.run("boot", "--vmm", "qemu", "--kernel", str(kernel), "broken")
    assert proc.returncode == 1
    assert "vulcan-smoke: fail false exited 1" in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="placing files for the jailed uid needs root")
def test_the_jailer_gets_the_documented_flags_and_a_chroot_holding_everything(tmp_path: Path) -> None:
    """firecracker docs/jailer.md: --id, --exec-file, --uid, --gid, --chroot-base-dir,
    --cgroup-version, --cgroup, then -- and Firecracker's own arguments; the VM's files inside
    <base>/<exec name>/<id>/root, referred to by paths inside the chroot."""
    from scripts.vm.firecracker import Jail

    kernel, image = tmp_path / "vmlinux", tmp_path / "python.squashfs"
    kernel.write_bytes(b"k" * 100)
    image.write_bytes(b"i" * 100)
    jail = Jail(tmp_path / "bin/jailer", tmp_path / "bin/firecracker", tmp_path / "jail", "vulcan-python")
    inside = jail.place(image, "rootfs.squashfs", writable=False), jail.place(kernel, "vmlinux", writable=False)
    assert inside == (Path("/rootfs.squashfs"), Path("/vmlinux"))
    assert jail.root == tmp_path / "jail/firecracker/vulcan-python/root"
    assert (jail.root / "rootfs.squashfs").read_bytes() == image.read_bytes()
    argv = jail.argv(["--no-api", "--config-file", "/vm.json"])
    flags = dict(zip(argv[1 : argv.index("--") : 2], argv[2 : argv.index("--") : 2], strict=True))
    assert flags == {"--id": "vulcan-python", "--exec-file": str(tmp_path / "bin/firecracker"), "--uid": "65534",
                     "--gid": "65534", "--chroot-base-dir": str(tmp_path / "jail"), "--cgroup-version": "2",
                     "--cgroup": f"memory.max={256 << 20}"}  # fmt: skip
    assert argv[argv.index("--") + 1 :] == ["--no-api", "--config-file", "/vm.json"]
    cfg = config(inside[1], inside[0], Path("/vsock.sock"), read_only=True)
    assert cfg["drives"][0]["path_on_host"] == "/rootfs.squashfs" and cfg["vsock"]["uds_path"] == "/vsock.sock"


@pytest.mark.skipif(os.geteuid() != 0, reason="placing files for the jailed uid needs root")
def test_a_jail_gets_no_file_through_a_symlink_and_no_mode_wider_than_its_own(tmp_path: Path) -> None:
    """images/snapshots/<x>/vmstate linked to a root-only file once became a 0644 copy in the jail."""
    from scripts.vm import BootFailed
    from scripts.vm.firecracker import Jail

    secret = tmp_path / "root-only"
    secret.write_bytes(b"s" * 100)
    secret.chmod(0o600)
    snap = tmp_path / "snapshots/python.squashfs"
    snap.mkdir(parents=True)
    (snap / "vmstate").symlink_to(secret)
    private = snap / "memory"
    private.write_bytes(b"m" * 100)
    private.chmod(0o600)
    jail = Jail(tmp_path / "bin/jailer", tmp_path / "bin/firecracker", tmp_path / "jail", "vulcan-python")
    with pytest.raises(BootFailed, match="a symbolic link: not placed in the jail"):
        jail.place(snap / "vmstate", "vmstate", writable=False)
    assert not (jail.root / "vmstate").exists()
    jail.place(private, "memory", writable=False)
    st = (jail.root / "memory").stat()
    assert (st.st_mode & 0o777, st.st_uid) == (0o400, 65534)  # the jailed user's alone, never 0644
    assert private.stat().st_mode & 0o777 == 0o600  # and the original as it was


def test_the_kvm_hint_fits_how_dev_kvm_is_shared(tmp_path: Path) -> None:
    """Joining the kvm group helps only where /dev/kvm is group read-writable."""
    import grp

    from scripts.vm import kvm_access_hint

    if os.geteuid() != 0:
        pytest.skip("making a root-owned device stand-in needs root")
    dev = tmp_path / "kvm"
    dev.touch()
    os.chmod(dev, 0o600)
    os.chown(dev, 0, 0)
    assert kvm_access_hint(dev.stat()).startswith(
        "it is mode 0600, group root: ask root to make it group kvm, mode 0660"
    )
    gid = next((g.gr_gid for g in grp.getgrall() if g.gr_gid != 0), None)
    if gid is None:
        pytest.skip("no group other than root here")
    os.chown(dev, 0, gid)
    os.chmod(dev, 0o660)
    name = grp.getgrgid(gid).gr_name
    assert (
        kvm_access_hint(dev.stat())
        == f"it is {name}-group read-writable: add yourself to the {name} group, then log in again"
    )


def test_a_restore_looks_for_the_snapshot_that_snapshot_makes(world: World) -> None:
    """`nox -s snapshot -- python` makes the squashfs snapshot (its default): `boot --restore
    python` looks for that one, not an ext4 one, and says which command makes it."""
    proc = world.run("boot", "--restore", "--no-cold")
    assert proc.returncode == 8 and "Traceback" not in proc.stderr
    assert "no squashfs snapshots in" in proc.stderr and "nox -s snapshot -- --format squashfs" in proc.stderr
