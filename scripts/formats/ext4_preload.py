"""What mke2fs gets in LD_PRELOAD: the CPU's CRC-32C instruction, where it is known to be right.

``ext4_crc32c.c`` computes the metadata checksums with the CPU's CRC-32C instruction (the same
function libext2fs computes with a table; x86-64 with SSE4.2; ``VULCAN_MKE2FS_CRC32C=0`` turns
it off): mke2fs of a real 83-package world 0.16-0.19 -> 0.11-0.13 s. It is built once with the
host's C compiler (``cc``) into the tools directory (``$VULCAN_CACHE/tools``, or ``VULCAN_TOOLS``:
several caches can share one), checked against a reference before its first use, and links to
nothing (not even libc). Where it cannot be built, or is switched off, mke2fs runs as e2fsprogs
is and the build says nothing (it is only slower). The build's e2fsck check, and ``verify``'s,
run without it, so they judge what was written.

Code runs as the user who builds (root, often), so it is loaded only from a file whose real path
nobody else can change (ownership.py: owned by this user or root, writable by no one else, all
the way from ``/``) and whose name LD_PRELOAD cannot split (no space, tab or colon). Otherwise
mke2fs runs plain and the build says why, once.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path

from .. import log, ownership, paths, settings
from ..errors import ToolMissing
from ..run import minimal_env, run_tool, which

SOURCE = Path(__file__).with_name("ext4_crc32c.c")
SPLITS = frozenset(" \t\n:")  # what separates LD_PRELOAD's entries (glibc's rtld.c and the shell's words)
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
    """The shared objects to put in mke2fs's LD_PRELOAD (none: mke2fs as it is)."""
    if not settings.mke2fs_crc32c() or os.uname().machine != "x86_64":
        return []
    tools = settings.tools_dir()
    found = _once(tools, "crc32c", lambda: _crc32c(tools))
    return [found] if found is not None else []


def _crc32c(tools: Path) -> Path | None:
    """The CRC-32C helper as LD_PRELOAD may name it: nothing is built, checked (loaded in this
    process) or given to mke2fs where another user could change it, nor by a path LD_PRELOAD
    would split; then mke2fs runs plain and the build says why."""
    if not _cpu_has_sse42():
        return None
    why = _unsafe(tools)
    if why is None:
        built = _find_or_build(tools, SOURCE, "ext2fs-crc32c", check)
        if built is None:
            return None
        why = _unsafe(built)  # the file itself: another user's, in a directory of ours
        if why is None:
            return Path(os.path.realpath(built))
    log.warn(f"mke2fs runs without {SOURCE.name} (only slower): {why}; a tools directory of your own "
             "(VULCAN_TOOLS) gets it back")  # fmt: skip
    return None


def _unsafe(path: Path) -> str | None:
    real = os.path.realpath(path)
    why = ownership.problem(Path(real))
    if why is None and SPLITS & set(real):
        why = f"its path {real!r} has a space, tab or colon, which would split LD_PRELOAD"
    return why


def _once(tools: Path, what: str, make: Callable[[], Path | None]) -> Path | None:
    with _lock:  # `rootfs --all` writes its images in threads
        if (tools, what) not in _built:
            _built[(tools, what)] = make()
        return _built[(tools, what)]


def _find_or_build(tools: Path, source: Path, stem: str, judge: Callable[[Path], str | None]) -> Path | None:
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:24]
    built = tools / f"{stem}-{digest}.so"
    what = f"mke2fs runs without {source.name}"
    try:
        if built.is_file():  # checked when it was built; where it is, by _crc32c before each use
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
        proc = run_tool([cc, "-O2", "-shared", "-fPIC", "-o", tmp, source], env=minimal_env(), quiet=True,
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
