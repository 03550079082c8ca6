"""The real Firecracker 1.12.1 to user space: the agent, vsock, ready snapshots and their clones.

With ../shared/testdata/kernel-fc-emulated (a test kernel this machine's KVM, which emulates
guest kernel code, runs to user space) as the pinned kernel, the python image (its `python3` a
stand-in program, plus `vsock-probe`, a sandboxed program that tries to reach the agent) boots
as a user boots it: `nox -s boot`, `nox -s snapshot`, `nox -s boot -- --restore`. Boots are slow
here (ext4 ~45 s to the agent, squashfs ~2.5 min): one ready snapshot per format for the module,
the squashfs one made in the background while the first boot runs, and the guest's promises
checked in clones (a restore takes seconds). Figures are printed at the end of the run, labelled
with the KVM they were measured on.
"""

from __future__ import annotations

import json
import lzma
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from scripts.hashing import sha256_file
from tests.support import figures, imagerepo
from tests.support.world import (
    SHARED,
    World,
    built_world,
    file_state,
    require_real_firecracker,
    serve_real_firecracker,
    sha256,
)

EMULATED_KERNEL = SHARED / "kernel-fc-emulated" / "vmlinux.xz"
OTHER_KERNEL = SHARED / "kernel" / "vmlinux.xz"
ARCH = "x86_64"
pytestmark = pytest.mark.userspace  # (and slow, as everything in tests/system/)


@dataclass
class Guest:
    world: World
    background: threading.Thread | None = None  # makes the snapshots while the first tests boot
    logs: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)
    made: dict[str, Path] = field(default_factory=dict)

    def image(self, fmt: str) -> Path:
        return self.world.out / "images" / f"python.{fmt}"

    def make_snapshots(self) -> None:
        """squashfs (minutes here: it boots beside the first test's squashfs boot), then ext4
        (beside the ext4 boots), one after the other, as a user would run them."""
        for fmt in ("squashfs", "ext4"):
            self.logs[fmt] = self.world.run("snapshot", "--format", fmt, "python")

    def snapshot(self, fmt: str) -> Path:
        """The ready snapshot of the python image in ``fmt``, made once for the module."""
        if fmt not in self.made:
            if self.background is not None:
                self.background.join(timeout=1500)
            proc = self.logs.get(fmt) or self.world.run("snapshot", "--format", fmt, "python")
            assert proc.returncode == 0, proc.stderr
            d = self.world.out / "images" / "snapshots" / f"python.{fmt}"
            doc = json.loads((d / "snapshot.json").read_text())
            assert doc["binding"]["ready"] is True and doc["warm"].startswith("python3 --version: Python 3.14.7"), doc
            figures.add(f"snapshot python.{fmt}: created in {doc['create_seconds'] * 1000:.0f} ms")
            self.made[fmt] = d
        return self.made[fmt]


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory, go_build_cache: Path, agent_bin: Path) -> Iterator[Guest]:
    require_real_firecracker()
    for tool in ("tar2sqfs", "musl-gcc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (.ci/setup-debian installs it)")
    if not EMULATED_KERNEL.is_file():
        pytest.skip(f"{EMULATED_KERNEL} is absent: no kernel this machine's KVM runs to user space")
    probe = imagerepo.vsock_probe()
    assert probe is not None

    def prepare(w: World) -> None:
        python = imagerepo.RUNTIMES["python"]
        imagerepo.setup(w, runtimes={"python": {**python, "world": [*python["world"], "vsock-probe"]}}, extra=[probe])
        serve_real_firecracker(w)
        kernel = w.pins["kernel"]
        vmlinux = lzma.decompress(EMULATED_KERNEL.read_bytes())
        kernel["sha256"][ARCH] = sha256(vmlinux)
        w.mirror.add(kernel["url"].format(version=kernel["version"], arch=ARCH), vmlinux)

    with built_world(tmp_path_factory.mktemp("guest"), go_build_cache, agent_bin, prepare=prepare,
                     formats=["ext4", "squashfs"], download=True) as w:  # fmt: skip
        g = Guest(w)
        g.background = threading.Thread(target=g.make_snapshots, daemon=True)
        g.background.start()
        yield g
        g.background.join(timeout=1500)  # its VMs go with it (they are killed with their command)


def _boot(g: Guest, tmp_path: Path, *args: str, **env: str) -> tuple[int, dict, str]:  # type: ignore[type-arg]
    report = tmp_path / "report.json"
    proc = g.world.run("boot", "--report", str(report), *args, "python", **env)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, json.loads(report.read_text())[0], proc.stderr


def _to_the_agent(g: Guest, tmp_path: Path, fmt: str, *args: str) -> dict:  # type: ignore[type-arg]
    """A boot that must reach the agent and run the check and the program; the image untouched."""
    before = file_state(g.image(fmt))
    code, r, err = _boot(g, tmp_path, "--vmm", "firecracker", "--format", fmt, *args)
    assert code == 0 and r["ok"], (r, err)
    assert r["detail"] == "Python 3.14.7; program printed '42'", r
    assert file_state(g.image(fmt)) == before
    label = " ".join((fmt, *args))
    figures.add(f"boot {label}: boot-to-ready {r['seconds']:.1f} s")
    return r  # type: ignore[no-any-return]


# 1. Every boot shape reaches the agent


def test_squashfs_with_a_disk_overlay_boots_to_the_agent(guest: Guest, tmp_path: Path) -> None:
    """The read-only image in place and a scratch ext4 drive as the upper layer: overlay-init
    mounts it (the kernel says so on the console), then the agent runs the program."""
    r = _to_the_agent(guest, tmp_path, "squashfs", "--overlay", "disk")
    console = Path(r["console"]).read_text()
    assert re.search(r"EXT4-fs \(vdb\): mounted filesystem", console), console[-2000:]
    assert "Run /etc/vulcan/overlay-init as init process" in console
    assert r["copied_bytes"] == 0 and r["host_kvm"]


def test_ext4_boots_on_a_copy_through_the_config_file(guest: Guest, tmp_path: Path) -> None:
    r = _to_the_agent(guest, tmp_path, "ext4")
    assert r["copied_bytes"] > 0  # the VM wrote to a copy
    console = Path(r["console"]).read_text()
    assert "Run /sbin/init as init process" in console and "vulcan-guest: ready port=52" in console


def test_ext4_read_only_through_the_api_and_the_jailer(guest: Guest, tmp_path: Path) -> None:
    """--read-only (tmpfs overlay), --api (the VM given on Firecracker's socket) and, as root,
    --jailer (chroot, uid 65534): one boot to the agent proves all three."""
    jailer = ["--jailer"] if os.geteuid() == 0 else []
    r = _to_the_agent(guest, tmp_path, "ext4", "--read-only", "--api", *jailer)
    assert r["copied_bytes"] == 0
    assert "Run /etc/vulcan/overlay-init as init process" in Path(r["console"]).read_text()


# 2. (the rest of the guest's promises are checked in clones, below)


@pytest.mark.parametrize(
    ("words", "said"),
    [
        ("vulcan.overlay=/dev/sda", "vulcan-overlay: fail vulcan.overlay=/dev/sda: expected tmpfs or a drive /dev/vdb "
         "to /dev/vdz"),
        ("vulcan.overlay_size=lots", "vulcan-overlay: fail vulcan.overlay_size=lots: expected digits with an optional "
         "k, m, g or %"),
    ],
    ids=["overlay", "overlay_size"],
)  # fmt: skip
def test_a_bad_overlay_value_stops_the_boot_with_its_message(
    guest: Guest, tmp_path: Path, words: str, said: str
) -> None:
    code, r, _ = _boot(guest, tmp_path, "--vmm", "firecracker", "--format", "ext4", "--read-only", "--append", words)
    assert code == 1 and not r["ok"]
    assert r["detail"] == f"the guest stopped before its agent was ready: {said}", r
    assert said in Path(r["console"]).read_text()


# 4. Timeouts that fit the host


def test_a_boot_timeout_says_how_far_the_vm_got_and_what_to_raise(guest: Guest, tmp_path: Path) -> None:
    code, r, _ = _boot(guest, tmp_path, "--format", "ext4", VULCAN_BOOT_TIMEOUT="6")
    assert code == 1 and not r["ok"]
    m = re.fullmatch(r"no 'vulcan-guest: ready' within 6 s: the VM had reached (.+?); a slow host \(QEMU's TCG, a "
                     r"KVM that emulates guest kernel code\) needs more: raise VULCAN_BOOT_TIMEOUT or --timeout; "
                     r"last console lines: .*", r["detail"])  # fmt: skip
    assert m, r["detail"]
    console = Path(r["console"]).read_text()
    stage = m.group(1)
    if stage.startswith(("the kernel (", "init (")):
        assert "Linux version " in console
    else:
        assert stage == "nothing: Firecracker started, but the guest kernel printed nothing", stage
    # snapshot: a kernel of other bytes (one more byte at its end) makes the ready snapshot stale,
    # the new VM does not get ready in time; the snapshot there stays as it was
    made = guest.snapshot("ext4")
    before = {p.name: sha256_file(p) for p in made.iterdir()}
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes((guest.world.out / "bin" / "vmlinux").read_bytes() + b"\0")
    proc = guest.world.run("snapshot", "--format", "ext4", "--kernel", str(kernel), "python",
                           VULCAN_SNAPSHOT_TIMEOUT="6")  # fmt: skip
    assert proc.returncode == 8 and "Traceback" not in proc.stderr
    assert "stale: kernel_sha256" in proc.stderr, proc.stderr
    assert "the VM never became ready: no 'vulcan-guest: ready' within 6 s: the VM had reached " in proc.stderr
    assert "raise VULCAN_SNAPSHOT_TIMEOUT or --timeout" in proc.stderr, proc.stderr
    assert {p.name: sha256_file(p) for p in made.iterdir()} == before
    assert not [p for p in made.parent.iterdir() if p.name.startswith(".vulcan")]


# 3. Snapshots of a ready VM and their clones


def test_clones_of_the_squashfs_snapshot_answer_at_once_each_its_own(guest: Guest, tmp_path: Path) -> None:
    """boot --restore defaults to the format snapshot makes (squashfs); 3 clones at once: each
    prints the program's output, its clock set, its RNG reseeded (VMGENID), nothing copied."""
    snap = guest.snapshot("squashfs")
    shared = {n: sha256_file(snap / n) for n in ("memory", "vmstate")}
    image = file_state(guest.image("squashfs"))
    report = tmp_path / "r.json"
    proc = guest.world.run("boot", "--restore", "--count", "3", "--no-cold", "--report", str(report), "python")
    assert proc.returncode == 0, proc.stderr
    [r] = json.loads(report.read_text())
    assert (r["format"], r["count"], r["ok"], r["copied_bytes"], r["problems"]) == ("squashfs", 3, True, 0, [])
    for c in r["clones"]:
        assert c["ok"] and c["detail"] == "program printed '42'", c
        assert c["clock_offset_ms"] is not None and c["load_ms"] > 0 and c["first_result_ms"] > 0
        assert "crng reseeded due to virtual machine fork" in Path(c["console"]).read_text()
    assert len({c["random"] for c in r["clones"]}) == 3 and all(len(c["random"]) == 32 for c in r["clones"])
    assert {n: sha256_file(snap / n) for n in shared} == shared and file_state(guest.image("squashfs")) == image
    loads = sorted(c["load_ms"] for c in r["clones"])
    firsts = sorted(c["first_result_ms"] for c in r["clones"])
    figures.add(f"restore python.squashfs x3: load {loads[1]:.1f} ms (median), restore-to-first-result "
                f"{firsts[1]:.0f} ms (median)")  # fmt: skip


def test_clones_of_the_ext4_snapshot_each_write_their_own_copy(guest: Guest, tmp_path: Path) -> None:
    snap = guest.snapshot("ext4")
    disk = sha256_file(snap / "rootfs.ext4")
    report = tmp_path / "r.json"
    proc = guest.world.run("boot", "--restore", "--count", "3", "--no-cold", "--format", "ext4", "--report",
                           str(report), "python")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    [r] = json.loads(report.read_text())
    assert all(c["ok"] and c["detail"] == "program printed '42'" for c in r["clones"]), r
    assert len({c["random"] for c in r["clones"]}) == 3
    allocated = os.stat(snap / "rootfs.ext4").st_blocks * 512  # a sparse copy skips blocks of zeros in it
    assert len({c["copied_bytes"] for c in r["clones"]}) == 1 and 0 < r["clones"][0]["copied_bytes"] <= allocated
    assert sha256_file(snap / "rootfs.ext4") == disk
    firsts = sorted(c["first_result_ms"] for c in r["clones"])
    figures.add(f"restore python.ext4 x3: restore-to-first-result {firsts[1]:.0f} ms (median)")


@pytest.fixture
def inside(guest: Guest, monkeypatch: pytest.MonkeyPatch) -> Guest:
    """This process as the tool run in the guest world (the clones below are started in-process)."""
    guest.world.in_process(monkeypatch)
    return guest


def _sandbox(g: Guest, fmt: str, index: int):  # type: ignore[no-untyped-def]
    from scripts import paths
    from scripts.vm import Target
    from scripts.vm.restore import sandbox

    g.snapshot(fmt)
    t = Target("python", paths.image("python", fmt, ARCH), fmt, fmt == "squashfs", "tmpfs")
    return sandbox(t, ARCH, paths.kernel(ARCH), index)


def _run(client, *argv: str, timeout_ms: int = 60_000) -> tuple[int, str, bool]:  # type: ignore[no-untyped-def]
    r = client.exec(list(argv), timeout_ms=timeout_ms)
    return r.exit_code, (r.stdout + r.stderr).decode(errors="replace"), r.timed_out


def test_the_guest_keeps_its_promises_in_a_real_clone(inside: Guest) -> None:
    """What the agent promises, inside a real guest: programs run as the sandbox user in /work;
    the read-only image and the overlay's layers are not visible; a sandboxed program that
    connects to the agent through CID 1 (VSOCKETS_LOOPBACK) is refused, and the refusal logged;
    a program's setsid grandchild is gone once the program timed out."""
    with _sandbox(inside, "squashfs", 10) as vm:
        client = vm.agent()
        try:
            assert _run(client, "id", "-u")[:2] == (0, "1000\n")
            assert _run(client, "stat", "-c", "%u:%g", "/work")[:2] == (0, "1000:1000\n")
            assert _run(client, "sh", "-c", "pwd; echo note > note; cat /work/note")[:2] == (0, "/work\nnote\n")
            code, mounts, _ = _run(client, "cat", "/proc/mounts")
            points = [line.split()[1] for line in mounts.splitlines()]
            assert code == 0 and points[0] == "/" and mounts.startswith("vulcan-root / overlay "), mounts
            assert not [p for p in points if p.startswith("/.vulcan")], mounts  # the layers are detached
            code, out, _ = _run(client, "ls", "-A", "/.vulcan/ro")
            assert out.strip() == "", out  # an empty mount point, not the image
            code, out, _ = _run(client, "vsock-probe", "1", "52")
            assert code == 6 and out.startswith("closed without a reply"), out  # refused: before or after the ping
            assert vm.console.wait_for(("vulcan-guest: refused a connection from vsock:1:",), vm.start + 600)
            code, out, timed_out = _run(client, "sh", "-c", "setsid sleep 600 & sleep 600", timeout_ms=3000)
            assert timed_out, out
            code, ps, _ = _run(client, "ps", "-o", "pid,user,args")
            assert code == 0 and "sleep 600" not in ps, ps
            assert client.ping()["ok"]  # the agent still serves the host after all that
        finally:
            client.close()


@pytest.mark.parametrize("fmt", ["squashfs", "ext4"])
def test_a_clones_writes_are_not_seen_by_the_next_clone(inside: Guest, fmt: str) -> None:
    with _sandbox(inside, fmt, 20) as vm:
        client = vm.agent()
        assert _run(client, "sh", "-c", "echo secret > /work/secret && cat /work/secret")[:2] == (0, "secret\n")
        client.close()
    with _sandbox(inside, fmt, 21) as vm:
        client = vm.agent()
        code, out, _ = _run(client, "cat", "/work/secret")
        client.close()
    assert code != 0 and "No such file" in out, out


def test_a_clone_killed_mid_request_leaves_nothing_behind(inside: Guest) -> None:
    from scripts.vm.snapshot import file_problems, load

    snap = inside.snapshot("squashfs")
    snapshots = snap.parent
    failed: list[BaseException] = []
    with _sandbox(inside, "squashfs", 30) as vm:
        client = vm.agent()

        def request() -> None:
            try:
                client.exec(["sleep", "600"], timeout_ms=600_000)
            except BaseException as exc:  # what the host saw, asserted below
                failed.append(exc)

        asking = threading.Thread(target=request)
        asking.start()
        watcher = vm.agent()  # a second connection sees the request running
        while "sleep 600" not in _run(watcher, "ps", "-o", "args")[1]:
            assert asking.is_alive() and not failed, failed
        watcher.close()
        vm.proc.kill()
        asking.join(timeout=60)
        client.close()
        directory = vm.directory
        assert failed, "the request outlived its VM"
    assert vm.proc.poll() is not None and not directory.exists()
    assert not [p.name for p in snapshots.iterdir() if p.name.startswith(".vulcan")]
    assert file_problems(snap, load(snap)) == {}  # the snapshot is as it was made


def test_a_restore_timeout_says_what_to_raise(guest: Guest, tmp_path: Path) -> None:
    guest.snapshot("squashfs")
    report = tmp_path / "r.json"
    proc = guest.world.run("boot", "--restore", "--no-cold", "--report", str(report), "python",
                           VULCAN_RESTORE_TIMEOUT="0.001")  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    [c] = json.loads(report.read_text())[0]["clones"]
    assert c["detail"].startswith("restored and resumed, but the agent did not answer within 0.001 s of the start"), c
    assert c["detail"].endswith("raise VULCAN_RESTORE_TIMEOUT or --timeout (now 0.001 s) on a slow host"), c


def test_a_snapshot_of_another_kernel_or_image_is_refused_by_restore_and_verify(guest: Guest, tmp_path: Path) -> None:
    guest.snapshot("squashfs")
    w = guest.world
    other = tmp_path / "vmlinux"
    other.write_bytes(lzma.decompress(OTHER_KERNEL.read_bytes()))
    proc = w.run("boot", "--restore", "--no-cold", "--kernel", str(other), "python")
    assert (
        proc.returncode == 8 and "snapshot python.squashfs does not belong to this host: kernel_sha256" in proc.stderr
    )

    def binding_row() -> dict:  # type: ignore[type-arg]
        rows = json.loads(w.run("verify", "--json").stdout)["rows"]
        [row] = [
            x for x in rows if x["artifact"] == "images/snapshots/python.squashfs" and x["check"].startswith("binding")
        ]
        return row  # type: ignore[no-any-return]

    pinned = w.out / "bin" / "vmlinux"
    saved = tmp_path / "pinned"
    shutil.copy2(pinned, saved)
    shutil.copy2(other, pinned)  # a host whose kernel changed after the snapshot was made
    try:
        row = binding_row()
        assert row["result"] == "FAIL" and row["detail"].startswith("stale: kernel_sha256: "), row
    finally:
        shutil.copy2(saved, pinned)
    assert binding_row()["result"] == "pass"
    # another image: the same pins rebuilt with another timestamp
    before = sha256_file(guest.image("squashfs"))
    w.run("rootfs", "--all", check=True, SOURCE_DATE_EPOCH="1700000123")
    assert sha256_file(guest.image("squashfs")) != before
    try:
        proc = w.run("boot", "--restore", "--no-cold", "python")
        assert proc.returncode == 8 and "does not belong to this host: image_sha256" in proc.stderr, proc.stderr
        row = binding_row()
        assert row["result"] == "FAIL" and row["detail"].startswith("stale: image_sha256: "), row
    finally:
        w.run("rootfs", "--all", check=True)
    assert sha256_file(guest.image("squashfs")) == before  # the same pins: the same bytes, the snapshot fits again
    assert binding_row()["result"] == "pass"
