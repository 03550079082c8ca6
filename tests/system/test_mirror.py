"""Offline and air-gapped builds: `nox -s mirror -- DIR` writes what a build needs from outside,
verified, and `VULCAN_MIRROR=DIR` builds the same bytes with no request to anywhere."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.hashing import sha256_file
from tests.support import imagerepo
from tests.support.world import World, built_world, go_release, sha256

ARCH = "x86_64"


@pytest.fixture(scope="module")
def connected(tmp_path_factory: pytest.TempPathFactory, go_build_cache: Path, agent_bin: Path) -> Iterator[World]:
    def prepare(w: World) -> None:
        imagerepo.setup(w)
        go = w.pins["go"]
        for arch, goarch in (("x86_64", "amd64"), ("aarch64", "arm64")):
            data = go_release(f"#!/bin/sh\necho go1.26.9 {arch}\n")  # the builds use a local Go; this is the pin's
            go["sha256"][arch] = sha256(data)
            w.mirror.add(go["url"].format(version=go["version"], goarch=goarch), data)

    with built_world(tmp_path_factory.mktemp("connected"), go_build_cache, agent_bin, prepare=prepare,
                     formats=["ext4", "squashfs"], download=True) as w:  # fmt: skip
        yield w


def test_a_mirror_directory_builds_the_same_bytes_with_no_request(connected: World, tmp_path: Path) -> None:
    w = connected
    d = tmp_path / "mirror"
    proc = w.run("mirror", str(d), "--arch", ARCH, "--frozen", "--no-wheels")
    assert proc.returncode == 0, proc.stderr
    listing = json.loads((d / "vulcan-mirror.json").read_text())
    files = listing["files"]
    fc, kernel, go = (w.pins[k]["url"].format(version=w.pins[k]["version"], arch=ARCH, goarch="amd64")
                      for k in ("firecracker", "kernel", "go"))  # fmt: skip
    assert {fc, kernel, go} <= set(files)
    locked = json.loads((w.pins_path.parent / "alpine.lock.json").read_text())["entries"]
    packages = {
        f"{p['name']}-{p['version']}.apk" for rt in ("go", "node", "python") for p in locked[f"{rt}/{ARCH}"]["packages"]
    }
    held = {Path(u).name for u in files if u.endswith(".apk")}
    assert held == packages
    assert sum(u.endswith(f"/{ARCH}/APKINDEX.tar.gz") for u in files) == 2  # main and community
    for url, entry in files.items():  # in the upstream layout, as VULCAN_MIRROR maps it
        host_path = url.split("://", 1)[1]
        assert entry["path"] == host_path and sha256_file(d / host_path) == entry["sha256"]
    assert listing["use"]["build"] == f"VULCAN_MIRROR={d} nox"

    # a second run checks what is there and asks nobody
    asked = len(w.mirror.requests)
    again = w.run("mirror", str(d), "--arch", ARCH, "--frozen", "--no-wheels")
    assert again.returncode == 0 and f"0 placed now, {len(files)} already there and checked" in again.stderr
    assert len(w.mirror.requests) == asked

    # a damaged file is found and placed again
    victim = d / files[next(u for u in files if u.endswith(".apk"))]["path"]
    victim.write_bytes(victim.read_bytes()[:-1] + bytes([victim.read_bytes()[-1] ^ 1]))
    repaired = w.run("mirror", str(d), "--arch", ARCH, "--frozen", "--no-wheels")
    assert repaired.returncode == 0 and "1 placed now" in repaired.stderr, repaired.stderr

    # the air-gapped build: a fresh cache and output, the mirror directory, no request anywhere
    out, cache = tmp_path / "out", tmp_path / "cache"
    shutil.copytree(w.out / "bin", out / "bin", symlinks=True, ignore=shutil.ignore_patterns("firecracker", "jailer",
                                                                                          "vmlinux"))  # fmt: skip
    env = {"VULCAN_OUT": str(out), "VULCAN_CACHE": str(cache), "VULCAN_MIRROR": f"file://{d}"}
    asked = len(w.mirror.requests)
    for step in (["download"], ["rootfs", "--all", "--frozen"]):
        proc = w.run(*step, **env)
        assert proc.returncode == 0, proc.stderr
    assert len(w.mirror.requests) == asked  # nothing went to the network
    for image in sorted((w.out / "images").glob("*.*4")) + sorted((w.out / "images").glob("*.squashfs")):
        assert sha256_file(out / "images" / image.name) == sha256_file(image), image.name

    # verify says of the air-gapped outputs what it says of the connected ones (this world's
    # kernel is a stand-in, which verify fails in both)
    def rows(**where: str) -> dict[tuple[str, str], str]:
        got = json.loads(w.run("verify", "--json", **where).stdout)["rows"]
        return {(r["artifact"], r["check"]): r["result"] for r in got}

    offline = rows(**env)
    assert offline == rows() and sum(r == "pass" for r in offline.values()) > 50, offline
    # (verify used to fail node.squashfs's "runtime runs": its /usr/lib is empty, and an empty
    # directory did not count as copied out of a squashfs image)
    assert [k for k, r in offline.items() if r == "FAIL"] == [("bin/vmlinux", "is an ELF vmlinux")]


def test_a_mirror_that_is_not_a_directory_is_refused(connected: World, tmp_path: Path) -> None:
    proc = connected.run("download", VULCAN_MIRROR="relative/dir")
    assert proc.returncode != 0 and "VULCAN_MIRROR='relative/dir': not an http:// or https:// URL" in proc.stderr
    proc = connected.run("download", VULCAN_MIRROR=str(tmp_path / "nowhere"))
    assert proc.returncode != 0 and "not an existing directory" in proc.stderr


def test_the_mirror_carries_the_wheels_the_sessions_install(connected: World, tmp_path: Path) -> None:
    """DIR/python holds the hash-locked wheels: a virtualenv gets requirements.txt from them with
    no index at all (PIP_NO_INDEX, and no pip configuration of this machine)."""
    import os
    import subprocess
    import sys

    d = tmp_path / "mirror"
    proc = connected.run("mirror", str(d), "--arch", ARCH, "--frozen")
    if proc.returncode != 0 and "pip download" in proc.stderr:
        pytest.skip(f"pip cannot download here: {proc.stderr.strip()[-200:]}")
    assert proc.returncode == 0, proc.stderr
    listing = json.loads((d / "vulcan-mirror.json").read_text())
    assert listing["wheels"] and listing["use"]["pip"] == f"PIP_NO_INDEX=1 PIP_FIND_LINKS={d / 'python'}"
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(d / "python")}
    req = Path(__file__).resolve().parents[2] / "requirements.txt"
    pip = subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q", "--require-hashes", "-r", str(req)],
                         env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert pip.returncode == 0, pip.stderr
