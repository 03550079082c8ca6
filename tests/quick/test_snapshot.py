"""Snapshots' pure logic: the host CPU, what a snapshot is bound to, the kernel it needs, a deep
API socket path (the snapshots themselves, with the real Firecracker: tests/system/test_snapshot.py)."""

from __future__ import annotations

import os
from pathlib import Path

from scripts import kconfig
from scripts.vm.snapshot import BINDING, differences, host_cpu


def test_host_cpu_reads_x86_and_arm64_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: sse2 fpu avx2\n\nprocessor\t: 1\n"
                    "model name\t: other\nflags\t\t: fpu\n")  # fmt: skip
    assert host_cpu(info) == ("AMD EPYC 7B13", ["avx2", "fpu", "sse2"])
    info.write_text("processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd aes\nCPU implementer\t: 0x41\n"
                    "CPU architecture: 8\nCPU variant\t: 0x1\nCPU part\t: 0xd0c\nCPU revision\t: 1\n")  # fmt: skip
    assert host_cpu(info) == ("implementer=0x41 architecture=8 variant=0x1 part=0xd0c revision=1",
                              ["aes", "asimd", "fp"])  # fmt: skip


def test_binding_differences_name_the_field_and_the_flags() -> None:
    b = {f: f"{f}-value" for f in BINDING} | {"cpu_flags": ["avx2", "fpu"], "ready": True}
    assert differences(b, b) == []
    other = b | {"cpu_flags": ["fpu", "sse4"], "kernel_sha256": "k2"}
    assert differences(b, other) == [
        "kernel_sha256: the snapshot has 'kernel_sha256-value', this host 'k2'",
        "cpu_flags: this host lacks ['avx2'] and adds ['sse4']",
    ]


def test_snapshots_need_a_kernel_that_reseeds_on_restore() -> None:
    config = {o: "y" for o in (*kconfig.EVERY_GUEST, "EXT4_FS")}
    assert kconfig.missing(config, ["ext4"]) == []
    assert kconfig.missing(config, ["ext4"], snapshot=True) == ["CONFIG_VMGENID"]
    assert kconfig.missing(config | {"VMGENID": "y"}, ["ext4"], snapshot=True) == []


def test_a_unix_socket_deeper_than_sun_path_is_reached(tmp_path: Path) -> None:
    """Firecracker makes its sockets relative to its working directory; a clone's directory
    under a deep checkout gives paths longer than connect(2) takes (108 bytes)."""
    import socket

    from scripts.vm import connect_unix

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    fd = os.open(deep, os.O_PATH | os.O_DIRECTORY)
    with socket.socket(socket.AF_UNIX) as server, socket.socket(socket.AF_UNIX) as client:
        server.bind(f"/proc/self/fd/{fd}/api.sock")
        os.close(fd)
        server.listen(1)
        assert len(str(deep / "api.sock")) > 108
        connect_unix(client, deep / "api.sock")
        conn, _ = server.accept()
        client.sendall(b"hi")
        assert conn.recv(2) == b"hi"
        conn.close()
