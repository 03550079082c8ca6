"""Faults and bad input, tried as a user (and an adversary) would: never a false success, never a
traceback, never a stuck leftover. The fault matrix: kill -9 at each build phase then rerun,
concurrent builds sharing a cache, a read-only cache, and full cache, scratch and output file
systems (small tmpfs mounts: these tests need root, as CI has, and skip otherwise)."""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts import atomic
from scripts.apk import lockfile
from scripts.apk.indexes import Resolved
from scripts.apk.lockfile import Locked
from scripts.arch import host_arch
from scripts.pins import load as load_pins
from tests.support import imagerepo
from tests.support.apkrepo import BRANCH, CDN, publish
from tests.support.mounts import read_only, tmpfs
from tests.support.world import BASE_PINS, REPO, World

ARCH = host_arch()
RUNTIME = "python"


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def fresh_out(w: World, tmp: Path) -> Path:
    """An output directory with the agent already built (bin/ copied)."""
    out = tmp / "out"
    subprocess.run(["cp", "-a", str(w.out / "bin"), str(out / "bin")], check=False)
    if not (out / "bin").exists():
        out.mkdir(parents=True)
        subprocess.run(["cp", "-a", str(w.out / "bin"), str(out)], check=True)
    return out


def leftovers(*roots: Path) -> list[Path]:
    """Anything a dead or failed run could leave behind: scratch directories and temp files."""
    found = []
    for root in roots:
        if root.exists():
            found += [p for p in root.rglob("*") if p.name.startswith(".vulcan-") or p.name.endswith((".tmp", ".part"))]
    return found


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "vulcan: error:" in proc.stderr, proc.stderr


# -- wrong results -----------------------------------------------------------------------------


def nox(tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("VULCAN_")}
    full.update(VULCAN_OUT=str(tmp / "out"), VULCAN_CACHE=str(tmp / "cache"), **env)
    return subprocess.run(
        [sys.executable, "-m", "nox", "--no-venv", "-f", str(REPO / "noxfile.py"), *args],
        cwd=REPO, env=full, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.parametrize("args", [["-s", "rootfs_all"], ["-t", "rootfs"], ["-s", "rootfs-python"], ["-s", "download"]])
def test_a_broken_pins_file_fails_every_session_that_needs_it(tmp_path: Path, args: list[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    proc = nox(tmp_path, *args, VULCAN_PINS=str(bad))
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "bad.json: line 1 column 2: invalid JSON" in proc.stderr
    assert "images for:" not in proc.stderr


def test_a_pins_problem_in_one_field_still_lists_the_sessions_which_then_fail(tmp_path: Path) -> None:
    pins = copy.deepcopy(BASE_PINS)
    pins["kernel"]["sha256"]["x86_64"] = "abc"
    path = tmp_path / "pins.json"
    path.write_text(json.dumps(pins))
    listed = nox(tmp_path, "-l", VULCAN_PINS=str(path))
    assert "rootfs-python" in listed.stdout  # nox -l lists what it can
    proc = nox(tmp_path, "-s", "rootfs-python", VULCAN_PINS=str(path))
    assert proc.returncode != 0
    assert "pins.json: kernel.sha256.x86_64: expected 64 hex characters" in proc.stderr


@pytest.mark.parametrize(
    ("args", "env"),
    [(["-s", "rootfs-ruby"], {}), (["--session=rootfs-ruby"], {}), ([], {"NOXSESSION": "download,rootfs-ruby"})],
    ids=["-s X", "--session=X", "NOXSESSION"],  # the other forms: the test below
)  # fmt: skip
def test_an_unknown_runtime_session_lists_the_runtimes(tmp_path: Path, args: list[str], env: dict[str, str]) -> None:
    """Every way nox takes a session name: the noxfile says why there is no such session."""
    proc = nox(tmp_path, *args, **env)
    assert proc.returncode != 0
    assert "no runtime 'ruby'" in proc.stderr and "runtimes: go, node, python" in proc.stderr, proc.stderr


def test_the_sessions_asked_for_are_read_as_nox_reads_them() -> None:
    from scripts.nox_sessions import no_venv, requested

    assert requested(["-s", "a", "b", "-t", "x"], {}) == ["a", "b"]
    assert requested(["--session=a", "-sb", "-e", "c", "--", "-s", "d"], {}) == ["a", "b", "c"]
    assert requested(["-l"], {"NOXSESSION": "a, b"}) == ["a", "b"]
    assert requested(["-s", "a"], {"NOXSESSION": "b"}) == ["a"]  # the command line wins
    assert no_venv(["--no-venv", "-s", "a"]) and not no_venv(["-s", "a", "--", "--no-venv"])


def test_concurrent_lock_writers_keep_every_entry(ready: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writer A holds the lock file's flock across its read-modify-write; writer B, started
    meanwhile, must wait and then add to what A wrote (it used to overwrite A's entry)."""
    for k, v in ready.env().items():
        monkeypatch.setenv(k, v)
    lock = ready.tmp / "alpine.lock.json"
    saved = lock.read_bytes()
    pins = load_pins(ready.pins_path)
    closure = lockfile.locked_entry(pins, RUNTIME, ARCH)
    assert closure is not None
    main = pins.alpine.own_repositories()[0]
    resolved = [Resolved(p.as_package(0), main, p.key, "") for p in closure]
    monkeypatch.setattr("scripts.apk.indexes.resolve", lambda *a: resolved)
    try:
        lock.unlink()
        b_started = threading.Event()
        errors: list[BaseException] = []

        def writer_b() -> None:
            b_started.set()
            try:
                lockfile.lock_runtime(pins, RUNTIME, "aarch64")
            except BaseException as exc:
                errors.append(exc)

        with lockfile.locked_for_update(pins):
            data = lockfile.read_lock(pins)
            b = threading.Thread(target=writer_b)
            b.start()
            b_started.wait()
            time.sleep(0.3)  # B now reads the lock (without the flock it would see it empty)
            data["entries"][f"{RUNTIME}/{ARCH}"] = {
                "request": lockfile.request_digest(pins, RUNTIME, ARCH),
                "world": [],
                "packages": [p._asdict() for p in closure],
            }
            lockfile.write_lock(pins, data)
        b.join(60)
        assert not errors
        entries = json.loads(lock.read_text())["entries"]
        assert sorted(entries) == sorted([f"{RUNTIME}/{ARCH}", f"{RUNTIME}/aarch64"])
        assert not list(ready.tmp.glob("*.tmp")) and not list(ready.tmp.glob(".alpine.lock.json.*"))
        assert not (ready.tmp / "alpine.lock.json.lock").exists()  # no lock file left in the checkout
        assert lock.stat().st_mode & 0o777 == NEW_FILE_MODE  # not mkstemp's 0600
    finally:
        lock.write_bytes(saved)


NEW_FILE_MODE = 0o666 & ~atomic._umask()


def test_a_rewritten_file_keeps_its_mode_and_a_new_one_gets_the_usual_one(tmp_path: Path) -> None:
    kept = tmp_path / "alpine.lock.json"
    kept.write_text("{}")
    kept.chmod(0o664)
    atomic.write_text(kept, "{}\n", fsync=True)
    assert kept.stat().st_mode & 0o777 == 0o664
    atomic.write_text(tmp_path / "new.json", "{}")
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == NEW_FILE_MODE


def test_a_temporary_file_of_a_dead_run_is_swept_and_a_live_one_kept(ready: World, tmp_path: Path) -> None:
    """kill -9 while an image is published across file systems leaves images/.python.ext4.X.tmp:
    the next write of that file removes it, unless a live run holds it (its flock)."""
    out = fresh_out(ready, tmp_path)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    dead = images / f".{RUNTIME}.ext4.dead0001.tmp"
    dead.write_bytes(b"\0" * 4096)
    live = images / f".{RUNTIME}.ext4.live0001.tmp"
    live.write_bytes(b"\0" * 4096)
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as replacing() holds its own while it writes
        proc = ready.run("rootfs", "--runtime", RUNTIME, VULCAN_OUT=str(out), VULCAN_SCRATCH=str(tmp_path / "s"))
        assert proc.returncode == 0, proc.stderr
        assert not dead.exists() and live.exists()
    assert sha(images / f"{RUNTIME}.ext4") == ready.reference  # type: ignore[attr-defined]


def test_a_build_that_reuses_a_cached_stream_sweeps_what_a_killed_store_left(ready: World, tmp_path: Path) -> None:
    """kill -9 while the stream is being stored beside mke2fs can leave a sidecar's temporary
    file of the second name (``base``) after the first was complete: the next build finds the
    stream cached and stores nothing, so it sweeps those entries itself (a live writer's stays)."""
    out = fresh_out(ready, tmp_path)
    cache = tmp_path / "cache"
    ready.run("rootfs", "--runtime", RUNTIME, check=True, VULCAN_OUT=str(out), VULCAN_CACHE=str(cache))
    [side] = (cache / "rootfs" / "base").glob("*/*.json")
    dead, live = side.with_name(f".{side.name}.dead0001.tmp"), side.with_name(f".{side.name}.live0001.tmp")
    dead.write_text("{")
    live.write_text("{")
    (out / "images" / f"{RUNTIME}.ext4").unlink()
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = ready.run("rootfs", "--runtime", RUNTIME, VULCAN_OUT=str(out), VULCAN_CACHE=str(cache))
        assert proc.returncode == 0, proc.stderr
        assert "reusing its tar" in proc.stderr
        assert not dead.exists() and live.exists()
    live.unlink()
    assert not leftovers(out, cache)


def test_two_full_builds_sharing_a_cache_both_succeed(ready: World, tmp_path: Path) -> None:
    outs = [fresh_out(ready, tmp_path / str(i)) for i in range(2)]
    cache = tmp_path / "cache"  # cold and shared: both fetch, assemble and store at the same time
    procs = [ready.popen("rootfs", "--runtime", RUNTIME, VULCAN_OUT=str(o), VULCAN_CACHE=str(cache)) for o in outs]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    for o in outs:
        assert sha(o / "images" / f"{RUNTIME}.ext4") == ready.reference  # type: ignore[attr-defined]
    assert not leftovers(*outs, cache)


def test_a_cached_package_changed_on_disk_is_fetched_again_and_the_image_is_the_same(
    ready: World, tmp_path: Path
) -> None:
    """One byte of a cached package's data flipped after it was cached (a disk, another tool):
    each cached package is checked again when the merge comes to it, so the build refuses those
    bytes, fetches the package afresh, and writes the reference image."""
    cache = tmp_path / "cache"
    cache.mkdir()
    for sub in ("apk", "keys"):  # packages and keys, no stream: the build assembles
        subprocess.run(["cp", "-a", str(ready.cache / sub), str(cache)], check=True)
    cached = next((cache / "apk").rglob("*-busybox-*.apk"))
    data = bytearray(cached.read_bytes())
    data[-100] ^= 0xFF  # inside the data member; the size is unchanged
    cached.write_bytes(bytes(data))
    served = ready.mirror.count(cached.name.split("-", 1)[1])
    out = fresh_out(ready, tmp_path)
    proc = ready.run("rootfs", "--runtime", RUNTIME, VULCAN_OUT=str(out), VULCAN_CACHE=str(cache))
    assert proc.returncode == 0, proc.stderr
    assert "fails verification" in proc.stderr and "control -> data broken" in proc.stderr, proc.stderr
    assert ready.mirror.count(cached.name.split("-", 1)[1]) == served + 1
    assert cached.read_bytes() != bytes(data)  # the cache holds the good file again
    assert sha(out / "images" / f"{RUNTIME}.ext4") == ready.reference  # type: ignore[attr-defined]


# -- tracebacks and stuck leftovers ------------------------------------------------------------


def test_a_full_cache_skips_storing_the_stream_with_a_warning(ready: World, tmp_path: Path) -> None:
    apk = ready.cache / "apk"
    need = sum(p.stat().st_size for p in ready.cache.rglob("*") if p.is_file() and "rootfs" not in p.parts)
    with tmpfs(tmp_path / "cache", f"{need // 1024 + 512}k") as cache:
        for sub in ("apk", "keys"):
            subprocess.run(["cp", "-a", str(ready.cache / sub), str(cache)], check=True)
        assert apk.is_dir()
        out = fresh_out(ready, tmp_path)
        proc = ready.run("rootfs", "--runtime", RUNTIME, VULCAN_OUT=str(out), VULCAN_CACHE=str(cache))
        assert proc.returncode == 0, proc.stderr
        assert "not keeping the tar stream in the cache" in proc.stderr
        assert sha(out / "images" / f"{RUNTIME}.ext4") == ready.reference  # type: ignore[attr-defined]
        assert not leftovers(cache, out)


def test_publishing_across_file_systems_keeps_the_image_sparse(ready: World, tmp_path: Path) -> None:
    out = fresh_out(ready, tmp_path)
    image = out / "images" / f"{RUNTIME}.ext4"
    with tmpfs(out / "images", "24m"):
        proc = ready.run("rootfs", "--runtime", RUNTIME, VULCAN_OUT=str(out), VULCAN_SCRATCH=str(tmp_path / "s"))
        assert proc.returncode == 0, proc.stderr
        assert sha(image) == ready.reference  # type: ignore[attr-defined]
        assert image.stat().st_blocks * 512 < image.stat().st_size / 2  # the holes stayed holes
        assert not leftovers(out, tmp_path / "s")
        for published in (image, out / "images" / f"{RUNTIME}.manifest.json", out / "images" / f"{RUNTIME}.spdx.json"):
            assert published.stat().st_mode & 0o777 == NEW_FILE_MODE, published  # not the temporary file's 0600


def test_a_full_output_file_system_is_an_error_that_names_it(ready: World, tmp_path: Path) -> None:
    out = fresh_out(ready, tmp_path)
    with tmpfs(out / "images", "2m") as images:
        proc = ready.run("rootfs", "--runtime", RUNTIME, VULCAN_OUT=str(out), VULCAN_SCRATCH=str(tmp_path / "s"))
        assert proc.returncode == 7
        no_traceback(proc)
        assert f"no space left on {images}" in proc.stderr and "needs" in proc.stderr
        assert not (images / f"{RUNTIME}.ext4").exists()
        assert not leftovers(out, tmp_path / "s")


def test_a_full_scratch_file_system_is_an_error(ready: World, tmp_path: Path) -> None:
    out = fresh_out(ready, tmp_path)
    with tmpfs(tmp_path / "s", "1m") as scratch:
        proc = ready.run("rootfs", "--runtime", RUNTIME, VULCAN_OUT=str(out), VULCAN_SCRATCH=str(scratch),
                         VULCAN_REASSEMBLE="1")  # fmt: skip
        assert proc.returncode == 7
        no_traceback(proc)
        assert f"no space left on {scratch}" in proc.stderr
        assert not leftovers(out, scratch)


def test_a_full_scratch_file_system_in_a_warm_build_names_it(ready: World, tmp_path: Path) -> None:
    """The stream is cached, so mke2fs is the first to write: its failure is said as the full
    file system it is, not as mke2fs's own words alone."""
    out = fresh_out(ready, tmp_path)
    with tmpfs(tmp_path / "s", "2m") as scratch:
        proc = ready.run("rootfs", "--runtime", RUNTIME, VULCAN_OUT=str(out), VULCAN_SCRATCH=str(scratch))
        assert proc.returncode == 7
        no_traceback(proc)
        assert "reusing its tar" in proc.stderr
        assert f"no space left on {scratch} writing the image" in proc.stderr, proc.stderr
        assert not leftovers(out, scratch)


def test_a_full_cache_while_downloading_names_the_file_system(world: World, tmp_path: Path) -> None:
    kernel = world.pins["kernel"]
    big = b"\x7fELF" + os.urandom(3 << 20)  # more than the cache's file system holds
    for arch in ("x86_64", "aarch64"):
        kernel["sha256"][arch] = hashlib.sha256(big).hexdigest()
        world.mirror.add(kernel["url"].format(version=kernel["version"], arch=arch), big)
    with tmpfs(tmp_path / "cache", "1m") as cache:
        proc = world.run("download", VULCAN_CACHE=str(cache))
        assert proc.returncode == 7
        no_traceback(proc)
        assert f"no space left on {cache} downloading" in proc.stderr and ".part" in proc.stderr, proc.stderr


def test_a_read_only_cache_serves_what_it_has(ready: World, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    out = fresh_out(ready, tmp_path)
    assert ready.run("download", VULCAN_OUT=str(tmp_path / "o1")).returncode == 0  # now the cache has it all
    subprocess.run(["cp", "-a", str(ready.cache), str(cache)], check=True)
    with read_only(cache):
        dl = ready.run("download", VULCAN_CACHE=str(cache), VULCAN_OUT=str(out))
        assert dl.returncode == 0, dl.stderr
        proc = ready.run("rootfs", "--runtime", RUNTIME, VULCAN_CACHE=str(cache), VULCAN_OUT=str(out),
                         VULCAN_REASSEMBLE="1")  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "not keeping the tar stream in the cache" in proc.stderr
        assert sha(out / "images" / f"{RUNTIME}.ext4") == ready.reference  # type: ignore[attr-defined]
        # what it lacks is an error that says so (not an OSError from a lock file)
        (out / "bin" / ".stamps" / "download.json").unlink()
        pinned = ready.pins["kernel"]["sha256"][ARCH]
        ready.pins["kernel"]["sha256"][ARCH] = "1" * 64  # a kernel the cache does not hold
        try:
            missing = ready.run("download", VULCAN_CACHE=str(cache), VULCAN_OUT=str(out))
        finally:
            ready.pins["kernel"]["sha256"][ARCH] = pinned
            ready.write_pins()
        assert missing.returncode == 3
        no_traceback(missing)
        assert "the cache is read-only" in missing.stderr


@pytest.mark.parametrize("marker", ["rootfs python (", "downloading", "$ mke2fs"])
def test_kill_9_at_each_build_phase_then_a_rerun_succeeds_and_cleans_up(
    ready: World, tmp_path: Path, marker: str
) -> None:
    out = fresh_out(ready, tmp_path)
    cache = tmp_path / "cache"  # cold: the run fetches, assembles and writes
    ram = tmp_path / "ram"  # where the image is first written (a RAM file system by default)
    env = ready.env(VULCAN_OUT=str(out), VULCAN_CACHE=str(cache), VULCAN_RAM=str(ram))
    ready.write_pins()
    proc = subprocess.Popen(
        [sys.executable, "-m", "scripts", "rootfs", "--runtime", RUNTIME], cwd=REPO, env=env,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:
        if marker in line:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(60)
    again = ready.run("rootfs", "--runtime", RUNTIME, VULCAN_OUT=str(out), VULCAN_CACHE=str(cache), VULCAN_RAM=str(ram))
    assert again.returncode == 0, again.stderr
    assert sha(out / "images" / f"{RUNTIME}.ext4") == ready.reference  # type: ignore[attr-defined]
    assert not leftovers(out, cache, ram), leftovers(out, cache, ram)
    verify = ready.run("verify", "--json", VULCAN_OUT=str(out), VULCAN_CACHE=str(cache))
    rows = json.loads(verify.stdout)["rows"]
    assert not [r for r in rows if r["result"] == "FAIL" and "python" in r["artifact"]]


def _stat(pid: int) -> tuple[str, str, int, int] | None:
    """(comm, state, ppid, start time) of a process from /proc/PID/stat, or None once it is gone.
    stat, unlike cmdline, never waits on the process's memory map (a reader of cmdline blocks
    while any process it scans is stuck in a page fault: other work on the machine)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
    return comm, rest[0], int(rest[1]), int(rest[19])


def _children(pid: int) -> dict[int, tuple[str, str, int, int]]:
    found = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (st := _stat(int(d.name))) is not None and st[2] == pid:
            found[int(d.name)] = st
    return found


def test_a_tool_dies_with_the_build_that_started_it() -> None:
    """kill -9 of the build's own process (not its group: a supervisor, the OOM killer): the
    tool it runs (mke2fs into RAM scratch, a VM) must not run on as an orphan."""
    build = subprocess.Popen(
        [sys.executable, "-c", "from scripts.run import run_tool; run_tool(['sleep', '600'])"], cwd=REPO,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert build.stderr is not None
    assert "$ sleep" in build.stderr.readline()
    # the tool is the build's child (setpriv execs it in place); the deadlines bound a failure only
    deadline, tool = time.monotonic() + 60, None
    while tool is None and time.monotonic() < deadline:
        tool = next(((pid, st) for pid, st in _children(build.pid).items() if st[0] == "sleep"), None)
        time.sleep(0.02)
    if tool is None:
        seen = _children(build.pid)
        build.kill()
        err = build.communicate(timeout=10)[1]
        raise AssertionError(f"the tool never started; the build's children: {seen}; {err}")
    pid, (_, _, _, started) = tool
    build.kill()
    build.wait(10)
    deadline = time.monotonic() + 60

    def running() -> bool:  # the same process (not a reused pid), and not a zombie waiting to be reaped
        st = _stat(pid)
        return st is not None and st[3] == started and st[1] not in ("Z", "X")

    while running() and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = running()
    if alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, "the tool outlived the build that started it"


def test_clean_sweeps_the_ram_scratch_a_killed_build_left(ready: World, tmp_path: Path) -> None:
    out = fresh_out(ready, tmp_path)
    ram = tmp_path / "ram"
    proc = ready.popen("rootfs", "--runtime", RUNTIME, VULCAN_OUT=str(out), VULCAN_CACHE=str(tmp_path / "cache"),
                       VULCAN_RAM=str(ram))  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:
        if "$ mke2fs" in line:
            proc.kill()
            break
    proc.wait(60)
    assert [p for p in ram.rglob("*") if p.name.startswith(".vulcan-")]  # what the dead run left in RAM
    done = ready.run("clean", VULCAN_OUT=str(out), VULCAN_RAM=str(ram))
    assert done.returncode == 0, done.stderr
    assert not (ram / f"vulcan-images-{os.getuid()}").exists()


def test_an_image_is_written_in_ram_first_and_nothing_is_left_there(ready: World, tmp_path: Path) -> None:
    """By default an image is written in /dev/shm (mke2fs is faster there) and copied next to
    images/ beside its hash: the same bytes, still sparse, and RAM given back."""
    out = fresh_out(ready, tmp_path)
    ram = tmp_path / "ram"
    proc = ready.run("rootfs", "--runtime", RUNTIME, VULCAN_OUT=str(out), VULCAN_RAM=str(ram), VULCAN_TIMING="1")
    assert proc.returncode == 0, proc.stderr
    assert "copy ext4 out of RAM=" in proc.stderr  # the build's own account: it went through RAM
    image = out / "images" / f"{RUNTIME}.ext4"
    assert sha(image) == ready.reference  # type: ignore[attr-defined]
    assert image.stat().st_blocks * 512 < image.stat().st_size  # the holes stayed holes
    assert [p for p in ram.rglob("*") if p.is_file() or p.name.startswith(".vulcan-")] == []
    assert (ram / f"vulcan-images-{os.getuid()}").stat().st_mode & 0o777 == 0o700  # /dev/shm is shared


@contextlib.contextmanager
def _sparse_in_ram(size: int, data: dict[int, bytes]) -> Iterator[Path]:
    """A sparse file of ``size`` bytes in /dev/shm (an image as a build writes it there), with
    ``data`` written at each offset and holes between; skips where there is no /dev/shm."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm here")
    with tempfile.TemporaryDirectory(dir=shm) as d:
        img = Path(d) / "sparse.img"
        with open(img, "wb") as f:
            f.truncate(size)
            for at, chunk in data.items():
                f.seek(at)
                f.write(chunk)
        yield img


def test_hashing_a_sparse_file_in_ram_leaves_its_holes_alone(tmp_path: Path) -> None:
    """Hashing an image still in /dev/shm must not allocate its holes (mapping a tmpfs hole
    does): they would then be copied out as data, and the published image would lose them."""
    from scripts.hashing import sha256_file
    from scripts.sparse import sparse_copy

    with _sparse_in_ram(
        64 << 20, {0: b"data" * 1024, 20 << 20: b"data" * 1024, (64 << 20) - 4096: b"data" * 1024}
    ) as img:
        before = img.stat().st_blocks
        assert sha256_file(img) == hashlib.sha256(img.read_bytes()).hexdigest()
        assert img.stat().st_blocks == before
        sparse_copy(img, tmp_path / "out.img")
        assert (tmp_path / "out.img").stat().st_blocks * 512 <= 3 * 4096 * 4  # three pages of data, a few blocks


def test_an_image_copied_out_of_ram_is_hashed_as_copied_and_ram_freed_only_after(tmp_path: Path) -> None:
    """The copy out of RAM and the hash run at once (hashing.copy_and_hash): the digest is the
    bytes', the copy keeps the holes, RAM is given back only once the check passed and the
    copy is whole, and a failed check gives no digest and leaves RAM to the caller."""
    from scripts.hashing import copy_and_hash

    # data across several 8 MiB hash windows
    with _sparse_in_ram(
        40 << 20, {0: b"data" * 1024, 9 << 20: os.urandom(3 << 20), (40 << 20) - 4096: b"data" * 1024}
    ) as img:
        want = hashlib.sha256(img.read_bytes()).hexdigest()
        seen: list[str] = []

        def free() -> None:
            seen.append(f"free:{(tmp_path / 'out.img').stat().st_blocks * 512 >= 3 << 20}")
            img.unlink()

        assert copy_and_hash(img, tmp_path / "out.img", lambda: seen.append("check"), free) == want
        assert seen == ["check", "free:True"] and not img.exists()
        copied = tmp_path / "out.img"
        assert hashlib.sha256(copied.read_bytes()).hexdigest() == want
        assert copied.stat().st_size == 40 << 20 and copied.stat().st_blocks * 512 < 5 << 20  # holes stayed

        copied.write_bytes(b"")
        img.write_bytes(b"x" * 4096)

        def bad() -> None:
            raise RuntimeError("e2fsck found problems")

        with pytest.raises(RuntimeError, match="e2fsck found problems"):
            copy_and_hash(img, copied, bad, lambda: seen.append("freed a failed image"))
        assert "freed a failed image" not in seen and img.exists()


def test_a_ram_file_system_without_room_is_passed_over(ready: World, tmp_path: Path) -> None:
    out = fresh_out(ready, tmp_path)
    with tmpfs(tmp_path / "ram", "1m") as ram:
        proc = ready.run("rootfs", "--runtime", RUNTIME, VULCAN_OUT=str(out), VULCAN_RAM=str(ram), VULCAN_TIMING="1")
        assert proc.returncode == 0, proc.stderr
        assert "out of RAM" not in proc.stderr
        assert sha(out / "images" / f"{RUNTIME}.ext4") == ready.reference  # type: ignore[attr-defined]
        assert not leftovers(out, ram) and not [p for p in ram.rglob("*") if p.is_file()]


def _fill(fs: Path, leave: int) -> None:
    """Take a RAM file system's space, as another program would, leaving ``leave`` bytes."""
    st = os.statvfs(fs)
    with open(fs / "other-program", "wb") as f:
        f.write(b"\xff" * max(0, st.f_bavail * st.f_frsize - leave))


def test_ram_that_fills_while_any_writer_writes_there_falls_back_to_disk(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """The RAM file system had room when the build looked, then another program took it:
    mke2fs and tar2sqfs (which fails with 'I/O error' and removes its output) both land on disk."""
    from scripts.formats import FORMATS, Job
    from scripts.rootfs import make, tarwalk

    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):  # 24 MiB, incompressible: squashfs needs the room too
        (src / f"f{i}").write_bytes(os.urandom(4 << 20))
    tar = tmp_path / "t.tar"
    subprocess.run(["tar", "--format=pax", "--owner=0", "--group=0", "-cf", str(tar), "-C", str(src), "."],
                   check=True)  # fmt: skip
    facts = tarwalk.read_facts(tar)
    job = Job(tar, facts.sha256, facts.shape, 1_700_000_000, "vulcan-t", 1)
    with tmpfs(tmp_path / "ram", "64m") as ram:
        for fmt in FORMATS:
            if fmt == "squashfs" and shutil.which("tar2sqfs") is None:
                continue
            # more left than a writer's leftovers would suggest (tar2sqfs removes its partial
            # image), less than the image needs
            _fill(ram, 20 << 20)
            final = tmp_path / f"t.{fmt}"
            written, where = make._write(FORMATS[fmt].writer, job, ram / f"t.{fmt}", final)
            assert where == final and final.stat().st_size == written.size
            assert not (ram / f"t.{fmt}").exists()
            assert f"{ram} (VULCAN_RAM) filled up while t.{fmt} was written there" in capfd.readouterr().err
            (ram / "other-program").unlink()


def test_ram_that_fills_while_the_agent_is_spliced_falls_back_to_disk(
    ready: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    from scripts.rootfs import AGENT, cache, make, tarwalk

    monkeypatch.setenv("VULCAN_CACHE", str(ready.cache))
    tar = next((ready.cache / "rootfs" / "base").rglob("*.tar"))
    base = cache.cached(tar.stem, "base")
    assert base is not None
    facts = tarwalk.read_facts(base.tar, AGENT)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with tmpfs(tmp_path / "ram", f"{(tar.stat().st_size >> 20) + 8}m") as ram:
        _fill(ram, 64 << 10)
        spliced = make._splice(base, facts, b"another agent", 1_700_000_000, ram, scratch)
        assert spliced.tar == scratch / "rootfs.tar" and not list(ram.glob("*.tar"))
    assert "(VULCAN_RAM) filled up while the agent was spliced into the stream there" in capfd.readouterr().err
    assert tarwalk.read_facts(spliced.tar).sha256 == spliced.sha256


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"SOURCE_DATE_EPOCH": "99999999999999999999"}, "SOURCE_DATE_EPOCH"),
        ({"VULCAN_MIRROR": "notaurl"}, "VULCAN_MIRROR"),
        ({"VULCAN_OUT": "/etc/hostname/out"}, "VULCAN_OUT"),
        ({"VULCAN_KEEP_TAR": "/etc/hostname"}, "VULCAN_KEEP_TAR"),
        ({"VULCAN_FETCH_WORKERS": "abc"}, "VULCAN_FETCH_WORKERS"),
        ({"VULCAN_FETCH_WORKERS": "0"}, "VULCAN_FETCH_WORKERS"),
        ({"VULCAN_FETCH_WORKERS": "²"}, "VULCAN_FETCH_WORKERS"),  # str.isdigit() says yes, int() no
        ({"SOURCE_DATE_EPOCH": "²"}, "SOURCE_DATE_EPOCH"),
        ({"SOURCE_DATE_EPOCH": "9" * 5000}, "SOURCE_DATE_EPOCH"),
        ({"VULCAN_MKE2FS_INPUT": "zip"}, "VULCAN_MKE2FS_INPUT"),
        ({"VULCAN_REASSEMBLE": "yes"}, "VULCAN_REASSEMBLE"),
        ({"VULCAN_RAM": "/etc/hostname"}, "VULCAN_RAM"),
    ],
)
def test_a_bad_setting_is_an_error_naming_it_before_any_work(
    ready: World, tmp_path: Path, env: dict[str, str], names: str
) -> None:
    proc = ready.run("rootfs", "--runtime", RUNTIME, **{"VULCAN_OUT": str(tmp_path / "o"), **env})
    assert proc.returncode == 4
    no_traceback(proc)
    assert names in proc.stderr
    assert "downloading" not in proc.stderr


def test_headroom_has_a_sane_upper_bound(ready: World, tmp_path: Path) -> None:
    w = copy.deepcopy(ready.pins)
    w["alpine"]["headroom_mib"] = 1000000000000000
    path = tmp_path / "pins.json"
    path.write_text(json.dumps(w))
    proc = subprocess.run(
        [sys.executable, "-m", "scripts", "rootfs", "--runtime", RUNTIME], cwd=REPO,
        env=ready.env(VULCAN_PINS=str(path), VULCAN_OUT=str(tmp_path / "o")), capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 4
    no_traceback(proc)
    assert "alpine.headroom_mib: 1000000000000000 is more than 65536" in proc.stderr


def test_an_unresolvable_mirror_fails_at_once_with_the_hint(world: World) -> None:
    proc = world.run("download", VULCAN_MIRROR="http://mirror.invalid:8080/up")
    assert proc.returncode == 3
    no_traceback(proc)
    assert "does not resolve" in proc.stderr and "offline" in proc.stderr
    assert "retrying" not in proc.stderr


# -- every byte from outside, including ours -----------------------------------------------------


def test_every_python_requirement_is_hash_locked_and_installed_with_the_check_on() -> None:
    for txt in sorted(REPO.glob("requirements*.txt")):
        reqs = [line for line in txt.read_text().splitlines() if line and not line.startswith((" ", "#"))]
        assert reqs, txt
        for line in reqs:
            assert "==" in line and line.rstrip().endswith("\\"), f"{txt.name}: {line} has no hash"
        pinned = {line.split("==")[0].split(" ")[0].lower() for line in reqs}
        wanted = (REPO / txt.name.replace(".txt", ".in")).read_text()
        for line in wanted.splitlines():
            if line and not line.startswith(("#", "-r")):
                assert line.split("==")[0].lower() in pinned, f"{txt.name} lacks {line}: run .ci/lock-requirements"
    assert '"--require-hashes"' in (REPO / "scripts/venvs.py").read_text()  # the sessions' virtualenvs
    setup = (REPO / ".ci/setup-debian").read_text() + (REPO / ".ci/run").read_text()
    assert "--require-hashes -r requirements-nox.txt" in setup


def _pypi_reachable() -> bool:
    import socket

    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


def test_the_nox_of_the_set_up_runs_for_every_user() -> None:
    """.ci/setup-debian's nox once came from the python3 first on root's PATH (pyenv under
    /root): 'Permission denied' for everyone else. Debian's own Python, and a check as nobody."""
    nox = Path("/usr/local/bin/nox")
    if not nox.exists():
        pytest.skip("no /usr/local/bin/nox: .ci/setup-debian has not run on this machine")
    python = Path(os.path.realpath(Path(os.path.realpath(nox)).parent / "python"))
    assert not any(python.is_relative_to(home) for home in (Path("/root"), Path("/home"))), python
    if os.geteuid() != 0:
        pytest.skip("running it as another user needs root")
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", str(nox), "--version"],
                          capture_output=True, text=True, cwd="/")  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_a_tampered_wheel_is_refused(tmp_path: Path) -> None:
    """A local index serving other bytes under a locked name and version: pip must refuse it."""
    lines = (REPO / "requirements-nox.txt").read_text().split("\n")
    start = next(i for i, line in enumerate(lines) if line.startswith("colorlog=="))
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith("    --hash"):
            break
        block.append(line)
    version = lines[start].split("==")[1].split()[0]
    req = tmp_path / "req.txt"
    req.write_text("\n".join(block).rstrip("\\ ") + "\n")
    index = tmp_path / "index"
    index.mkdir()
    with zipfile.ZipFile(index / f"colorlog-{version}-py3-none-any.whl", "w") as whl:
        whl.writestr("colorlog/__init__.py", "raise SystemExit('tampered')\n")
        whl.writestr(
            f"colorlog-{version}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: colorlog\nVersion: {version}\n"
        )
        whl.writestr(
            f"colorlog-{version}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        whl.writestr(f"colorlog-{version}.dist-info/RECORD", "")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--isolated", "--no-index", "--find-links", str(index),
         "--require-hashes", "--no-deps", "--target", str(tmp_path / "t"), "-r", str(req)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "DO NOT MATCH THE HASHES" in proc.stderr
    assert not (tmp_path / "t" / "colorlog").exists()


# -- the plan is the single source of truth (issue 12's bug) -----------------------------------


def test_a_relock_after_a_package_left_the_mirror_replans_the_build(ready: World, tmp_path: Path) -> None:
    """The locked musl is replaced upstream by a new build: the build re-locks, and manifest,
    stamp and lock all describe the new closure (they used to describe the old one)."""
    saved_lock = (ready.tmp / "alpine.lock.json").read_bytes()
    out = fresh_out(ready, tmp_path)
    pkgs = imagerepo.packages()
    old = next(p for p in pkgs["main"] if p.name == "musl")
    new = copy.deepcopy(old)
    new.version, new.build_time = old.version.rsplit("-r", 1)[0] + "-r9", old.build_time + 86400
    pkgs["main"] = [new if p is old else p for p in pkgs["main"]]
    try:
        publish(ready.mirror, pkgs)
        ready.mirror.remove(f"{CDN}/{BRANCH}/main/{ARCH}/musl-{old.version}.apk")
        cache = str(tmp_path / "cache")  # nothing cached: the packages are needed
        proc = ready.run("rootfs", "--runtime", RUNTIME, VULCAN_OUT=str(out), VULCAN_CACHE=cache)
        assert proc.returncode == 0, proc.stderr
        assert "is gone from the mirror" in proc.stderr
        manifest = json.loads((out / "images" / f"{RUNTIME}.manifest.json").read_text())
        versions = {p["name"]: p["version"] for p in manifest["packages"]}
        assert versions["musl"] == new.version
        entry = json.loads((ready.tmp / "alpine.lock.json").read_text())["entries"][f"{RUNTIME}/{ARCH}"]
        locked = [Locked(**p) for p in entry["packages"]]
        want = hashlib.sha256(json.dumps([f"{p.name}-{p.version} {p.checksum}" for p in locked]).encode()).hexdigest()
        assert manifest["lock_sha256"] == want
        assert manifest["source_date_epoch"] == max(p.build_time for p in locked)
        again = ready.run("rootfs", "--runtime", RUNTIME, VULCAN_OUT=str(out), VULCAN_CACHE=cache)
        assert again.returncode == 0 and "up to date" in again.stderr, again.stderr  # the stamp agrees too
    finally:
        publish(ready.mirror, imagerepo.packages())
        (ready.tmp / "alpine.lock.json").write_bytes(saved_lock)


def test_a_package_gone_from_mirror_and_index_says_that_a_relock_will_not_help(ready: World, tmp_path: Path) -> None:
    """--frozen (CI): musl left the mirror and nothing provides it any more. 'run nox -s lock'
    would fail the same way: the hint says to change the world."""
    saved_lock = (ready.tmp / "alpine.lock.json").read_bytes()
    out = fresh_out(ready, tmp_path)
    pkgs = imagerepo.packages()
    old = next(p for p in pkgs["main"] if p.name == "musl")
    pkgs["main"] = [p for p in pkgs["main"] if p is not old]
    try:
        publish(ready.mirror, pkgs)
        ready.mirror.remove(f"{CDN}/{BRANCH}/main/{ARCH}/musl-{old.version}.apk")
        proc = ready.run("rootfs", "--runtime", RUNTIME, "--frozen", VULCAN_OUT=str(out),
                         VULCAN_CACHE=str(tmp_path / "cache"))  # fmt: skip
        assert proc.returncode == 4
        no_traceback(proc)
        assert f"musl-{old.version}.apk is gone from the mirror" in proc.stderr
        assert "a re-lock would not help: the pins no longer resolve against the mirror" in proc.stderr
        assert "alpine.runtimes.python.world" in proc.stderr
    finally:
        publish(ready.mirror, imagerepo.packages())
        (ready.tmp / "alpine.lock.json").write_bytes(saved_lock)
