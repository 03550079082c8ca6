"""mke2fs with the CPU's CRC-32C instruction, where that is known to give the same image.

``ext4_crc32c.c`` is built once into the cache and given to mke2fs as LD_PRELOAD (see that file:
the same function libext2fs computes with a table, so the same image bytes; mke2fs of a real
83-package world 0.16-0.19 -> 0.11-0.13 s).

Used only where it is known to be right: x86-64 with SSE4.2, a C compiler to build it (``cc``),
a check against a reference CRC-32C before its first use, and ``VULCAN_MKE2FS_CRC32C`` not 0.
Otherwise mke2fs runs as it is, and the build says nothing: it is only slower. The build's
e2fsck check, and ``verify``'s, run without it. The built file lives in the cache (``tools/``),
named by its source's digest, trusted as the Go build cache is: it is this user's own build
output, and it links to nothing (not even libc), so a cache shared between hosts can share it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from pathlib import Path

from .. import log, paths, settings
from ..errors import ToolMissing
from ..run import minimal_env, run_tool, which

SOURCE = Path(__file__).with_name("ext4_crc32c.c")
POLY = 0x82F63B78  # CRC-32C (Castagnoli), reflected

_lock = threading.Lock()
_built: dict[Path, Path | None] = {}


def _bitwise(crc: int) -> int:
    for _ in range(8):
        crc = (crc >> 1) ^ (POLY & -(crc & 1))
    return crc


_TABLE = tuple(_bitwise(i) for i in range(256))


def crc32c(crc: int, data: bytes) -> int:
    """The reference: ext2fs_crc32c_le's register update, a byte at a time (slow; for the check)."""
    for byte in data:
        crc = (crc >> 8) ^ _TABLE[(crc ^ byte) & 0xFF]
    return crc


def _cpu_has_sse42() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return "sse4_2" in line.split()
    except OSError:
        pass
    return False


def preload() -> Path | None:
    """The shared object to put in mke2fs's LD_PRELOAD, or None (mke2fs as it is)."""
    if not settings.mke2fs_crc32c() or os.uname().machine != "x86_64":
        return None
    tools = settings.cache_dir() / "tools"
    with _lock:  # `rootfs --all` writes its images in threads
        if tools not in _built:
            _built[tools] = _find_or_build(tools) if _cpu_has_sse42() else None
        return _built[tools]


def _find_or_build(tools: Path) -> Path | None:
    built = tools / f"ext2fs-crc32c-{hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:24]}.so"
    if built.is_file():  # checked when it was built (it needs nothing but the CPU)
        return built
    try:
        cc = which("cc")
    except ToolMissing:
        return None
    tmp = tools / f".{built.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        paths.claim_cache()  # `clean --all` removes what is ours in it: tools/ is
        tools.mkdir(parents=True, exist_ok=True)
        proc = run_tool([cc, "-O2", "-shared", "-fPIC", "-o", tmp, SOURCE], env=minimal_env(), quiet=True,
                        check=False)  # fmt: skip
        if proc.returncode != 0:
            log.debug(f"mke2fs runs without the CRC-32C instruction: {cc} could not build {SOURCE.name}: "
                      f"{proc.stderr.decode(errors='replace')[-300:]}")  # fmt: skip
            return None
        problem = check(tmp)
        if problem is not None:
            log.warn(f"mke2fs runs without the CRC-32C instruction: {SOURCE.name} as {cc} built it {problem}")
            return None
        os.replace(tmp, built)
    except OSError as exc:  # a read-only cache, or one mounted noexec (it cannot be loaded): use nothing
        log.debug(f"mke2fs runs without the CRC-32C instruction: {exc}")
        return None
    finally:
        with contextlib.suppress(OSError):  # after os.replace, or where nothing could be written
            tmp.unlink()
    return built


def check(shared: Path) -> str | None:
    """What is wrong with the built ``ext2fs_crc32c_le`` against the reference (None: nothing):
    the standard check value, then every length to 64 and a block, from three registers."""
    import ctypes

    fn = ctypes.CDLL(str(shared)).ext2fs_crc32c_le
    fn.restype, fn.argtypes = ctypes.c_uint32, [ctypes.c_uint32, ctypes.c_char_p, ctypes.c_size_t]
    if fn(0xFFFFFFFF, b"123456789", 9) ^ 0xFFFFFFFF != 0xE3069283:  # RFC 3720, B.4
        return "gives another CRC-32C of '123456789'"
    data = hashlib.shake_256(b"vulcan crc32c").digest(4096 + 64)
    for seed in (0, 0xFFFFFFFF, 0x1234ABCD):
        for n in (*range(65), 4096 + 7):
            piece = data[64 - n % 64 :][:n]
            if fn(seed, piece, len(piece)) != crc32c(seed, piece):
                return f"gives another CRC of {len(piece)} bytes from {seed:#x}"
    return None
