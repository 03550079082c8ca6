"""The guest kernel's embedded configuration (CONFIG_IKCONFIG): can it mount our images?

With CONFIG_IKCONFIG=y the kernel carries its .config as a gzip blob between the markers
``IKCFG_ST`` and ``IKCFG_ED`` (kernel/configs.c, scripts/extract-ikconfig), in an ELF vmlinux and
in an uncompressed arm64 Image alike. Firecracker's CI kernels are built with it
(resources/guest_configs/ci.config), and so are the test kernels in ../shared.
"""

from __future__ import annotations

import mmap
import zlib
from pathlib import Path

from .formats import OVERLAY_NEEDS
from .formats import get as get_format

START, END = b"IKCFG_ST", b"IKCFG_ED"
# What every guest needs built in (=y: there is no initramfs to load modules from); each image
# format's own needs are in its record (formats/__init__.py). PID_NS: the agent runs each
# program in a PID namespace of its own, so that nothing it starts outlives it (guest/README.md).
EVERY_GUEST = ("VIRTIO_BLK", "VIRTIO_VSOCKETS", "DEVTMPFS", "PID_NS")
# What a kernel needs for snapshots that sandboxes start from: every clone of a snapshot resumes
# with the same memory, hence the same random state; Firecracker changes the VM generation ID
# on restore and a kernel with VMGENID (Linux >= 5.18) reseeds its RNG from it (Firecracker's
# docs/snapshotting/snapshot-support.md, "Reusing snapshotted states securely").
SNAPSHOT_NEEDS = ("VMGENID",)


def read(kernel: Path) -> dict[str, str] | None:
    """``{"EXT4_FS": "y", ...}`` from the kernel file, or None when it embeds no configuration."""
    with open(kernel, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        start = data.find(START)
        if start < 0:
            return None
        end = data.find(END, start)
        blob = data[start + len(START) : end if end > 0 else len(data)]
    try:
        text = zlib.decompressobj(31).decompress(blob).decode("utf-8", "replace")
    except zlib.error:
        return None
    config: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            key, _, value = line[len("CONFIG_") :].partition("=")
            config[key] = value.strip('"')
    return config


def missing(config: dict[str, str], formats: list[str], read_only: bool = False, snapshot: bool = False) -> list[str]:
    """The options booting these formats needs that the kernel does not build in, as CONFIG_
    names. A format that is not writable is booted read-only, which needs the overlay too;
    ``snapshot``: sandboxes start from snapshots of it (SNAPSHOT_NEEDS)."""
    records = [get_format(f) for f in formats]
    overlay = OVERLAY_NEEDS if read_only or not all(r.writable for r in records) else ()
    wanted = [
        *EVERY_GUEST,
        *(o for r in records for o in r.kernel_needs),
        *overlay,
        *(SNAPSHOT_NEEDS if snapshot else ()),
    ]
    return [f"CONFIG_{o}" for o in dict.fromkeys(wanted) if config.get(o) != "y"]


# Options that weaken a sandbox: warned about, not refused (a test kernel may have them).
RISKY = {
    "VSOCKETS_LOOPBACK": "a process in the guest can open vsock connections inside the guest (CID 1); the agent "
    "refuses every peer but the host (CID 2), but nothing else in a sandbox should rely on that: build sandbox "
    "kernels without it",
}


def risky(config: dict[str, str]) -> list[str]:
    """``CONFIG_X=y: why`` for each option of RISKY that the kernel has."""
    return [f"CONFIG_{o}={config[o]}: {why}" for o, why in RISKY.items() if config.get(o) in ("y", "m")]
