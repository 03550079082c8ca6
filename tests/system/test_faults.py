"""The slow part of tests/quick/test_faults.py (see its docstring)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.quick.test_faults import _pypi_reachable
from tests.support.mounts import read_only
from tests.support.toolchains import find_go
from tests.support.world import REPO, World


def test_a_read_only_cache_still_builds_the_agent(ready: World, tmp_path: Path) -> None:
    """Go's build cache defaults to go-build in the download cache: read-only, go failed with a
    raw 'read-only file system'. A writable one of ours is chosen instead, and said."""
    cache = tmp_path / "cache"
    cache.mkdir()
    with read_only(cache):
        proc = ready.run("guest", VULCAN_OUT=str(tmp_path / "o"), VULCAN_CACHE=str(cache), VULCAN_GOCACHE="",
                         VULCAN_GO=find_go())  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"the cache {cache} is read-only: Go's build cache is" in proc.stderr
    assert (tmp_path / "o" / "bin" / "vulcan-guest").is_file()


def test_two_first_nox_runs_at_once_share_one_virtualenv_and_a_broken_one_is_made_again(tmp_path: Path) -> None:
    """Two `nox -s ...` started together on a fresh checkout raced in virtualenv creation
    (tracebacks, then a venv without pip that every later run failed on); and sessions with the
    same requirements share one virtualenv."""
    nox_bin = shutil.which("nox") or pytest.skip("nox is not installed")
    if not _pypi_reachable():
        pytest.skip("a fresh session venv installs requirements.txt from PyPI, which is unreachable")
    checkout = tmp_path / "checkout"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.split()  # fmt: skip
    for name in files:
        if (REPO / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, checkout / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VULCAN_", "NOX_", "VIRTUAL_ENV"))}

    def start() -> subprocess.Popen[str]:
        return subprocess.Popen([nox_bin, "-s", "download", "--", "--help"], cwd=checkout, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip

    for _ in range(2):
        shutil.rmtree(checkout / ".nox", ignore_errors=True)
        runs = [start(), start()]
        outs = [p.communicate(timeout=600)[0] for p in runs]
        for p, out in zip(runs, outs, strict=True):
            assert p.returncode == 0 and "Traceback" not in out, out
    # every session that installs requirements.txt shares that one virtualenv (trap: 13 copies)
    other = subprocess.run([nox_bin, "-s", "verify", "--", "--help"], cwd=checkout, env=env, capture_output=True,
                           text=True, timeout=600)  # fmt: skip
    assert other.returncode == 0 and "making .nox" not in other.stderr, other.stderr
    assert sorted(p.name for p in (checkout / ".nox").iterdir() if p.is_dir()) == ["requirements"]
    for pip in (checkout / ".nox" / "requirements").glob("lib/python*/site-packages/pip"):
        shutil.rmtree(pip)  # what the race used to leave
    for marker in (checkout / ".nox" / "requirements").glob(".vulcan-*.sha256"):
        marker.unlink()
    again = start()
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0 and "has no pip (a broken virtualenv): making it again" in out, out
