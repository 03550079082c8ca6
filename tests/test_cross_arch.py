"""Cross-arch: an aarch64 image is built on this host without emulation (no package code
runs), with a cross-compiled agent, and verify checks machine types and says why it cannot
run the aarch64 runtime here."""

from __future__ import annotations

import json
import shutil

import pytest

from scripts import debugfs
from scripts.elf import read_elf
from scripts.pins import host_arch
from tests.support import imagerepo
from tests.support.toolchains import find_go
from tests.support.world import World

pytestmark = [
    pytest.mark.skipif(shutil.which("mke2fs") is None, reason="e2fsprogs is not installed"),
    pytest.mark.skipif(host_arch() != "x86_64", reason="written for an x86_64 host building aarch64"),
]


@pytest.mark.slow
def test_aarch64_image_on_an_x86_64_host(world: World) -> None:
    imagerepo.setup(world, arch="aarch64")
    world.run("guest", "--arch", "aarch64", check=True, VULCAN_GO=find_go())
    proc = world.run("rootfs", "--arch", "aarch64", "--runtime", "python", check=True)
    assert "rootfs python (aarch64)" in proc.stderr
    img = world.out / "images/aarch64/python.ext4"
    manifest = json.loads((world.out / "images/aarch64/python.manifest.json").read_text())
    assert manifest["arch"] == "aarch64" and {p["arch"] for p in manifest["packages"]} == {"aarch64"}
    agent = world.tmp / "agent"
    agent.write_bytes(debugfs.cat(img, "usr/local/bin/vulcan-guest"))
    assert read_elf(agent).machine == "aarch64"
    assert debugfs.cat(img, "etc/apk/arch") == b"aarch64\n"
    assert not (world.out / "images/python.ext4").exists()  # the host arch's place is untouched
    out = world.run("verify", "--arch", "aarch64", "--json")
    report = json.loads(out.stdout)
    rows = {(r["artifact"], r["check"]): r for r in report["rows"]}
    assert out.returncode == 0, [r for r in report["rows"] if r["result"] == "FAIL"]
    assert rows[("bin/aarch64/vulcan-guest", "static aarch64 ELF")]["result"] == "pass"
    runs = rows[("images/aarch64/python.ext4", "runtime runs")]
    assert runs["result"] == "skip" and "cannot run aarch64 code on x86_64" in runs["detail"]
    assert rows[("images/aarch64/python.ext4", "package files intact")]["result"] == "pass"
