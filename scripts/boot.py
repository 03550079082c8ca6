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

from . import atomic, log, paths
from .agent import AgentClient, vsock_connect
from .errors import VulcanError
from .firecracker_config import config as firecracker_config
from .pins import ARCHES, Pins, Runtime, host_arch
from .pins import load as load_pins

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


def _scratch_copy(image: Path, scratch: Path) -> Path:
    """The VM writes to a copy; the image in images/ is never modified (sparse: holes stay holes)."""
    dest = scratch / image.name
    atomic.sparse_copy(image, dest)
    return dest


# per arch: QEMU machine (x86_64: microvm with virtio-mmio; aarch64: virt) and serial console
QEMU_MACHINE = {
    "x86_64": ("microvm,x-option-roms=off,isa-serial=on,rtc=off", "ttyS0"),
    "aarch64": ("virt", "ttyAMA0"),
}


def qemu_command(arch: str, kernel: Path, image: Path, accel: str, args: str) -> list[str]:
    machine, console = QEMU_MACHINE[arch]
    return [
        QEMU[arch], "-M", machine, "-accel", accel, "-cpu", "max" if accel == "tcg" else "host", "-m", "256",
        "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio", "-no-reboot",
        "-kernel", str(kernel), "-append", f"console={console} {args}",
        "-drive", f"id=root,file={image},format=raw,if=none", "-device", "virtio-blk-device,drive=root",
    ]  # fmt: skip


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


def boot_qemu(
    runtime: str, image: Path, kernel: Path, arch: str, timeout: float, accel: str, logs: Path, retry: bool = True
) -> BootResult:
    auto = accel == "auto"
    if auto:
        accel = "kvm" if kvm_usable() is None and not _kvm_failed else "tcg"
    with atomic.scratch(Path(tempfile.gettempdir()), "boot") as tmp:
        disk = _scratch_copy(image, tmp)
        console_log = logs / f"{runtime}.qemu.console.log"
        args = "reboot=k panic=1 root=/dev/vda rw vulcan.smoke=1"
        if accel == "tcg":
            args = f"{args} {tcg_kernel_args(arch)}".strip()
        cmd = qemu_command(arch, kernel, disk, accel, args)
        log.info(f"boot {runtime}: {' '.join(cmd[:3])} ... (accel {accel}, console log {console_log})")
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
        return boot_qemu(runtime, image, kernel, arch, timeout, "tcg", logs)
    if line == STALLED and retry:
        log.warn(f"boot {runtime}: the guest printed nothing for {STALL_S:.0f}s (hung early); trying once more")
        return boot_qemu(runtime, image, kernel, arch, timeout, accel, logs, retry=False)
    if line == STALLED:
        line = f"the guest hung: no console output for {STALL_S:.0f}s"
    if line and "vulcan-smoke: ok" in line:
        return BootResult(
            runtime, f"qemu ({accel})", True, seconds, line.split("vulcan-smoke: ok", 1)[1].strip(), console_log
        )
    detail = line.strip() if line else f"no 'vulcan-smoke' line within {timeout:.0f}s"
    return BootResult(
        runtime, f"qemu ({accel})", False, seconds, f"{detail}; last console lines: {console.tail[-5:]}", console_log
    )


def boot_firecracker(
    runtime: str, rt: Runtime, image: Path, kernel: Path, firecracker: Path, timeout: float, logs: Path
) -> BootResult:
    with atomic.scratch(Path(tempfile.gettempdir()), "fc") as scratch:
        disk = _scratch_copy(image, scratch)
        uds = scratch / "vsock.sock"
        cfg = scratch / "vm.json"
        cfg.write_text(
            json.dumps(firecracker_config(kernel, disk, uds, extra_args=f"vulcan.port={AGENT_PORT}"), indent=1)
        )
        console_log = logs / f"{runtime}.firecracker.console.log"
        cmd = [str(firecracker), "--no-api", "--config-file", str(cfg)]
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
            return BootResult(runtime, "firecracker", True, ready, detail, console_log)
        finally:
            _kill(proc)
            console.close()


def main(argv: list[str]) -> int:
    pins = load_pins()
    p = argparse.ArgumentParser(
        prog="nox -s boot --",
        description="Boot images and prove their runtime works (Firecracker with /dev/kvm, or QEMU).",
    )
    p.add_argument("runtimes", nargs="*", help="runtimes to boot (default: every image that exists)")
    p.add_argument("--arch", default=host_arch(), choices=ARCHES)
    p.add_argument("--vmm", default="auto", choices=["auto", "firecracker", "qemu"])
    p.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"], help="QEMU accelerator")
    p.add_argument("--kernel", type=Path, help="guest kernel (default: bin/vmlinux from 'nox -s download')")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per VM (default 300: TCG is slow)")
    p.add_argument("--frozen", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return 0 if boot_all(pins, args.runtimes, args.arch, args.vmm, args.accel, args.kernel, args.timeout) else 1


def boot_all(
    pins: Pins, runtimes: list[str], arch: str, vmm: str, accel: str, kernel: Path | None, timeout: float
) -> bool:
    images = paths.images_dir(arch)
    known = pins.alpine.runtimes
    for rt in runtimes:
        if rt not in known:
            raise BootFailed(f"unknown runtime {rt!r}", hint=f"runtimes in pins.json: {', '.join(known)}")
    chosen = runtimes or [rt for rt in known if (images / f"{rt}.ext4").is_file()]
    if not chosen:
        raise BootFailed(f"no images in {images}", hint="run 'nox -s rootfs_all' first")
    kernel = kernel or paths.bin_dir(arch) / "vmlinux"
    if not kernel.is_file():
        raise BootFailed(f"kernel {kernel} is missing", hint="run 'nox -s download', or pass --kernel PATH")
    which_vmm, why = choose_vmm(vmm, arch)
    log.info(f"boot: using {which_vmm}: {why}")
    logs = images / ".boot"
    logs.mkdir(parents=True, exist_ok=True)
    results = []
    for rt in chosen:
        image = images / f"{rt}.ext4"
        if not image.is_file():
            raise BootFailed(f"{image} is missing", hint=f"run 'nox -s rootfs-{rt}'")
        if which_vmm == "qemu":
            r = boot_qemu(rt, image, kernel, arch, timeout, accel, logs)
        else:
            try:
                r = boot_firecracker(rt, known[rt], image, kernel, paths.bin_dir(arch) / "firecracker", timeout, logs)
            except (VulcanError, OSError) as exc:
                r = BootResult(rt, "firecracker", False, 0.0, str(exc), logs / f"{rt}.firecracker.console.log")
        results.append(r)
        what = "boot-to-smoke" if which_vmm == "qemu" else "boot-to-ready"
        status = "ok" if r.ok else "FAILED"
        log.info(f"boot {rt}: {status} via {r.vmm}: {what} {r.seconds:.1f}s: {r.detail}")
    failed = [r for r in results if not r.ok]
    for r in failed:
        log.warn(f"boot {r.runtime} failed; console log: {r.console}")
    return not failed
