"""One run() for every external tool (mke2fs, debugfs, e2fsck, go, qemu, firecracker).

It resolves the binary with shutil.which, fails with an install hint when it is missing, logs
the command with shlex.join, and on failure shows the command, exit code and captured stderr.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import log
from .errors import ToolFailed, ToolMissing

HINTS = {
    "mke2fs": "install e2fsprogs (>= 1.47.1 for reproducible images; Debian 12: bookworm-backports)",
    "debugfs": "install e2fsprogs",
    "e2fsck": "install e2fsprogs",
    "go": "install Go (Debian: golang-go) and set VULCAN_GO, or unset VULCAN_GO to use the pinned toolchain",
    "fakeroot": "install fakeroot, or run as root",
    "qemu-system-x86_64": "install qemu-system-x86",
    "qemu-system-aarch64": "install qemu-system-arm",
}


def which(tool: str | Path) -> str:
    """The path of ``tool`` (a name on PATH or a path), or ToolMissing with a hint."""
    text = str(tool)
    found = shutil.which(text) or (shutil.which(Path(text).name, path="/usr/sbin:/sbin") if "/" not in text else None)
    if not found:
        name = Path(text).name
        raise ToolMissing(f"{text} not found", hint=HINTS.get(name, f"install {name}"))
    return found


def run(
    argv: Sequence[str | Path],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    capture: bool = True,
    input: bytes | None = None,
    quiet: bool = False,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[bytes]:
    cmd = [which(argv[0]), *(str(a) for a in argv[1:])]
    if not quiet:
        log.info(f"$ {shlex.join(str(a) for a in argv)}")
    try:
        proc = subprocess.run(
            cmd,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            input=input,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise ToolFailed(f"{shlex.join(cmd)} timed out after {timeout:.0f}s") from None
    if proc.returncode != 0:
        err = (proc.stderr or b"").decode("utf-8", "replace").strip()
        tail = "\n".join(err.splitlines()[-25:])
        raise ToolFailed(f"{shlex.join(cmd)} failed with exit code {proc.returncode}" + (f":\n{tail}" if tail else ""))
    return proc


def minimal_env(**extra: str) -> dict[str, str]:
    """A clean environment: tools must not pick up the user's settings by accident."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
    env.update(extra)
    return env
