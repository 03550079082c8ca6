"""The slow part of tests/quick/test_guest.py (see its docstring)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from scripts.elf import read_elf
from tests.quick.test_guest import ARCH, sha_file
from tests.support.world import REPO, World


def test_go_unit_tests_of_the_agent_pass(go: str, tmp_path: Path) -> None:
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": "", "GOCACHE": str(tmp_path / "c"), "CGO_ENABLED": "0"}
    proc = subprocess.run(
        [go, "test", "-count=1", "./..."], cwd=REPO / "guest", env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_build_is_static_and_reproducible_across_directories(world: World, go: str) -> None:
    world.run("guest", check=True, VULCAN_GO=go)
    first = world.out / "bin/vulcan-guest"
    info = read_elf(first)
    assert info.machine == ARCH and info.static
    # A second, independent build: other output directory, other cache (so no shared Go build cache).
    world.run(
        "guest",
        check=True,
        VULCAN_GO=go,
        VULCAN_OUT=str(world.tmp / "b"),
        VULCAN_CACHE=str(world.tmp / "c2"),
        VULCAN_GOCACHE=str(world.tmp / "c2/go-build"),
    )
    assert sha_file(first) == sha_file(world.tmp / "b/bin/vulcan-guest")
    stamp = json.loads((world.out / "bin/.stamps/guest.json").read_text())
    assert stamp["inputs"]["toolchain"]["kind"] == "local (VULCAN_GO)"


def test_cross_build_aarch64_gives_an_aarch64_elf(world: World, go: str) -> None:
    other = "aarch64" if ARCH == "x86_64" else "x86_64"
    world.run("guest", "--arch", other, check=True, VULCAN_GO=go)
    info = read_elf(world.out / "bin" / other / "vulcan-guest")
    assert info.machine == other and info.static
