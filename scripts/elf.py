"""Reads ELF and arm64 Image headers, in Python (no file(1)): machine type and static linking.

Field offsets from the ELF-64 specification (System V gABI, "ELF Header" and "Program
Header"); the arm64 Image header from the kernel's Documentation/arch/arm64/booting.rst.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from .errors import BuildError

EM = {62: "x86_64", 183: "aarch64"}
PT_DYNAMIC, PT_INTERP = 2, 3
ARM64_IMAGE_MAGIC = b"ARM\x64"  # at offset 56 of an arm64 Image


@dataclass(frozen=True)
class ElfInfo:
    machine: str  # x86_64, aarch64 or "e_machine N"
    elf_type: int  # 2 = EXEC, 3 = DYN
    interpreter: bool
    dynamic: bool
    interpreter_path: str = ""  # PT_INTERP's path: /lib/ld-musl-x86_64.so.1, /lib64/ld-linux-x86-64.so.2

    @property
    def static(self) -> bool:
        return not self.interpreter and not self.dynamic


def read_elf(path: Path) -> ElfInfo:
    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF":
            raise BuildError(f"{path}: not an ELF file")
        if head[4] != 2 or head[5] != 1:
            raise BuildError(f"{path}: not a 64-bit little-endian ELF file")
        e_type, e_machine = struct.unpack_from("<HH", head, 16)
        (e_phoff,) = struct.unpack_from("<Q", head, 32)
        e_phentsize, e_phnum = struct.unpack_from("<HH", head, 54)
        f.seek(e_phoff)
        table = f.read(e_phentsize * e_phnum)
        kinds = {struct.unpack_from("<I", table, i * e_phentsize)[0] for i in range(e_phnum)}
        interp = ""
        for i in range(min(e_phnum, len(table) // max(e_phentsize, 1))):
            # Elf64_Phdr: p_type, p_flags, p_offset (at 8), p_vaddr, p_paddr, p_filesz (at 32)
            at = i * e_phentsize
            if struct.unpack_from("<I", table, at)[0] == PT_INTERP:
                (offset,), (size,) = struct.unpack_from("<Q", table, at + 8), struct.unpack_from("<Q", table, at + 32)
                f.seek(offset)
                interp = f.read(min(size, 4096)).split(b"\0", 1)[0].decode("utf-8", "replace")
    machine = EM.get(e_machine, f"e_machine {e_machine}")
    return ElfInfo(machine, e_type, PT_INTERP in kinds, PT_DYNAMIC in kinds, interp)


def check_static_binary(path: Path, arch: str) -> ElfInfo:
    """A static executable for ``arch``, else BuildError saying which check failed."""
    info = read_elf(path)
    if info.machine != arch:
        raise BuildError(f"{path}: built for {info.machine}, expected {arch}")
    if info.interpreter:
        raise BuildError(f"{path}: not statically linked (has a PT_INTERP program interpreter)")
    if info.dynamic:
        raise BuildError(f"{path}: not statically linked (has a PT_DYNAMIC section)")
    return info


def kernel_arch(path: Path) -> str | None:
    """x86_64 for an ELF vmlinux, aarch64 for an arm64 Image (or an aarch64 ELF), else None."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head[:4] == b"\x7fELF":
        try:
            return read_elf(path).machine
        except BuildError:
            return None
    if len(head) >= 60 and head[56:60] == ARM64_IMAGE_MAGIC:
        return "aarch64"
    return None
