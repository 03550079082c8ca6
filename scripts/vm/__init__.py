"""Booting images in VMs: what every boot shares (the target and its disks, the console, the result).

A writable image (ext4) boots on a scratch copy; a read-only one (squashfs, or ext4 with
--read-only) attaches the image itself with a throwaway overlay (rootfs/configure.py's
overlay-init). qemu.py and firecracker.py boot with these, the session is boot.py; the host
side of the agent protocol is agent.py, Firecracker's configuration firecracker_config.py.
"""

from __future__ import annotations

import contextlib
import os
import queue
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .. import rootfs, sparse
from ..errors import VulcanError
from ..formats.ext4 import blank
from ..run import bound_to_us

AGENT_PORT = 52
STALLED = "\0stalled"
STALL_S = 60.0  # a guest silent for this long before it is up has hung (a safety net: see qemu.tcg_kernel_args)


class BootFailed(VulcanError):
    """The VM did not show a working image in time."""

    exit_code = 8


def host_kvm(modules: Path = Path("/sys/module")) -> str:
    """Which KVM this host has (the loaded module), so figures say what they were measured on:
    kvm_intel, kvm_amd, or kvm_pvm (a paravirtual KVM that emulates guest kernel code: a boot
    there takes tens of seconds, not one)."""
    for name in ("kvm_pvm", "kvm_intel", "kvm_amd"):
        if (modules / name).is_dir():
            return name
    return "kvm" if (modules / "kvm").is_dir() else "none"


EMULATING_KVM = {"kvm_pvm": "guest kernel code emulated: not a normal KVM's figure"}


def kvm_caveat() -> str:
    """What a boot or restore figure measured here says beside it: " (under kvm_pvm: ...)" on a
    host whose KVM emulates guest kernel code, else nothing."""
    kvm = host_kvm()
    return f" (under {kvm}: {EMULATING_KVM[kvm]})" if kvm in EMULATING_KVM else ""


@dataclass(frozen=True)
class BootResult:
    runtime: str
    fmt: str
    vmm: str
    ok: bool
    seconds: float
    detail: str
    console: Path
    copied_bytes: int = 0  # what the sandbox start copied (0 for a read-only image)
    stopped_by_host: bool = False  # this host's KVM stopped the guest (another VMM here may boot it)

    def as_json(self) -> dict[str, object]:
        return {"runtime": self.runtime, "format": self.fmt, "vmm": self.vmm, "ok": self.ok,
                "seconds": round(self.seconds, 3), "copied_bytes": self.copied_bytes, "detail": self.detail,
                "console": str(self.console), "host_kvm": host_kvm()}  # fmt: skip


SUN_PATH = 107  # bytes of a Unix socket's path that connect(2) takes (sockaddr_un.sun_path, with its NUL)


def connect_unix(sock: socket.socket, path: Path | str) -> None:
    """Connect to a Unix socket whatever the length of its path: a longer one than sun_path
    holds (a checkout deep in a home directory, pytest's temporary directories) is reached
    through a descriptor of its directory (/proc/self/fd/N/NAME)."""
    path = Path(path)
    if len(os.fsencode(path)) <= SUN_PATH - 1:
        sock.connect(str(path))
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        sock.connect(f"/proc/self/fd/{fd}/{path.name}")
    finally:
        os.close(fd)


def kvm_problem() -> str | None:
    """Why /dev/kvm cannot be used here, or None when it can (opened read-write)."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist (no KVM on this host)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return f"/dev/kvm is not read-writable by this user ({kvm_access_hint(os.stat('/dev/kvm'))})"
    return None


def kvm_access_hint(st: os.stat_result) -> str:
    """What gives this user /dev/kvm, from its owner group and mode (Debian: root:kvm 0660;
    some hosts leave it root:root 0600, where joining a group changes nothing)."""
    import grp

    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    mode = stat.S_IMODE(st.st_mode)
    if st.st_gid != 0 and mode & 0o060 == 0o060:
        return f"it is {group}-group read-writable: add yourself to the {group} group, then log in again"
    return (f"it is mode {mode:04o}, group {group}: ask root to make it group kvm, mode 0660 (Debian's udev rule "
            "does), then join the kvm group")  # fmt: skip


@dataclass(frozen=True)
class Target:
    """One image to boot and how: format, read-only, and where the overlay's upper layer lives."""

    runtime: str
    image: Path
    fmt: str
    read_only: bool  # every format that is not writable is; a writable one with --read-only too
    overlay: str  # tmpfs or disk
    append: str = ""  # more kernel command line words (boot --append), after ours: the last value wins

    @property
    def label(self) -> str:
        mode = f"read-only + {self.overlay} overlay" if self.read_only else "writable copy"
        return f"{self.runtime} ({self.fmt}, {mode})"


# How far a booting guest got, by its console: each stage's first line (the kernel's banner,
# the kernel handing over to init, the agent's ready line). A timeout says the last one seen.
STAGES = (("the kernel", "Linux version "), ("init", " as init process"), ("the agent", "vulcan-guest: ready"))
# What the guest says when it stops itself before the agent is up: overlay-init refusing a
# vulcan.overlay= value, the agent unable to listen, the kernel's panic (init exited).
GUEST_STOPPED = ("vulcan-overlay: fail", "vulcan-guest: cannot listen", "Kernel panic - not syncing")


class Console:
    """Reads a VM's serial console line by line in the background and keeps it in a log; notes
    when each of STAGES was reached, and the guest's own reasons for stopping."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.log = open(log_path, "w", encoding="utf-8", errors="replace")  # noqa: SIM115 - closed by close()
        self.tail: list[str] = []
        self.started = time.monotonic()
        self.reached: dict[str, float] = {}  # stage -> seconds after start
        self.stopped_by_guest: list[str] = []  # GUEST_STOPPED lines, in order
        self.ended = threading.Event()  # the VM closed its console (it exited)
        self._writing = threading.Lock()  # the log is closed only between two writes
        self._pumping = threading.Thread(target=self._pump, args=(proc,), daemon=True)
        self._pumping.start()

    def _pump(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            with self._writing:
                if not self.log.closed:  # lines after close() (a child still holding the pipe)
                    self.log.write(line + "\n")
                    self.log.flush()
            self.tail = ([*self.tail, line])[-15:]
            self._note(line)
            self.lines.put(line)
        self.ended.set()
        self.lines.put(None)

    def _note(self, line: str) -> None:
        for stage, marker in STAGES:
            if stage not in self.reached and marker in line:
                self.reached[stage] = time.monotonic() - self.started
        if any(m in line for m in GUEST_STOPPED) and len(self.stopped_by_guest) < 5:
            self.stopped_by_guest.append(line.strip())

    def progress(self) -> str:
        """How far the guest got, for a user: "init (the kernel after 2.1 s, init after 23.4 s)",
        or that the kernel printed nothing."""
        if not self.reached:
            return "nothing: Firecracker started, but the guest kernel printed nothing"
        last = list(self.reached)[-1]
        return f"{last} ({', '.join(f'{s} after {t:.1f} s' for s, t in self.reached.items())})"

    def wait_for(self, markers: tuple[str, ...], deadline: float, stall: float | None = None) -> str | None:
        """The first console line containing one of ``markers`` (None: VM ended or timed out).

        With ``stall``, silence on the console for that long counts as a hang: ``STALLED``."""
        last = time.monotonic()
        while True:
            now = time.monotonic()
            left = deadline - now
            if left <= 0:
                return None
            if stall is not None and now - last > stall:
                return STALLED
            try:
                line = self.lines.get(timeout=min(left, 1.0))
                last = time.monotonic()
            except queue.Empty:
                continue
            if line is None:
                return None
            if any(m in line for m in markers):
                return line

    def close(self) -> None:
        """After the VM was killed: the console's last lines are in the log, then it is closed."""
        self._pumping.join(timeout=10)
        with self._writing:
            self.log.close()


def exit_status(proc: subprocess.Popen[bytes], console: Console) -> int | None:
    """The VM process's exit status if it ended on its own, else None (still running). Its
    console closes just before it exits: then the status is waited for, not read too early."""
    return proc.wait(timeout=10) if console.ended.is_set() else proc.poll()


def kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@contextlib.contextmanager
def running(
    cmd: list[str], console_log: Path, cwd: Path | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], Console]]:
    """A VM process (QEMU, Firecracker) with its serial console read into ``console_log``; killed
    at the end whatever happens, and by the kernel if we die first."""
    proc = subprocess.Popen(bound_to_us(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, cwd=cwd)  # fmt: skip
    console = Console(proc, console_log)
    try:
        yield proc, console
    finally:
        kill(proc)
        console.close()


OVERLAY_INIT = f"/{rootfs.OVERLAY_INIT}"  # written into every image
SCRATCH_MIB = 512  # the per-sandbox upper layer drive of --overlay disk (sparse)


@dataclass(frozen=True)
class Disks:
    """What a VM boots from. A writable ext4 boot runs on a scratch copy of the image; a
    read-only boot (squashfs, or ext4 with --read-only) attaches the image itself, read-only
    and in place (a sandbox start copies nothing), with a throwaway overlay on top: in RAM
    (tmpfs) or on a scratch ext4 drive made for this VM (--overlay disk)."""

    root: Path
    read_only: bool
    fstype: str
    scratch: Path | None = None
    copied_bytes: int = 0  # what starting this VM copied (the figure a read-only image brings to zero)

    def kernel_args(self, with_root: bool) -> str:
        """``with_root``: also say root= (QEMU); Firecracker adds root=/dev/vda ro|rw itself."""
        if not self.read_only:
            return "root=/dev/vda rw" if with_root else ""
        upper = "/dev/vdb" if self.scratch else "tmpfs"
        args = f"rootfstype={self.fstype} init={OVERLAY_INIT} vulcan.overlay={upper}"
        return f"root=/dev/vda ro {args}" if with_root else args


def prepare_disks(image: Path, fmt: str, read_only: bool, overlay: str, scratch: Path) -> Disks:
    if not read_only:  # a writable format (Target says which)
        copy = scratch / image.name  # the VM writes; images/ is never modified (sparse copy)
        sparse.sparse_copy(image, copy)
        return Disks(copy, False, fmt, None, sparse.allocated_bytes(copy))
    upper = None
    if overlay == "disk":
        upper = scratch / "upper.img"
        blank(upper, SCRATCH_MIB << 20)  # overlay-init mounts it as ext4: an empty, sparse one
    return Disks(image, True, fmt, upper)
