"""`nox -s boot`: prove that images boot and run their runtime.

- Firecracker (needs /dev/kvm; firecracker.py): ``bin/firecracker --no-api --config-file``,
  wait for ``vulcan-guest: ready`` on the serial console, reach the agent over vsock, run the
  runtime check and a program, stop the VM; reports boot-to-ready time. ``--jailer``: through
  the jailer, as in production.
- QEMU (``--vmm qemu``; qemu.py): ``microvm``/``virt`` with virtio-mmio, KVM if usable else TCG,
  and ``vulcan.smoke=1``: success is the agent's ``vulcan-smoke: ok`` line; reports boot-to-smoke.
Every VM runs under a timeout and is always killed; a writable one on a scratch copy of the
image, a read-only one on the image itself with an overlay (__init__.py).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from pathlib import Path

from .. import atomic, formats, kconfig, log, paths, settings
from ..arch import ARCHES, host_arch
from ..errors import UsageError, VulcanError
from ..pins import Pins, Runtime
from ..pins import load as load_pins
from ..steps import prog
from . import BootFailed, BootResult, Target, kvm_caveat
from .firecracker import cgroup_v2_problem
from .restore import Restored, report, restore, shared_state
from .snapshot import MANIFEST
from .vmms import VMMS, Options, Vmm


def choose_vmm(requested: str, arch: str) -> tuple[str, str]:
    """The VMM to boot with (``requested``, or with ``auto`` the first of VMMS that can run
    here) and what runs, for the log; BootFailed saying what each one lacks otherwise."""
    lacking: dict[str, str] = {}
    for name, vmm in VMMS.items():
        if requested not in ("auto", name):
            continue
        problem = vmm.problem(arch)
        if problem is None:
            passed = "".join(f" ({VMMS[n].label} not usable: {p})" for n, p in lacking.items())
            return name, vmm.describe(arch) + passed
        if requested == name:
            others = " or ".join(f"--vmm {n}" for n in VMMS if n != name)
            raise BootFailed(f"cannot boot with {vmm.label}: {problem}", hint=f"or use {others}")
        lacking[name] = problem
    raise BootFailed(f"no VMM can run here: {'; '.join(f'{VMMS[n].label}: {p}' for n, p in lacking.items())}",
                     hint="; or ".join(VMMS[n].install for n in lacking))  # fmt: skip


def main(argv: list[str]) -> int:
    pins = load_pins()
    p = argparse.ArgumentParser(
        prog=prog("boot"),
        description="Boot images and prove their runtime works (Firecracker with /dev/kvm, or QEMU).",
    )
    p.add_argument("runtimes", nargs="*", help="runtimes to boot (default: every image of the format that exists)")
    p.add_argument("--arch", default=host_arch(), choices=ARCHES)
    p.add_argument("--format", choices=formats.NAMES,
                   help=f"which image to boot (default {formats.DEFAULT[0]}; with --restore {formats.SHARED}, as "
                   "snapshot makes)")  # fmt: skip
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
    p.add_argument(
        "--append",
        default="",
        metavar="WORDS",
        help="more kernel command line words after ours, e.g. 'vulcan.overlay_size=64m loglevel=8'",
    )
    p.add_argument(
        "--vmm", default="auto", choices=["auto", *VMMS], help="which VMM (default: the first that can run here)"
    )
    p.add_argument("--jailer", action="store_true",
                   help="start Firecracker through bin/jailer (chroot, cgroup, uid/gid 65534), as in production; "
                   "needs root")  # fmt: skip
    p.add_argument(
        "--api",
        action="store_true",
        help="configure Firecracker through its API socket (as Vulcan hosts do), not --config-file",
    )
    p.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"], help="QEMU's accelerator")
    p.add_argument("--kernel", type=Path, help="guest kernel (default: bin/vmlinux from 'nox -s download')")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help=f"seconds per VM to its agent (default VULCAN_BOOT_TIMEOUT or {settings.BOOT_TIMEOUT:g}); "
                   f"with --restore, per clone to its first result (VULCAN_RESTORE_TIMEOUT or "
                   f"{settings.RESTORE_TIMEOUT:g})")  # fmt: skip
    p.add_argument("--report", type=Path, help="also write the results as JSON here (CI: boot-to-ready times)")
    p.add_argument("--restore", action="store_true",
                   help="start the runtimes from their snapshots ('nox -s snapshot') instead of booting them; "
                   "reports restore-to-first-result beside a cold boot-to-ready")  # fmt: skip
    p.add_argument("--count", type=int, default=1, metavar="N", help="with --restore: N sandboxes at once (default 1)")
    p.add_argument("--no-cold", action="store_true", help="with --restore: skip the cold boot measured beside it")
    p.add_argument("--frozen", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.timeout is not None and not args.timeout > 0:
        raise UsageError(f"--timeout {args.timeout:g}: want more than 0 seconds")
    # snapshot makes the shared, read-only format's snapshot by default: --restore finds it
    args.format = args.format or (formats.SHARED if args.restore else formats.DEFAULT[0])
    if args.restore:
        restored = restore_all(pins, args)
        if args.report:
            atomic.write_text(args.report, json.dumps([r.as_json() for r in restored], indent=1) + "\n")
        return 0 if restored and all(r.ok for r in restored) else 1
    if args.count != 1 or args.no_cold:
        raise UsageError("--count and --no-cold go with --restore", hint="add --restore, or drop them")
    results = boot_all(pins, args)
    if args.report:
        atomic.write_text(args.report, json.dumps([r.as_json() for r in results], indent=1) + "\n")
    return 0 if results and all(r.ok for r in results) else 1


def restore_all(pins: Pins, args: argparse.Namespace) -> list[Restored]:
    """``--restore``: each runtime's snapshot, ``--count`` clones at once, and a cold boot beside them."""
    arch, known = args.arch, pins.alpine.runtimes
    restorer = next(n for n, v in VMMS.items() if v.restores)  # the VMM that makes and restores snapshots
    if args.vmm not in ("auto", restorer) or args.read_only or args.overlay != "tmpfs" or args.append:
        raise BootFailed(f"--restore starts {VMMS[restorer].label} from a snapshot, whose VM is fixed when it is "
                         "made: --vmm, --read-only, --overlay and --append do not apply",
                         hint="drop them (a read-only image's clones get a tmpfs overlay)")  # fmt: skip
    _jailer_needs_root(args)
    no_cgroup = cgroup_v2_problem() if args.jailer else None
    if no_cgroup:
        log.warn(f"!!! boot --restore: clones jailed WITHOUT a memory limit: {no_cgroup} !!!")
    if args.count < 1:
        raise BootFailed(f"--count {args.count}: want at least 1")
    _check_runtimes(args.runtimes, known)
    chosen = args.runtimes or [rt for rt in known if (paths.snapshot(rt, args.format, arch) / MANIFEST).is_file()]
    if not chosen:
        raise BootFailed(f"no {args.format} snapshots in {paths.images_dir(arch) / 'snapshots'}",
                         hint=f"run 'nox -s snapshot -- --format {args.format}' first")  # fmt: skip
    which_vmm, why = choose_vmm(restorer, arch)
    kernel = args.kernel or paths.kernel(arch)
    log.info(f"boot --restore: using {which_vmm}: {why}")
    out = []
    for rt in chosen:
        image = paths.image(rt, args.format, arch)
        t = Target(rt, image, args.format, not formats.get(args.format).writable, "tmpfs")
        clones = restore(known[rt], t, arch, kernel, args.count, args.timeout or settings.restore_timeout(),
                         args.jailer)  # fmt: skip
        r = Restored(rt, args.format, clones, problems=shared_state(clones))
        if not args.no_cold:
            r.cold = _boot_with(VMMS[which_vmm], t, known[rt], kernel, arch, settings.boot_timeout(),
                                Options(jailed=args.jailer, api=True))  # fmt: skip
        report(r)
        out.append(r)
    return out


def _boot_with(vmm: Vmm, t: Target, rt: Runtime, kernel: Path, arch: str, timeout: float, o: Options) -> BootResult:
    """One boot through a VMM's record; an error it raises is this boot's failed result."""
    try:
        return vmm.boot(t, rt, kernel, arch, timeout, o)
    except (VulcanError, OSError) as exc:
        return BootResult(t.runtime, t.fmt, vmm.name, False, 0.0, str(exc),
                          paths.console_log(t.runtime, t.fmt, vmm.name, arch))  # fmt: skip


def _jailer_needs_root(args: argparse.Namespace) -> None:
    if args.jailer and os.geteuid() != 0:
        raise BootFailed("the jailer needs root: it chroots, makes /dev/kvm and drops to uid 65534",
                         hint="run boot as root, or without --jailer")  # fmt: skip


def _check_runtimes(asked: list[str], known: Mapping[str, object]) -> None:
    for rt in asked:
        if rt not in known:
            raise UsageError(f"unknown runtime {rt!r}", hint=f"runtimes in pins.json: {', '.join(known)}")


def boot_all(pins: Pins, args: argparse.Namespace) -> list[BootResult]:
    arch = args.arch
    images = paths.images_dir(arch)
    known = pins.alpine.runtimes
    _check_runtimes(args.runtimes, known)
    chosen = args.runtimes or [rt for rt in known if paths.image(rt, args.format, arch).is_file()]
    if not chosen:
        raise BootFailed(f"no {args.format} images in {images}", hint="run 'nox -s rootfs_all' first (a format "
                         f"other than {formats.DEFAULT[0]} must be listed in alpine.formats)")  # fmt: skip
    kernel = args.kernel or paths.kernel(arch)
    if not kernel.is_file():
        raise BootFailed(f"kernel {kernel} is missing", hint="run 'nox -s download', or pass --kernel PATH")
    config = kconfig.read(kernel)
    lacking = kconfig.missing(config, [args.format], args.read_only) if config is not None else []
    if lacking:
        raise BootFailed(
            f"kernel {kernel} cannot boot a {args.format} image{' read-only' if args.read_only else ''}: "
            f"its configuration lacks {', '.join(lacking)}",
            hint="use a kernel built with them (Firecracker's CI kernels are), or boot another --format",
        )
    for risk in kconfig.risky(config or {}):
        log.warn(f"kernel {kernel}: {risk}")
    which_vmm, why = choose_vmm(args.vmm, arch)
    if (args.jailer or args.api) and not VMMS[which_vmm].jails:
        raise BootFailed(f"--jailer and --api start Firecracker, which cannot run here ({why})",
                         hint="drop them")  # fmt: skip
    log.info(f"boot: using {which_vmm}: {why}")
    _jailer_needs_root(args)
    results = []
    timeout = args.timeout or settings.boot_timeout()
    options = Options(jailed=args.jailer, api=args.api, accel=args.accel)
    tried: set[str] = set()
    for rt in chosen:
        image = paths.image(rt, args.format, arch)
        if not image.is_file():
            raise BootFailed(
                f"{image} is missing", hint=f"run 'nox -s rootfs-{rt}' (with {args.format} in its formats)"
            )
        t = Target(rt, image, args.format, args.read_only or not formats.get(args.format).writable, args.overlay,
                   args.append)  # fmt: skip
        r = _boot_with(VMMS[which_vmm], t, known[rt], kernel, arch, timeout, options)
        if r.stopped_by_host and args.vmm == "auto" and not args.jailer:
            tried.add(which_vmm)
            following = next((n for n in VMMS if n not in tried and VMMS[n].problem(arch) is None), None)
            if following is not None:
                log.warn(f"boot {rt}: leaving {VMMS[which_vmm].label}: {r.detail}; booting with "
                         f"{VMMS[following].label} instead (console log of the {VMMS[which_vmm].label} attempt: "
                         f"{r.console})")  # fmt: skip
                which_vmm = following  # and for the runtimes after this one
                r = _boot_with(VMMS[which_vmm], t, known[rt], kernel, arch, timeout, options)
        results.append(r)
        what = VMMS[which_vmm].measures
        if r.vmm == "firecracker":
            what += kvm_caveat()
        if r.ok:
            log.info(f"boot {t.label}: ok via {r.vmm}: {what} {r.seconds:.1f}s, copied {log.human(r.copied_bytes)}: "
                     f"{r.detail}")  # fmt: skip
        else:
            log.info(f"boot {t.label}: FAILED via {r.vmm} after {r.seconds:.1f} s: {r.detail}")
    for r in results:
        if not r.ok:
            log.warn(f"boot {r.runtime} failed; console log: {r.console}")
    return results
