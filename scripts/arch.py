"""The architectures images are built for, and this host's: a leaf every layer may import.

``ARCHES`` in the kernel's spelling (Firecracker's release names, Alpine's), ``GOARCH`` in Go's.
"""

from __future__ import annotations

import os

ARCHES = ("x86_64", "aarch64")
GOARCH = {"x86_64": "amd64", "aarch64": "arm64"}


def host_arch() -> str:
    machine = os.uname().machine.lower()  # platform.machine(), without importing platform
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
