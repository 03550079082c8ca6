"""The slow part of tests/quick/test_apk_repositories.py (see its docstring)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from tests.support.world import World


def test_rebuilt_from_the_lock_with_a_cold_cache_it_is_bit_identical(real: World, tmp_path: Path) -> None:
    first = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (real.out / "images").glob("tools.*")}
    out = tmp_path / "out"
    shutil.copytree(real.out / "bin", out / "bin", symlinks=True)
    proc = real.run("rootfs", "--runtime", "tools", "--frozen", VULCAN_OUT=str(out), VULCAN_CACHE=str(tmp_path / "c"))
    assert proc.returncode == 0, proc.stderr
    again = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "images").glob("tools.*")}
    assert again == first
