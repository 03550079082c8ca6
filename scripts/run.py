"""One run_tool() for every external tool (mke2fs, debugfs, e2fsck, go, cp, a runtime's check).

It resolves the binary with shutil.which, fails with an install hint when it is missing, logs
the command with shlex.join, and on failure shows the command, exit code and captured stderr.
VMs, which run in the background, are started by vm/__init__.py (running()), bound to us the same way.
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


def bound_to_us(cmd: list[str]) -> list[str]:
    """``cmd`` so that the kernel kills it when we die (prctl PR_SET_PDEATHSIG, through
    util-linux's setpriv: Python's preexec_fn is unsafe in a threaded build). A build killed
    with -9 must not leave mke2fs writing into RAM scratch for a minute; nor boot a VM running."""
    setpriv = _setpriv()
    return [setpriv, "--pdeathsig", "KILL", "--", *cmd] if setpriv else cmd


def _setpriv() -> str | None:
    if not _SETPRIV:
        found = shutil.which("setpriv") or shutil.which("setpriv", path="/usr/bin:/bin")
        _SETPRIV.append(found or "")
    return _SETPRIV[0] or None


_SETPRIV: list[str] = []


def run_tool(
    argv: Sequence[str | Path],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
    capture: bool = True,
    input: bytes | None = None,
    quiet: bool = False,
    timeout: float | None = None,
    check: bool = True,
    merge_stderr: bool = False,
    stdin: Path | None = None,
    stdout_null: bool = False,
) -> subprocess.CompletedProcess[bytes]:
    """Run a tool; ``check=False`` returns a failed run instead of raising (callers that judge
    the exit code themselves, e.g. verify's runtime check). ``merge_stderr``: stderr into stdout.
    ``stdin``: a file streamed to the tool (never read into memory)."""
    cmd = [which(argv[0]), *(str(a) for a in argv[1:])]
    if not quiet:
        log.info(f"$ {shlex.join(str(a) for a in argv)}" + (f" < {stdin.name}" if stdin else ""))
    source = open(stdin, "rb") if stdin is not None else None  # noqa: SIM115 - closed below
    try:
        proc = subprocess.run(
            bound_to_us(cmd),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            input=input,
            stdin=source if source is not None else (subprocess.DEVNULL if input is None else None),
            stdout=subprocess.DEVNULL if stdout_null else (subprocess.PIPE if capture else None),
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise ToolFailed(f"{shlex.join(cmd)} timed out after {timeout:.0f}s") from None
    finally:
        if source is not None:
            source.close()
    if check and proc.returncode != 0:
        err = ((proc.stdout if merge_stderr else proc.stderr) or b"").decode("utf-8", "replace").strip()
        tail = "\n".join(err.splitlines()[-25:])
        raise ToolFailed(f"{shlex.join(cmd)} failed with exit code {proc.returncode}" + (f":\n{tail}" if tail else ""))
    return proc


def minimal_env(**extra: str) -> dict[str, str]:
    """A clean environment: tools must not pick up the user's settings by accident."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
    env.update(extra)
    return env
