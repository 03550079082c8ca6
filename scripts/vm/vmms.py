"""The VMMs `boot` can use: one record each, as formats/ has one per image format.

A record says what the VMM needs on this host (``problem``), what runs (``describe``), how it
boots a target and what its time measures, and whether it takes the jailer and the API socket
and restores snapshots. ``boot`` chooses and dispatches through this table alone (``--vmm auto``
tries them in its order), so a VMM is one record here and its module beside this one; a test
registers a stand-in VMM and the real ``boot`` runs through it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import paths
from ..pins import Runtime
from . import BootResult, Target, kvm_problem


@dataclass(frozen=True)
class Options:
    """What a user asked of a boot beyond the target; each VMM takes what applies to it."""

    jailed: bool = False  # Firecracker's jailer
    api: bool = False  # Firecracker's API socket instead of --config-file
    accel: str = "auto"  # QEMU's accelerator


@dataclass(frozen=True)
class Vmm:
    name: str  # --vmm NAME, and what a result says it booted with
    label: str  # how messages name it
    measures: str  # what its time is: "boot-to-ready" (the agent's ready line), "boot-to-smoke"
    problem: Callable[[str], str | None]  # why it cannot run on this host for an arch (None: it can)
    describe: Callable[[str], str]  # what runs, for the log
    boot: Callable[[Target, Runtime, Path, str, float, Options], BootResult]
    install: str  # what to do when it is missing
    jails: bool = False  # --jailer and --api apply
    restores: bool = False  # boot --restore starts clones with it


def _firecracker_problem(arch: str) -> str | None:
    fc = paths.vmm(arch, "firecracker")
    return kvm_problem() or (None if fc.is_file() else f"{fc} is missing (run 'nox -s download')")


def _firecracker_boot(t: Target, rt: Runtime, kernel: Path, arch: str, timeout: float, o: Options) -> BootResult:
    from .firecracker import boot_firecracker

    return boot_firecracker(t, rt, kernel, arch, timeout, o.jailed, o.api)


def _qemu_binary(arch: str) -> str:
    from .qemu import QEMU

    return QEMU[arch]


def _qemu_problem(arch: str) -> str | None:
    return None if shutil.which(_qemu_binary(arch)) else f"{_qemu_binary(arch)} not found"


def _qemu_boot(t: Target, rt: Runtime, kernel: Path, arch: str, timeout: float, o: Options) -> BootResult:
    from .qemu import boot_qemu

    return boot_qemu(t, kernel, arch, timeout, o.accel)


VMMS: dict[str, Vmm] = {  # in the order --vmm auto tries them
    "firecracker": Vmm("firecracker", "Firecracker", "boot-to-ready", _firecracker_problem,
                       lambda arch: f"{paths.vmm(arch, 'firecracker')} with /dev/kvm", _firecracker_boot,
                       "run 'nox -s download' on a host with /dev/kvm", jails=True, restores=True),
    "qemu": Vmm("qemu", "QEMU", "boot-to-smoke", _qemu_problem, lambda arch: shutil.which(_qemu_binary(arch)) or "",
                _qemu_boot, "install qemu-system-x86 (Debian) for --vmm qemu"),
}  # fmt: skip
