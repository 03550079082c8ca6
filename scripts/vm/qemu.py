"""Booting an image under QEMU: ``microvm`` (x86_64) or ``virt`` (aarch64), KVM if usable else TCG.

The guest runs the agent's smoke check (``vulcan.smoke=1``): success is its ``vulcan-smoke: ok``
line on the serial console, timed from QEMU's start (boot-to-smoke).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from .. import log, paths, workspace
from ..arch import host_arch
from . import STALL_S, STALLED, BootResult, Disks, Target, exit_status, kvm_problem, prepare_disks, running

QEMU = {"x86_64": "qemu-system-x86_64", "aarch64": "qemu-system-aarch64"}
_kvm_failed: list[str] = []  # KVM that failed once (e.g. nested KVM for patched guests only) is not tried again


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


def boot_qemu(t: Target, kernel: Path, arch: str, timeout: float, accel: str, retry: bool = True) -> BootResult:
    runtime = t.runtime
    auto = accel == "auto"
    if auto:  # KVM runs this host's architecture only
        accel = "kvm" if arch == host_arch() and kvm_problem() is None and not _kvm_failed else "tcg"
    with workspace.scratch(Path(tempfile.gettempdir()), "boot") as tmp:
        disks = prepare_disks(t.image, t.fmt, t.read_only, t.overlay, tmp)
        console_log = paths.console_log(runtime, t.fmt, "qemu", arch)
        args = f"reboot=k panic=1 {disks.kernel_args(with_root=True)} vulcan.smoke=1"
        if accel == "tcg":
            args = f"{args} {tcg_kernel_args(arch)}".strip()
        args = f"{args} {t.append}".strip()
        cmd = qemu_command(arch, kernel, disks, accel, args)
        log.info(f"boot {t.label}: {' '.join(cmd[:3])} ... (accel {accel}, console log {console_log})")
        start = time.monotonic()
        with running(cmd, console_log) as (proc, console):
            line = console.wait_for(
                ("vulcan-smoke: ok", "vulcan-smoke: fail", "vulcan-overlay: fail", "KVM internal error",
                 "Kernel panic"),
                start + timeout,
                stall=STALL_S,
            )  # fmt: skip
            exited = exit_status(proc, console) if line is None else None  # before it is killed
        seconds = time.monotonic() - start
    if auto and accel == "kvm" and not (line and "vulcan-smoke:" in line):
        # A KVM that cannot run this guest fails in several ways: "KVM internal error", or QEMU
        # itself aborting ("failed to set MSR 0x10a", seen on nested paravirtual KVM). The guest
        # never reached its smoke check, so that says nothing about the image: use TCG.
        why = line.strip() if line and line != STALLED else (console.tail[-1] if console.tail else "no output")
        _kvm_failed.append(why)
        log.warn(f"boot {runtime}: KVM is not usable for this guest here ({why}); retrying with TCG")
        return boot_qemu(t, kernel, arch, timeout, "tcg")
    if line == STALLED and retry:
        log.warn(f"boot {runtime}: the guest printed nothing for {STALL_S:.0f}s (hung early); trying once more")
        return boot_qemu(t, kernel, arch, timeout, accel, retry=False)
    if line == STALLED:
        line = f"the guest hung: no console output for {STALL_S:.0f}s"
    ok = line is not None and "vulcan-smoke: ok" in line
    if line is not None and ok:
        detail = line.split("vulcan-smoke: ok", 1)[1].strip()
    elif line is None and exited is not None:  # QEMU itself gave up (a bad kernel, a bad drive): its words
        detail = f"QEMU exited with status {exited} after {seconds:.1f}s, before the guest's smoke check: " + (
            " | ".join(console.tail[-5:]) or "no output"
        )
    else:
        why = line.strip() if line else (f"no 'vulcan-smoke' line within {timeout:g} s: the VM had reached "
                                         f"{console.progress()}; raise VULCAN_BOOT_TIMEOUT or --timeout on a slow "
                                         "host")  # fmt: skip
        detail = f"{why}; last console lines: {console.tail[-5:]}"
    return BootResult(runtime, t.fmt, f"qemu ({accel})", ok, seconds, detail, console_log, disks.copied_bytes)
