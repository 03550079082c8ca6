"""The guest agent: `nox -s guest` builds it static and reproducibly; it speaks the protocol."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.arch import host_arch
from tests.support.world import REPO, World, go_release, sha256

ARCH = host_arch()


def sha_file(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_second_run_is_a_no_op_and_a_source_change_rebuilds(world: World, go: str, tmp_path: Path) -> None:
    src = tmp_path / "agent"
    shutil.copytree(REPO / "guest", src)
    world.pins["guest"] = {"source": str(src), "package": "."}
    world.run("guest", check=True, VULCAN_GO=go)
    out = world.out / "bin/vulcan-guest"
    mtime = out.stat().st_mtime_ns
    proc = world.run("guest", check=True, VULCAN_GO=go)
    assert "up to date" in proc.stderr and out.stat().st_mtime_ns == mtime
    main = src / "main.go"
    main.write_text(main.read_text().replace('version     = "0.1.0"', 'version     = "0.1.1"'))
    proc = world.run("guest", check=True, VULCAN_GO=go)
    assert "input source.sha256 changed" in proc.stderr
    assert subprocess.run([out, "-version"], capture_output=True, text=True).stdout.strip() == "vulcan-guest 0.1.1"


def test_pinned_toolchain_is_downloaded_verified_and_cached(world: World, go: str) -> None:
    tgz = go_release(f'#!/bin/sh\nexec {go} "$@"\n')  # hands over to the real toolchain
    pin = world.pins["go"]
    pin["sha256"][ARCH] = sha256(tgz)
    world.mirror.add(
        pin["url"].format(version=pin["version"], goarch={"x86_64": "amd64", "aarch64": "arm64"}[ARCH]), tgz
    )
    world.run("guest", check=True)
    assert world.mirror.count(".tar.gz") == 1
    stamp = json.loads((world.out / "bin/.stamps/guest.json").read_text())
    assert stamp["inputs"]["toolchain"] == {"kind": "pinned", "version": pin["version"], "sha256": pin["sha256"][ARCH]}
    (world.out / "bin/vulcan-guest").unlink()
    world.run("guest", check=True)
    assert world.mirror.count(".tar.gz") == 1  # toolchain came from the cache


def test_bad_toolchain_and_source_are_clear_errors(world: World, tmp_path: Path) -> None:
    proc = world.run("guest", VULCAN_GO=str(tmp_path / "nope"))
    assert proc.returncode == 4 and "VULCAN_GO=" in proc.stderr and "not an executable" in proc.stderr
    proc = world.run("guest", VULCAN_GO="/bin/true", VULCAN_GUEST_SOURCE=str(tmp_path))
    assert proc.returncode == 4 and "has no go.mod" in proc.stderr


class Agent:
    def __init__(self, binary: Path, *args: str, prefix: tuple[str, ...] = ()) -> None:
        self.proc = subprocess.Popen(
            [*prefix, binary, "-listen", "tcp:127.0.0.1:0", "-cmdline", "/dev/null", *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.startswith("vulcan-guest: ready port="), line
        self.port = int(line.split("port=")[1])
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        self.file = self.sock.makefile("rwb")

    def send(self, obj: object) -> dict:  # type: ignore[type-arg]
        raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.file.write(raw + b"\n")
        self.file.flush()
        return json.loads(self.file.readline())  # type: ignore[no-any-return]

    def close(self) -> None:
        self.sock.close()
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def agent(world: World, go: str) -> Iterator[Agent]:
    world.run("guest", check=True, VULCAN_GO=go)
    a = Agent(world.out / "bin/vulcan-guest")
    yield a
    a.close()


def test_built_agent_runs_programs_over_the_protocol(agent: Agent, tmp_path: Path) -> None:
    cwd = str(tmp_path) if os.getuid() != 0 else "/tmp"
    pong = agent.send({"op": "ping"})
    assert pong["ok"] and pong["version"] == "0.1.0"
    r = agent.send({"op": "exec", "argv": ["echo", "hi"], "cwd": cwd})
    assert (r["ok"], r["exit_code"], r["stdout"], r["timed_out"]) == (True, 0, "hi\n", False)
    r = agent.send({"op": "exec", "argv": ["sleep", "30"], "cwd": cwd, "timeout_ms": 200})
    assert r["timed_out"] is True and r["duration_ms"] < 5000
    r = agent.send(b"{this is not json")
    assert r["ok"] is False and "malformed JSON" in r["error"]
    assert agent.send({"op": "ping"})["ok"]  # still usable


def test_the_clock_op_never_moves_the_clock_of_a_host_the_agent_does_not_own(agent_bin: Path) -> None:
    """A restored clone is told the time by the host ({"op":"clock"}); an agent started on a
    host (here: a child of pytest, as root) refuses it under the default -set-clock=auto, and
    an agent that may not set the clock says why in the system's words."""
    agent = Agent(agent_bin / "vulcan-guest")
    try:
        before = time.time()
        r = agent.send({"op": "clock", "unix_ns": 86_400 * 10**9})  # 1970-01-02
        assert r["ok"] is False and "-set-clock=auto" in r["error"], r
        assert abs(time.time() - before) < 3600  # the host's clock is where it was
        r = agent.send({"op": "clock"})
        assert r["ok"] is False and "unix_ns" in r["error"]
    finally:
        agent.close()
    if os.getuid() == 0 and shutil.which("setpriv"):
        nobody = ("setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", "--")
        agent = Agent(agent_bin / "vulcan-guest", "-set-clock", "true", prefix=nobody)
        try:
            r = agent.send({"op": "clock", "unix_ns": time.time_ns()})
            assert r["ok"] is False and "cannot set the guest's clock: operation not permitted" in r["error"], r
        finally:
            agent.close()


def test_the_agent_serves_new_connections_after_one_is_reset_mid_request(agent_bin: Path) -> None:
    """What a snapshot restore does to the connections open at the snapshot (the vsock
    transport is reset): the host's side goes away mid-request; the agent keeps serving."""
    agent = Agent(agent_bin / "vulcan-guest")
    try:
        cut = socket.create_connection(("127.0.0.1", agent.port), timeout=30)
        cut.sendall(json.dumps({"op": "exec", "argv": ["sleep", "1"], "cwd": "/tmp"}).encode() + b"\n")
        cut.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        cut.close()  # an RST, not a FIN: the reply of the running request has nowhere to go
        for _ in range(3):
            fresh = Agent.__new__(Agent)
            fresh.sock = socket.create_connection(("127.0.0.1", agent.port), timeout=30)
            fresh.file = fresh.sock.makefile("rwb")
            r = fresh.send({"op": "exec", "argv": ["echo", "still here"], "cwd": "/tmp"})
            assert (r["ok"], r["stdout"]) == (True, "still here\n")
            fresh.sock.close()
        assert agent.send({"op": "ping"})["ok"]
        assert agent.proc.poll() is None
    finally:
        agent.close()
