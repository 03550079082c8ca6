"""`nox -s boot`: prove that images boot and run their runtime.

- Firecracker (needs /dev/kvm): ``bin/firecracker --no-api --config-file``, wait for
  ``vulcan-guest: ready`` on the serial console, reach the agent over vsock, run the runtime
  check and a program, stop the VM; reports boot-to-ready time.
- QEMU (``--vmm qemu``): the ``microvm`` machine with virtio-mmio, KVM if usable else TCG, and
  ``vulcan.smoke=1``: success is the agent's ``vulcan-smoke: ok`` line; reports boot-to-smoke.
Every VM runs on a scratch copy of the image, under a timeout, and is always killed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import atomic, kconfig, log, paths
from .agent import AgentClient, vsock_connect
from .errors import VulcanError
from .firecracker_config import config as firecracker_config
from .formats import WRITERS
from .pins import ARCHES, Pins, Runtime, host_arch
from .pins import load as load_pins
from .run import minimal_env, run_tool

QEMU = {"x86_64": "qemu-system-x86_64", "aarch64": "qemu-system-aarch64"}
AGENT_PORT = 52
STALLED = "\0stalled"
STALL_S = 60.0  # a guest silent for this long before it is up has hung (a safety net: see tcg_kernel_args)
_kvm_failed: list[str] = []  # KVM that failed once (e.g. nested KVM for patched guests only) is not tried again


class BootFailed(VulcanError):
    """The VM did not show a working image in time."""


@dataclass
class BootResult:
    runtime: str
    vmm: str
    ok: bool
    seconds: float
    detail: str
    console: Path
    copied_bytes: int = 0  # what the sandbox start copied (0 for a read-only image)
    fmt: str = "ext4"

    def as_json(self) -> dict[str, object]:
        return {"runtime": self.runtime, "format": self.fmt, "vmm": self.vmm, "ok": self.ok,
                "seconds": round(self.seconds, 3), "copied_bytes": self.copied_bytes, "detail": self.detail,
                "console": str(self.console)}  # fmt: skip


def kvm_usable() -> str | None:
    """None if /dev/kvm can be opened read-write, else why not."""
    if not os.path.exists("/dev/kvm"):
        return "/dev/kvm does not exist (no KVM on this host)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not read-writable by this user (add yourself to the kvm group)"
    return None


def choose_vmm(requested: str, arch: str) -> tuple[str, str]:
    fc = paths.bin_dir(arch) / "firecracker"
    no_kvm = kvm_usable()
    qemu = shutil.which(QEMU[arch])
    fc_missing = no_kvm or (None if fc.is_file() else f"{fc} is missing (run 'nox -s download')")
    if requested == "firecracker" or (requested == "auto" and not fc_missing):
        if fc_missing:
            raise BootFailed(f"cannot boot with Firecracker: {fc_missing}", hint="or use --vmm qemu")
        return "firecracker", f"{fc} with /dev/kvm"
    if qemu:
        return "qemu", qemu + ("" if requested == "qemu" else f" (Firecracker not usable: {fc_missing})")
    raise BootFailed(
        f"no VMM can run here: Firecracker: {fc_missing}; QEMU: {QEMU[arch]} not found",
        hint="install qemu-system-x86 (Debian) for --vmm qemu, or use a host with /dev/kvm",
    )


class _Console:
    """Reads a VM's serial console line by line in the background and keeps it in a log."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.log = open(log_path, "w", encoding="utf-8", errors="replace")  # noqa: SIM115 - closed by close()
        self.tail: list[str] = []
        threading.Thread(target=self._pump, args=(proc,), daemon=True).start()

    def _pump(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.log.write(line + "\n")
            self.log.flush()
            self.tail = ([*self.tail, line])[-15:]
            self.lines.put(line)
        self.lines.put(None)

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
        self.log.close()


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


OVERLAY_INIT = "/etc/vulcan/overlay-init"  # written into every image (rootfs/configure.py)
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
    if fmt == "ext4" and not read_only:
        copy = scratch / image.name  # the VM writes; images/ is never modified (sparse copy)
        atomic.sparse_copy(image, copy)
        return Disks(copy, False, "ext4", None, atomic.allocated_bytes(copy))
    upper = None
    if overlay == "disk":
        upper = scratch / "upper.ext4"
        with open(upper, "wb") as f:
            f.truncate(SCRATCH_MIB << 20)
        run_tool(["mke2fs", "-q", "-F", "-t", "ext4", "-O", "^orphan_file,^metadata_csum_seed", upper],
                 env=minimal_env(), quiet=True)  # fmt: skip
    return Disks(image, True, fmt, upper)


# per arch: QEMU machine (x86_64: microvm with virtio-mmio; aarch64: virt) and serial console
QEMU_MACHINE = {
    "x86_64": ("microvm,x-option-roms=off,isa-serial=on,rtc=off", "ttyS0"),
    "aarch64": ("virt", "ttyAMA0"),
}


def qemu_command(arch: str, kernel: Path, disks: Disks, accel: str, args: str) -> list[str]:
    machine, console = QEMU_MACHINE[arch]
    cpu = ("max" if arch == "x86_64" else "cortex-a57") if accel == "tcg" else "host"
    ro = ",readonly=on" if disks.read_only else ""
    cmd = [
        QEMU[arch], "-M", machine, "-accel", accel, "-cpu", cpu, "-m", "256",
        "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
        "-kernel", str(kernel), "-append", f"console={console} {args}",
        "-drive", f"id=root,file={disks.root},format=raw,if=none{ro}", "-device", "virtio-blk-device,drive=root",
    ]  # fmt: skip
    if disks.scratch is not None:
        cmd += [
            "-drive",
            f"id=upper,file={disks.scratch},format=raw,if=none",
            "-device",
            "virtio-blk-device,drive=upper",
        ]
    return cmd


def host_tsc_khz(cpuinfo: Path = Path("/proc/cpuinfo")) -> int | None:
    """The host's TSC rate in kHz as /proc/cpuinfo reports it ("cpu MHz"), or None."""
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "cpu MHz":
                return round(float(value) * 1000) or None
    except (OSError, ValueError):
        pass
    return None


def tcg_kernel_args(arch: str) -> str:
    """Kernel arguments that make an x86_64 guest under TCG boot on a busy host.

    Under TCG the guest's TSC runs at the host's rate, but the kernel measures it against the
    emulated PIT, which a loaded host cannot emulate in time: calibration fails ("tsc: Unable to
    calibrate against PIT ... Marking TSC unstable") and the guest then hangs before init (seen
    4 boots out of 4 with both cores busy). ``tsc_early_khz`` (Linux >= 5.8) gives the rate so
    the calibration is skipped. Not for KVM, where the hypervisor tells the guest its TSC rate.
    "cpu MHz" is the TSC rate on VMs and containers; on a laptop with frequency scaling it can be
    off, which only skews the guest's clock during a smoke boot (the kernel's clocksource
    watchdog then falls back to jiffies; the agent's smoke check allows 120 s)."""
    if arch != "x86_64":
        return ""
    khz = host_tsc_khz()
    return f"tsc_early_khz={khz}" if khz else ""


@dataclass(frozen=True)
class Target:
    """One image to boot and how: format, read-only, and where the overlay's upper layer lives."""

    runtime: str
    image: Path
    fmt: str
    read_only: bool
    overlay: str  # tmpfs or disk

    @property
    def label(self) -> str:
        mode = f"read-only + {self.overlay} overlay" if self.read_only or self.fmt != "ext4" else "writable copy"
        return f"{self.runtime} ({self.fmt}, {mode})"


def boot_qemu(
    t: Target, kernel: Path, arch: str, timeout: float, accel: str, logs: Path, retry: bool = True
) -> BootResult:
    runtime = t.runtime
    auto = accel == "auto"
    if auto:  # KVM runs this host's architecture only
        accel = "kvm" if arch == host_arch() and kvm_usable() is None and not _kvm_failed else "tcg"
    with atomic.scratch(Path(tempfile.gettempdir()), "boot") as tmp:
        disks = prepare_disks(t.image, t.fmt, t.read_only, t.overlay, tmp)
        console_log = logs / f"{runtime}.{t.fmt}.qemu.console.log"
        args = f"reboot=k panic=1 {disks.kernel_args(with_root=True)} vulcan.smoke=1"
        if accel == "tcg":
            args = f"{args} {tcg_kernel_args(arch)}".strip()
        cmd = qemu_command(arch, kernel, disks, accel, args)
        log.info(f"boot {t.label}: {' '.join(cmd[:3])} ... (accel {accel}, console log {console_log})")
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        console = _Console(proc, console_log)
        try:
            line = console.wait_for(
                ("vulcan-smoke: ok", "vulcan-smoke: fail", "KVM internal error", "Kernel panic"),
                start + timeout,
                stall=STALL_S,
            )
        finally:
            _kill(proc)
            console.close()
        seconds = time.monotonic() - start
    if auto and accel == "kvm" and not (line and "vulcan-smoke:" in line):
        # A KVM that cannot run this guest fails in several ways: "KVM internal error", or QEMU
        # itself aborting ("failed to set MSR 0x10a", seen on nested paravirtual KVM). The guest
        # never reached its smoke check, so that says nothing about the image: use TCG.
        why = line.strip() if line and line != STALLED else (console.tail[-1] if console.tail else "no output")
        _kvm_failed.append(why)
        log.warn(f"boot {runtime}: KVM is not usable for this guest here ({why}); retrying with TCG")
        return boot_qemu(t, kernel, arch, timeout, "tcg", logs)
    if line == STALLED and retry:
        log.warn(f"boot {runtime}: the guest printed nothing for {STALL_S:.0f}s (hung early); trying once more")
        return boot_qemu(t, kernel, arch, timeout, accel, logs, retry=False)
    if line == STALLED:
        line = f"the guest hung: no console output for {STALL_S:.0f}s"
    if line and "vulcan-smoke: ok" in line:
        return BootResult(
            runtime,
            f"qemu ({accel})",
            True,
            seconds,
            line.split("vulcan-smoke: ok", 1)[1].strip(),
            console_log,
            disks.copied_bytes,
        )
    detail = line.strip() if line else f"no 'vulcan-smoke' line within {timeout:.0f}s"
    return BootResult(
        runtime,
        f"qemu ({accel})",
        False,
        seconds,
        f"{detail}; last console lines: {console.tail[-5:]}",
        console_log,
        disks.copied_bytes,
    )


JAILER_ID = "vulcan-{runtime}"
JAILED_UID = JAILED_GID = 65534  # nobody: the VMM runs unprivileged inside its chroot


@dataclass(frozen=True)
class Jail:
    """Firecracker started the way a production host starts it: through the jailer, which
    chroots into ``<base>/firecracker/<id>/root``, makes /dev/kvm there, moves the process into
    its own cgroup and drops to an unprivileged uid/gid (firecracker docs/jailer.md). Every file
    the VM uses must be inside that root; paths in the config are then relative to it."""

    jailer: Path
    firecracker: Path
    base: Path
    id: str
    uid: int = JAILED_UID
    gid: int = JAILED_GID
    mem_mib: int = 256

    @property
    def root(self) -> Path:
        return self.base / self.firecracker.name / self.id / "root"

    def argv(self, config_in_jail: str) -> list[str]:
        return [
            str(self.jailer), "--id", self.id, "--exec-file", str(self.firecracker),
            "--uid", str(self.uid), "--gid", str(self.gid), "--chroot-base-dir", str(self.base),
            "--cgroup-version", "2", "--cgroup", f"memory.max={self.mem_mib << 20}",
            "--", "--no-api", "--config-file", config_in_jail,
        ]  # fmt: skip

    def place(self, src: Path, name: str, writable: bool) -> Path:
        """Put a file the VM needs into the jail (hard link when it can, else a copy) and give
        the jailed user what it needs of it; returns its path inside the jail."""
        self.root.mkdir(parents=True, exist_ok=True)
        dest = self.root / name
        try:
            os.link(src, dest)
        except OSError:
            atomic.sparse_copy(src, dest)
        if writable:
            os.chown(dest, self.uid, self.gid)
        else:
            os.chmod(dest, 0o644)
        return Path("/") / name


def boot_firecracker(
    t: Target, rt: Runtime, kernel: Path, firecracker: Path, timeout: float, logs: Path, jailer: Path | None = None
) -> BootResult:
    runtime = t.runtime
    with atomic.scratch(Path(tempfile.gettempdir()), "fc") as scratch:
        disks = prepare_disks(t.image, t.fmt, t.read_only, t.overlay, scratch)
        extra = f"vulcan.port={AGENT_PORT} {disks.kernel_args(with_root=False)}".strip()
        if jailer is None:
            uds = scratch / "vsock.sock"
            cfg = scratch / "vm.json"
            conf = firecracker_config(kernel, disks.root, uds, extra_args=extra, read_only=disks.read_only,
                                      scratch=disks.scratch)  # fmt: skip
            cfg.write_text(json.dumps(conf, indent=1))
            cmd = [str(firecracker), "--no-api", "--config-file", str(cfg)]
        else:
            jail = Jail(jailer, firecracker, scratch / "jail", JAILER_ID.format(runtime=runtime))
            root = jail.place(disks.root, f"rootfs.{t.fmt}", writable=not disks.read_only)
            upper = jail.place(disks.scratch, "upper.ext4", writable=True) if disks.scratch else None
            conf = firecracker_config(jail.place(kernel, "vmlinux", writable=False), root, Path("/vsock.sock"),
                                      extra_args=extra, read_only=disks.read_only, scratch=upper)  # fmt: skip
            (jail.root / "vm.json").write_text(json.dumps(conf, indent=1))
            os.chown(jail.root, jail.uid, jail.gid)  # Firecracker creates the vsock socket there
            uds = jail.root / "vsock.sock"
            cmd = jail.argv("/vm.json")
        console_log = logs / f"{runtime}.{t.fmt}.firecracker.console.log"
        log.info(f"boot {runtime}: {' '.join(cmd)} (console log {console_log})")
        start = time.monotonic()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=scratch
        )
        console = _Console(proc, console_log)
        try:
            line = console.wait_for(("vulcan-guest: ready",), start + timeout)
            ready = time.monotonic() - start
            if line is None:
                why = f"no 'vulcan-guest: ready' within {timeout:.0f}s; last console lines: {console.tail[-5:]}"
                return BootResult(runtime, "firecracker", False, ready, why, console_log)
            client = AgentClient(vsock_connect(str(uds), AGENT_PORT, timeout=30))
            try:
                client.ping()
                check = client.exec(list(rt.check))
                if check.exit_code != 0:
                    raise BootFailed(f"{' '.join(rt.check)} exited {check.exit_code}: {check.stderr[-300:]!r}")
                detail = (check.stdout or check.stderr).decode(errors="replace").strip().splitlines()[0]
                if rt.program:
                    prog = client.exec(list(rt.program), timeout_ms=120_000)
                    out = prog.stdout.decode(errors="replace").strip()
                    if prog.exit_code != 0 or (rt.expect and out != rt.expect):
                        raise BootFailed(f"program {list(rt.program)} gave exit {prog.exit_code}, output {out!r}")
                    detail += f"; program printed {out!r}"
            finally:
                client.close()
            return BootResult(runtime, "firecracker", True, ready, detail, console_log, disks.copied_bytes)
        finally:
            _kill(proc)
            console.close()


def main(argv: list[str]) -> int:
    pins = load_pins()
    p = argparse.ArgumentParser(
        prog="nox -s boot --",
        description="Boot images and prove their runtime works (Firecracker with /dev/kvm, or QEMU).",
    )
    p.add_argument("runtimes", nargs="*", help="runtimes to boot (default: every image of the format that exists)")
    p.add_argument("--arch", default=host_arch(), choices=ARCHES)
    p.add_argument("--format", default="ext4", choices=sorted(WRITERS), help="which image to boot (default ext4)")
    p.add_argument(
        "--read-only",
        action="store_true",
        help="attach an ext4 image read-only, in place, with an overlay (squashfs always is)",
    )
    p.add_argument(
        "--overlay",
        default="tmpfs",
        choices=["tmpfs", "disk"],
        help="a read-only boot's writable layer: in RAM, or a scratch ext4 drive per VM (default tmpfs)",
    )
    p.add_argument("--vmm", default="auto", choices=["auto", "firecracker", "qemu"])
    p.add_argument("--jailer", action="store_true",
                   help="start Firecracker through bin/jailer (chroot, cgroup, uid/gid 65534), as in production; "
                   "needs root")  # fmt: skip
    p.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"], help="QEMU accelerator")
    p.add_argument("--kernel", type=Path, help="guest kernel (default: bin/vmlinux from 'nox -s download')")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per VM (default 300: TCG is slow)")
    p.add_argument("--report", type=Path, help="also write the results as JSON here (CI: boot-to-ready times)")
    p.add_argument("--frozen", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    results = boot_all(pins, args)
    if args.report:
        atomic.write_text(args.report, json.dumps([r.as_json() for r in results], indent=1) + "\n")
    return 0 if results and all(r.ok for r in results) else 1


def boot_all(pins: Pins, args: argparse.Namespace) -> list[BootResult]:
    arch = args.arch
    images = paths.images_dir(arch)
    known = pins.alpine.runtimes
    for rt in args.runtimes:
        if rt not in known:
            raise BootFailed(f"unknown runtime {rt!r}", hint=f"runtimes in pins.json: {', '.join(known)}")
    chosen = args.runtimes or [rt for rt in known if (images / f"{rt}.{args.format}").is_file()]
    if not chosen:
        raise BootFailed(f"no {args.format} images in {images}", hint="run 'nox -s rootfs_all' first (a format "
                         "other than ext4 must be listed in alpine.formats)")  # fmt: skip
    kernel = args.kernel or paths.bin_dir(arch) / "vmlinux"
    if not kernel.is_file():
        raise BootFailed(f"kernel {kernel} is missing", hint="run 'nox -s download', or pass --kernel PATH")
    config = kconfig.read(kernel)
    formats = [args.format, "overlay"] if args.read_only else [args.format]  # a read-only root needs the overlay
    lacking = kconfig.missing(config, formats) if config is not None else []
    if lacking:
        raise BootFailed(
            f"kernel {kernel} cannot boot a {args.format} image{' read-only' if args.read_only else ''}: "
            f"its configuration lacks {', '.join(lacking)}",
            hint="use a kernel built with them (Firecracker's CI kernels are), or boot another --format",
        )
    which_vmm, why = choose_vmm(args.vmm, arch)
    if args.jailer and which_vmm != "firecracker":
        raise BootFailed(f"--jailer starts Firecracker, which cannot run here ({why})", hint="drop --jailer")
    log.info(f"boot: using {which_vmm}: {why}")
    logs = images / ".boot"
    logs.mkdir(parents=True, exist_ok=True)
    results = []
    for rt in chosen:
        image = images / f"{rt}.{args.format}"
        if not image.is_file():
            raise BootFailed(
                f"{image} is missing", hint=f"run 'nox -s rootfs-{rt}' (with {args.format} in its formats)"
            )
        t = Target(rt, image, args.format, args.read_only or args.format != "ext4", args.overlay)
        if which_vmm == "qemu":
            r = boot_qemu(t, kernel, arch, args.timeout, args.accel, logs)
        else:
            jailer = paths.bin_dir(arch) / "jailer" if args.jailer else None
            if jailer is not None and os.geteuid() != 0:
                raise BootFailed("the jailer needs root: it chroots, makes /dev/kvm and drops to uid 65534",
                                 hint="run boot as root, or without --jailer")  # fmt: skip
            try:
                r = boot_firecracker(t, known[rt], kernel, paths.bin_dir(arch) / "firecracker", args.timeout, logs,
                                     jailer)  # fmt: skip
            except (VulcanError, OSError) as exc:
                r = BootResult(rt, "firecracker", False, 0.0, str(exc), logs / f"{rt}.{t.fmt}.firecracker.console.log")
        r.fmt = t.fmt
        results.append(r)
        what = "boot-to-smoke" if which_vmm == "qemu" else "boot-to-ready"
        status = "ok" if r.ok else "FAILED"
        log.info(f"boot {t.label}: {status} via {r.vmm}: {what} {r.seconds:.1f}s, copied {log.human(r.copied_bytes)}: "
                 f"{r.detail}")  # fmt: skip
    for r in results:
        if not r.ok:
            log.warn(f"boot {r.runtime} failed; console log: {r.console}")
    return results
