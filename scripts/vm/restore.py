"""`nox -s boot -- --restore RUNTIME [--count N]`: sandboxes started from a snapshot (snapshot.py).

Each clone is a fresh Firecracker in a directory of its own, where the snapshot's relative
paths find that clone's resources: ``rootfs.<fmt>`` (a read-only image: a symbolic link to the
image itself, shared by every clone; a writable one: a sparse copy of the snapshot's disk) and
``vsock.sock`` (made by Firecracker). ``PUT /snapshot/load`` maps the snapshot's memory file
(backend ``File``: MAP_PRIVATE, every clone shares its page cache until it writes) and resumes
the VM; the host then reaches the agent over vsock, sets the guest's clock (the clone resumed
with the snapshot's) and runs the runtime's program. Restore-to-first-result is measured from
starting Firecracker to the program's output; N clones run at once.
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import formats, log, paths, sparse, workspace
from ..pins import Runtime
from . import AGENT_PORT, BootResult, Console, Target, host_kvm, kvm_caveat, running
from .agent import AgentClient, AgentClosed, AgentError, AgentUnreachable, settled
from .api import ApiError, put, wait_for_socket
from .firecracker import Jail, cgroup_v2_problem
from .snapshot import (
    API,
    MEMORY,
    STATE,
    TEST_ONLY_FLAG,
    VSOCK,
    SnapshotError,
    disagreements,
    file_problems,
    load,
    root_name,
)

FIRECRACKER_LOAD = re.compile(r"'load snapshot' API request took (\d+) us")
RANDOM = ["od", "-An", "-tx1", "-N16", "/dev/urandom"]  # busybox od: 16 bytes of the guest's RNG, in hex


@dataclass(frozen=True)
class Clone:
    """One sandbox started from a snapshot."""

    index: int
    ok: bool
    detail: str
    console: Path
    copied_bytes: int = 0  # what starting it copied: 0 for a read-only image
    load_ms: float | None = None  # PUT /snapshot/load with resume, as the host waited for it
    firecracker_load_ms: float | None = None  # the same request by Firecracker's own log
    first_result_ms: float | None = None  # Firecracker started -> the program's output
    clock_offset_ms: int | None = None  # how far the clone's clock was off before the agent set it
    random: str = ""  # 16 bytes from the clone's /dev/urandom: clones must differ
    directory: str = ""

    def as_json(self) -> dict[str, Any]:
        return {k: (round(v, 3) if isinstance(v, float) else str(v) if isinstance(v, Path) else v)
                for k, v in self.__dict__.items()}  # fmt: skip


@dataclass
class Restored:
    """``boot --restore`` of one image: its clones and the cold boot measured beside them."""

    runtime: str
    fmt: str
    clones: list[Clone]
    cold: BootResult | None = None
    problems: list[str] = field(default_factory=list)  # what the clones show together (shared randomness)

    @property
    def ok(self) -> bool:
        return bool(self.clones) and all(c.ok for c in self.clones) and not self.problems

    def as_json(self) -> dict[str, Any]:
        firsts = [c.first_result_ms for c in self.clones if c.first_result_ms is not None]
        loads = [c.load_ms for c in self.clones if c.load_ms is not None]
        return {
            "runtime": self.runtime, "format": self.fmt, "vmm": "firecracker", "restore": True, "ok": self.ok,
            "count": len(self.clones),
            "restore_to_first_result_ms": round(statistics.median(firsts), 3) if firsts else None,
            "load_ms": round(statistics.median(loads), 3) if loads else None,
            "copied_bytes": sum(c.copied_bytes for c in self.clones),
            "cold_boot_to_ready_s": round(self.cold.seconds, 3) if self.cold and self.cold.ok else None,
            "cold": self.cold.as_json() if self.cold else None,
            "problems": self.problems,
            "host_kvm": host_kvm(),
            "clones": [c.as_json() for c in self.clones],
        }  # fmt: skip


def check_binding(doc: dict[str, Any], runtime: str, fmt: str, arch: str, kernel: Path) -> None:
    """Refuse a snapshot made for another host, Firecracker, kernel or image, naming the field."""
    wrong = disagreements(doc["binding"], runtime, fmt, arch, kernel)
    if wrong:
        raise SnapshotError(f"snapshot {runtime}.{fmt} does not belong to this host: {'; '.join(wrong)}",
                            hint=f"run 'nox -s snapshot -- {runtime} --format {fmt}' here")  # fmt: skip


def check_files(directory: Path, doc: dict[str, Any]) -> None:
    """What a restore maps is what snapshot.json recorded: each file regular (not a symbolic
    link) and of its sha256. Once per restore, not per clone (hashing a 256 MiB memory file
    takes ~0.15 s; a clone's load is milliseconds)."""
    for name, why in file_problems(directory, doc).items():
        said = "differs from what snapshot.json records (sha256)" if why == "sha256 differs" else f"is {why}"
        raise SnapshotError(
            f"snapshot {directory.name}: {name} {said}: refused",
            hint=f"make it again: nox -s snapshot -- {directory.name.replace('.', ' --format ')}",
        )


def _checked(t: Target, arch: str, kernel: Path) -> tuple[Path, dict[str, Any]]:
    directory = paths.snapshot(t.runtime, t.fmt, arch)
    doc = load(directory)
    check_binding(doc, t.runtime, t.fmt, arch, kernel)
    check_files(directory, doc)
    return directory, doc


def restore(rt: Runtime, t: Target, arch: str, kernel: Path, count: int, timeout: float,
            jailed: bool = False) -> list[Clone]:  # fmt: skip
    """``count`` clones of the image's snapshot, started at once; each is stopped once it answered.
    ``jailed``: each through the jailer, in a chroot of its own holding the snapshot's relative
    paths (the jailer starts Firecracker in the chroot's root), as a production host starts it."""
    directory, doc = _checked(t, arch, kernel)
    clones: list[Clone | None] = [None] * count
    with workspace.scratch(paths.images_dir(arch) / "snapshots", f"clones-{t.runtime}.{t.fmt}") as work:

        def one(i: int) -> None:
            try:
                clones[i] = _clone(rt, t, arch, directory, doc, i, work / f"clone-{i}", timeout, jailed)
            except Exception as exc:  # said as this clone's failure; the others go on
                why = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                clones[i] = Clone(i, False, why, _console(t, arch, i))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    return [c for c in clones if c is not None]


@contextlib.contextmanager
def sandbox(t: Target, arch: str, kernel: Path, index: int = 0, jailed: bool = False) -> Iterator[Started]:
    """One clone of the image's snapshot, held open for a caller that talks to its agent itself
    (``Started.agent``), as a Vulcan host does with a sandbox; killed, and its directory
    removed, when the block ends, whatever happened in it. ``index`` names its console log."""
    directory, doc = _checked(t, arch, kernel)
    if not doc["binding"].get("ready"):
        raise SnapshotError(f"snapshot {directory.name} was taken before the guest was ready ({TEST_ONLY_FLAG}): "
                            "never handed out as a sandbox", hint=f"make a ready one: nox -s snapshot -- "
                            f"{t.runtime} --format {t.fmt}")  # fmt: skip
    with workspace.scratch(paths.images_dir(arch) / "snapshots", f"clones-{t.runtime}.{t.fmt}") as work:
        d = work / f"clone-{index}"
        d.mkdir()
        with _started(t, arch, directory, i=index, d=d, jailed=jailed) as vm:
            yield vm


def _console(t: Target, arch: str, i: int) -> Path:
    return paths.console_log(t.runtime, t.fmt, f"firecracker-restore-{i}", arch)


@dataclass(frozen=True)
class Started:
    """A clone whose snapshot is loaded and resumed."""

    directory: Path  # the clone's own directory (removed with it)
    here: Path  # where the snapshot's relative paths lead (the jail's root when jailed)
    proc: subprocess.Popen[bytes]  # its Firecracker
    console: Console
    console_log: Path
    copied_bytes: int
    start: float  # time.monotonic() when its Firecracker started
    load_ms: float

    def agent(self, timeout: float = 30.0) -> AgentClient:
        """A connection to the clone's agent over its vsock socket (one past the restore's reset)."""
        return settled(str(self.here / VSOCK), AGENT_PORT, timeout, AgentClient.ping)[0]


@contextlib.contextmanager
def _started(t: Target, arch: str, snap: Path, i: int, d: Path, jailed: bool) -> Iterator[Started]:
    """Firecracker in ``d`` with the snapshot's relative paths in place, the snapshot loaded
    and resumed; killed when the block ends. ApiError when Firecracker refused the load."""
    writable = formats.get(t.fmt).writable  # then the guest's memory describes the disk as it was: a copy of it
    disk = snap / root_name(t.fmt) if writable else t.image
    if jailed:
        jail = Jail(paths.vmm(arch, "jailer"), paths.vmm(arch, "firecracker"), d / "jail",
                    f"vulcan-{t.runtime}-{i}", cgroups=cgroup_v2_problem() is None)  # fmt: skip
        here = jail.root
        jail.place(disk, root_name(t.fmt), writable=writable)  # read-only and world-readable: a hard link
        state, memory_file = jail.place(snap / STATE, STATE, False), jail.place(snap / MEMORY, MEMORY, False)
        os.chown(here, jail.uid, jail.gid)  # Firecracker makes its sockets there
        cmd = jail.argv(["--api-sock", f"/{API}"])
    else:
        here, state, memory_file = d, snap / STATE, snap / MEMORY
        if writable:
            sparse.sparse_copy(disk, here / root_name(t.fmt))
        else:  # the image itself, read-only, in place; the overlay's upper layer is in the clone's RAM
            (here / root_name(t.fmt)).symlink_to(t.image.resolve())
        cmd = [str(paths.vmm(arch, "firecracker")), "--api-sock", API]
    placed = here / root_name(t.fmt)
    same = os.stat(placed).st_ino == os.stat(disk).st_ino and os.stat(placed).st_dev == os.stat(disk).st_dev
    copied = 0 if same else sparse.allocated_bytes(placed)
    console_log = _console(t, arch, i)
    start = time.monotonic()
    with running(cmd, console_log, cwd=d) as (proc, console):
        try:
            wait_for_socket(here / API, 30, alive=lambda: proc.poll() is None)
            asked = time.monotonic()
            memory = {"backend_type": "File", "backend_path": str(memory_file)}
            put(here / API, "/snapshot/load", {"snapshot_path": str(state), "mem_backend": memory,
                                               "resume_vm": True}, timeout=60)  # fmt: skip
            load_ms = (time.monotonic() - asked) * 1000
        except ApiError as exc:
            tail = f" | {' | '.join(console.tail[-3:])}" if proc.poll() is not None else ""
            raise ApiError(exc.message + tail) from None
        yield Started(d, here, proc, console, console_log, copied, start, load_ms)


def _clone(rt: Runtime, t: Target, arch: str, snap: Path, doc: dict[str, Any], i: int, d: Path,
           timeout: float, jailed: bool = False) -> Clone:  # fmt: skip
    d.mkdir()
    try:
        with _started(t, arch, snap, i, d, jailed) as vm:
            base = Clone(i, False, "", vm.console_log, vm.copied_bytes, vm.load_ms, directory=str(d))
            if not doc["binding"].get("ready"):
                return replace(base, firecracker_load_ms=_firecrackers_own(vm.console, 5),
                               detail=f"restored and resumed; a test-only snapshot ({TEST_ONLY_FLAG}: taken "
                               "before the guest was ready) is never handed out as a sandbox")  # fmt: skip
            done = _session(rt, vm.here, base, vm.start, timeout)
            return replace(done, firecracker_load_ms=_firecrackers_own(vm.console, 1))  # read after: not on the clock
    except ApiError as exc:
        return Clone(i, False, exc.message, _console(t, arch, i), directory=str(d))


def _firecrackers_own(console: Console, wait: float) -> float | None:
    """The load request's time by Firecracker's own log (its stdout, with the console), in ms."""
    said = console.wait_for(("'load snapshot' API request took",), time.monotonic() + wait)
    found = FIRECRACKER_LOAD.search(said or "")
    return int(found.group(1)) / 1000 if found else None


def _session(rt: Runtime, d: Path, base: Clone, start: float, timeout: float) -> Clone:
    """The host's first session with a restored clone: its clock, the program, its randomness,
    all within ``timeout`` of the clone's start (VULCAN_RESTORE_TIMEOUT); a miss says which
    stage the clone had reached."""
    deadline = start + timeout
    late = f"raise VULCAN_RESTORE_TIMEOUT or --timeout (now {timeout:g} s) on a slow host"
    try:  # the clock first: a clone resumes with its snapshot's time (sent again on a new connection)
        client, offset = settled(str(d / VSOCK), AGENT_PORT, deadline - time.monotonic(),
                                 lambda c: c.clock(time.time_ns()))  # fmt: skip
    except (AgentUnreachable, AgentClosed, OSError) as exc:  # (closed: every connection, until the deadline)
        why = exc.message if isinstance(exc, AgentError) else str(exc)
        return replace(base, detail=f"restored and resumed, but the agent did not answer within {timeout:g} s of the "
                       f"start: {why}; {late}")  # fmt: skip
    except AgentError as exc:
        return replace(base, detail=f"restored; the agent refused the clock: {exc.message}")
    client.sock.settimeout(max(1.0, deadline - time.monotonic()) + 5)
    base = replace(base, clock_offset_ms=offset)
    stage = "its clock was set"
    try:
        left_ms = max(1, int((deadline - time.monotonic()) * 1000))
        prog = client.exec(list(rt.program or rt.check), timeout_ms=left_ms)
        if prog.timed_out:
            return replace(base, detail=f"{stage}, but the program did not finish within {timeout:g} s of the start; "
                           f"{late}")  # fmt: skip
        base = replace(base, first_result_ms=(time.monotonic() - start) * 1000)
        out = prog.stdout.decode(errors="replace").strip()
        if prog.exit_code != 0 or (rt.program and rt.expect and out != rt.expect):
            return replace(base, detail=f"program gave exit {prog.exit_code}, output {out!r}")
        rnd = client.exec(RANDOM).stdout.decode(errors="replace").split()
    except AgentError as exc:
        return replace(base, detail=f"restored; the agent failed after {stage}: {exc.message}")
    except OSError as exc:  # the connection timed out or broke
        return replace(base, detail=f"restored; after {stage}, the agent's connection failed: {exc}; {late}")
    finally:
        client.close()
    return replace(base, ok=True, detail=f"program printed {out!r}", random="".join(rnd))


def shared_state(clones: list[Clone]) -> list[str]:
    """What clones that should differ share: the same random bytes means the kernel did not
    reseed on restore (a kernel without CONFIG_VMGENID)."""
    seen: dict[str, list[int]] = {}
    for c in clones:
        if c.random:
            seen.setdefault(c.random, []).append(c.index)
    return [f"clones {', '.join(map(str, ix))} read the same bytes from /dev/urandom ({r[:16]}...): the kernel did "
            "not reseed on restore (CONFIG_VMGENID)" for r, ix in seen.items() if len(ix) > 1]  # fmt: skip


def report(r: Restored) -> None:
    for c in r.clones:
        figures = ", ".join(x for x in (
            f"load {c.load_ms:.1f} ms" if c.load_ms is not None else "",
            f"(Firecracker: {c.firecracker_load_ms:.1f} ms)" if c.firecracker_load_ms is not None else "",
            f"first result {c.first_result_ms:.0f} ms" if c.first_result_ms is not None else "",
            f"clock was {c.clock_offset_ms / 1000:+.1f} s off, set" if c.clock_offset_ms is not None else "",
            f"copied {log.human(c.copied_bytes)}",
        ) if x)  # fmt: skip
        log.info(f"restore {r.runtime}.{r.fmt} #{c.index}: {'ok' if c.ok else 'FAILED'}: {figures}: {c.detail}")
    for p in r.problems:
        log.warn(f"restore {r.runtime}.{r.fmt}: {p}")
    j = r.as_json()
    cold = (f"cold boot-to-ready {r.cold.seconds:.2f} s" if r.cold and r.cold.ok
            else f"cold boot: {r.cold.detail}" if r.cold else "no cold boot (--no-cold)")  # fmt: skip
    first = j["restore_to_first_result_ms"]
    said = f"{first:.0f} ms (median)" if first is not None else "none"
    log.info(f"restore {r.runtime}.{r.fmt}: {sum(c.ok for c in r.clones)}/{len(r.clones)} clones ok; "
             f"restore-to-first-result {said}; {cold}{kvm_caveat()}")  # fmt: skip
