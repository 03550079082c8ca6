"""The nox sessions' virtualenvs: one per requirements file, shared, made once under a lock.

Every session that installs a requirements file uses the same one. Standard library only (the
noxfile imports it).

nox makes a virtualenv per session (``.nox/<session>``): 13 identical ~60 MB copies of
requirements.txt, each first use running pip for seconds, and two noxes started together on a
fresh checkout ran virtualenv into the same directory at once (tracebacks, then a venv without
pip that every later run failed on). So the sessions ask nox for no virtualenv and run in
``.nox/<requirements stem>/`` (``.nox/requirements``, ``.nox/requirements-dev``), which
``ensure`` makes (``python -m venv``, then ``pip install --require-hashes``) under an flock
on ``.nox/.vulcan-<stem>.lock``: a second nox waits for the first, then finds it ready. It
records the sha256 of every requirements file in it: a no-op run reads that and starts nothing;
a changed file, or a venv without pip (a run that died while making it), makes it again.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

MARKER = ".vulcan-requirements.sha256"


def wanted(root: Path) -> str:
    """What a venv must have been made from: every requirements*.txt (one may -r another)."""
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(root.glob("requirements*.txt")))).hexdigest()


def ensure(root: Path, requirements: str, say: Callable[[str], None] = print) -> Path:
    """The shared virtualenv of ``requirements`` (a file in ``root``), ready; its directory."""
    venv = root / ".nox" / Path(requirements).stem
    want = wanted(root)
    if _ready(venv, want):  # the no-op path: one read, no lock
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(venv.parent / f".vulcan-{venv.name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            say(f"another nox is making .nox/{venv.name}; waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        if not _ready(venv, want):  # made by the one we waited for, or still to make
            _make(venv, root / requirements, want, say)
    finally:
        os.close(fd)
    return venv


def _ready(venv: Path, want: str) -> bool:
    marker = venv / MARKER
    return marker.is_file() and marker.read_text() == want and (venv / "bin" / "python").exists()


def _make(venv: Path, requirements: Path, want: str, say: Callable[[str], None]) -> None:
    if venv.exists():
        has_pip = list(venv.glob("lib/python*/site-packages/pip/__main__.py"))
        say(f".nox/{venv.name} {'is out of date' if has_pip else 'has no pip (a broken virtualenv)'}: making it again")
        shutil.rmtree(venv)
    base = getattr(sys, "_base_executable", sys.executable)  # nox's own may be a venv: the interpreter under it
    say(f"making .nox/{venv.name} from {requirements.name} (once; every session that needs it shares it)")
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "--require-hashes", "-r", str(requirements)], check=True)  # fmt: skip
    (venv / MARKER).write_text(want)
