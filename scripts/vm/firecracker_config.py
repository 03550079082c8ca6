"""The Firecracker config: the ``--config-file`` that boots an image.

Fields as in firecracker's docs/getting-started.md and src/firecracker/swagger/firecracker.yaml:
boot-source, drives, machine-config, vsock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.dumbkbd"
GUEST_CID = 3  # 0-2 are reserved (hypervisor, local, host)


def config(
    kernel: Path,
    rootfs: Path,
    vsock_uds: Path,
    *,
    vcpus: int = 1,
    mem_mib: int = 256,
    extra_args: str = "",
    read_only: bool = False,
    scratch: Path | None = None,
) -> dict[str, Any]:
    """The root drive makes Firecracker append ``root=/dev/vda rw`` (``ro`` when read-only) to
    the command line. A read-only root (squashfs) is shared by every VM, in place; ``scratch``
    is then a per-VM writable drive (/dev/vdb) for the overlay's upper layer."""
    drives: list[dict[str, Any]] = [
        {"drive_id": "rootfs", "path_on_host": str(rootfs), "is_root_device": True, "is_read_only": read_only}
    ]
    if scratch is not None:
        drives.append({"drive_id": "scratch", "path_on_host": str(scratch), "is_root_device": False,
                       "is_read_only": False})  # fmt: skip
    return {
        "boot-source": {
            "kernel_image_path": str(kernel),
            "boot_args": f"{BOOT_ARGS} {extra_args}".strip(),
        },
        "drives": drives,
        "machine-config": {"vcpu_count": vcpus, "mem_size_mib": mem_mib, "smt": False},
        "vsock": {"guest_cid": GUEST_CID, "uds_path": str(vsock_uds)},
        "network-interfaces": [],
    }
