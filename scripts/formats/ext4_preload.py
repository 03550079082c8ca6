"""What mke2fs gets in LD_PRELOAD: code that writes the same image sooner, where that is known.

Two helpers, each built once into the cache (``tools/``, or ``VULCAN_TOOLS``: several caches can
share one) with the host's C compiler (``cc``), each with its own switch; where one cannot be
built or is switched off, mke2fs runs without it and the build says nothing (it is only slower).
The build's e2fsck check, and ``verify``'s, run without either, so they judge what was written.

- ``ext4_crc32c.c``: the metadata checksums with the CPU's CRC-32C instruction (the same function
  libext2fs computes with a table; x86-64 with SSE4.2; ``VULCAN_MKE2FS_CRC32C``): mke2fs of a real
  83-package world 0.16-0.19 -> 0.11-0.13 s. Checked against a reference before its first use. It
  links to nothing (not even libc), so a cache shared between hosts can share it.
- ``ext4_iocache.c``: fewer system calls on the image file (``VULCAN_MKE2FS_IO_CACHE``; Linux,
  64-bit): the blocks mke2fs reads back are kept (of its 26,727 reads there, 26,483 no longer a
  system call) and writes that continue each other are gathered (14,425 -> 5,584); whatever reads
  the image reads what it would read without it. It links to libc, so its name carries the
  machine and the C library.

A built file is named by its source's digest and trusted as the Go build cache is: it is this
user's own build output.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

from .. import log, paths, settings
from ..errors import ToolMissing
from ..run import minimal_env, run_tool, which

SOURCE = Path(__file__).with_name("ext4_crc32c.c")
IO_CACHE = Path(__file__).with_name("ext4_iocache.c")
POLY = 0x82F63B78  # CRC-32C (Castagnoli), reflected

_lock = threading.Lock()
_built: dict[tuple[Path, str], Path | None] = {}


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


def preload() -> list[Path]:
    """The shared objects to put in mke2fs's LD_PRELOAD (none: mke2fs as it is). mke2fs must
    also get ``VULCAN_MKE2FS_IMAGE``, the image's path, for the I/O cache (``image_env``)."""
    tools = settings.tools_dir()
    found = []
    if settings.mke2fs_crc32c() and os.uname().machine == "x86_64":
        found.append(_once(tools, "crc32c", lambda: _find_or_build(tools, SOURCE, "ext2fs-crc32c", check)
                           if _cpu_has_sse42() else None))  # fmt: skip
    if settings.mke2fs_io_cache() and os.uname().machine in ("x86_64", "aarch64"):
        libc = (
            "-".join((os.confstr("CS_GNU_LIBC_VERSION") or "").split())
            if "CS_GNU_LIBC_VERSION" in os.confstr_names
            else ""
        )
        if libc:  # glibc: musl's headers make pread64 a macro, and it was not tried there
            name = f"mke2fs-iocache-{os.uname().machine}-{libc}"
            # dlsym is libc's own from glibc 2.34, libdl's before: -ldl links it either way
            found.append(_once(tools, "iocache", lambda: _find_or_build(tools, IO_CACHE, name, _loads, ("-ldl",))))
    return [p for p in found if p is not None]


def image_env(image: Path) -> dict[str, str]:
    """What mke2fs's environment needs beside LD_PRELOAD: which file the I/O cache is for."""
    return {"VULCAN_MKE2FS_IMAGE": str(image)}


def _once(tools: Path, what: str, make: Callable[[], Path | None]) -> Path | None:
    with _lock:  # `rootfs --all` writes its images in threads
        if (tools, what) not in _built:
            _built[(tools, what)] = make()
        return _built[(tools, what)]


def _find_or_build(
    tools: Path, source: Path, stem: str, judge: Callable[[Path], str | None], libs: tuple[str, ...] = ()
) -> Path | None:
    digest = hashlib.sha256(source.read_bytes() + " ".join(libs).encode()).hexdigest()[:24]
    built = tools / f"{stem}-{digest}.so"
    what = f"mke2fs runs without {source.name}"
    try:
        if built.is_file():  # checked when it was built
            return built
    except OSError as exc:  # a VULCAN_TOOLS this user may not enter: never a reason to fail a build
        log.debug(f"{what}: {exc}")
        return None
    try:
        cc = which("cc")
    except ToolMissing:
        return None
    tmp = tools / f".{built.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        if not settings.tools_dir_is_set():
            paths.claim_cache()  # `clean --all` removes what is ours in it: tools/ is
        tools.mkdir(parents=True, exist_ok=True)
        proc = run_tool([cc, "-O2", "-shared", "-fPIC", "-o", tmp, source, *libs], env=minimal_env(), quiet=True,
                        check=False)  # fmt: skip
        if proc.returncode != 0:
            log.debug(f"{what}: {cc} could not build it: {proc.stderr.decode(errors='replace')[-300:]}")
            return None
        problem = judge(tmp)
        if problem is not None:
            log.warn(f"{what}: as {cc} built it, it {problem}")
            return None
        os.replace(tmp, built)
    except OSError as exc:  # a read-only cache, or one mounted noexec (it cannot be loaded): use nothing
        log.debug(f"{what}: {exc}")
        return None
    finally:
        with contextlib.suppress(OSError):  # after os.replace, or where nothing could be written
            tmp.unlink()
    return built


def _loads(shared: Path) -> str | None:
    """Whether the I/O cache can be loaded at all (a cache mounted noexec): loaded here with
    RTLD_LOCAL, its functions stand in for nobody's in this process, and without
    VULCAN_MKE2FS_IMAGE in this process's environment it keeps nothing. tests/test_formats.py
    holds what it does against a model of the file."""
    import ctypes

    ctypes.CDLL(str(shared))
    return None


def check(shared: Path) -> str | None:
    """What is wrong with the built ``ext2fs_crc32c_le`` against the reference (None: nothing):
    the standard check value, then every length to 64 and around one and two rounds of three
    runs (4080 bytes), from three registers."""
    import ctypes

    fn = ctypes.CDLL(str(shared)).ext2fs_crc32c_le
    fn.restype, fn.argtypes = ctypes.c_uint32, [ctypes.c_uint32, ctypes.c_char_p, ctypes.c_size_t]
    if fn(0xFFFFFFFF, b"123456789", 9) ^ 0xFFFFFFFF != 0xE3069283:  # RFC 3720, B.4
        return "gives another CRC-32C of '123456789'"
    data = hashlib.shake_256(b"vulcan crc32c").digest(8192 + 64)
    for seed in (0, 0xFFFFFFFF, 0x1234ABCD):
        for n in (*range(65), 4079, 4080, 4081, 4096, 8160 + 13):  # 4080: one round of three runs
            piece = data[64 - n % 64 :][:n]
            if fn(seed, piece, len(piece)) != crc32c(seed, piece):
                return f"gives another CRC of {len(piece)} bytes from {seed:#x}"
    return None
