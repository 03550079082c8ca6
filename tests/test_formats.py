"""Adding an image format is one writer module, one reader module and one record: a format the
test registers (a plain tar, "tarfs") is built, described and verified by the tool as it is."""

from __future__ import annotations

import json
import shutil
import sys
import tarfile
import types
from pathlib import Path

import pytest

from scripts import formats, kconfig
from scripts.formats import Format, Inode, Job, Written
from scripts.pins import host_arch
from tests.support import imagerepo
from tests.support.world import World

ARCH = host_arch()


class TarfsWriter:
    """The stream as it is: a read-only "image" any tar reader opens."""

    def tool_inputs(self) -> dict[str, str]:
        return {"tarfs": "1"}

    def write(self, job: Job, image: Path) -> Written:
        shutil.copyfile(job.tar, image)
        return Written(image.stat().st_size, True, {"tarfs": {"members": job.shape.entries}})

    def check(self, image: Path, deep: bool = False) -> None:
        with tarfile.open(image) as tar:
            tar.getmembers()

    def room(self, job: Job) -> int:
        return job.tar.stat().st_size


def _stat_many(image: Path, paths: list[str]) -> dict[str, Inode | None]:
    kinds = {tarfile.REGTYPE: "regular", tarfile.DIRTYPE: "directory", tarfile.SYMTYPE: "symlink"}
    with tarfile.open(image) as tar:
        found = {m.name: m for m in tar.getmembers()}
    return {
        p: Inode(kinds.get(m.type, "other"), m.mode, m.uid, m.gid, m.size, 1, m.linkname)
        if (m := found.get(p))
        else None
        for p in paths
    }


def _cat(image: Path, path: str) -> bytes:
    with tarfile.open(image) as tar:
        f = tar.extractfile(path)
        return f.read() if f else b""


def _rdump(image: Path, dirs: list[str], root: Path) -> list[str]:
    return list(dirs)  # not needed here: the runtime check then says it could not copy them


@pytest.fixture
def tarfs(monkeypatch: pytest.MonkeyPatch) -> Format:
    writer = types.ModuleType("scripts.formats.tarfs")
    writer.WRITER = TarfsWriter()  # type: ignore[attr-defined]
    reader = types.ModuleType("scripts.formats.tarfs_read")
    reader.stat_many, reader.cat, reader.rdump = _stat_many, _cat, _rdump  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, writer.__name__, writer)
    monkeypatch.setitem(sys.modules, reader.__name__, reader)
    record = Format("tarfs", "tarfs", "tarfs_read", ("TARFS",), "tar reads it", writable=False, max_epoch=2**33)
    monkeypatch.setitem(formats.FORMATS, "tarfs", record)  # the one table line
    return record


def test_the_kernel_check_asks_the_record(tarfs: Format) -> None:
    config = {o: "y" for o in (*kconfig.EVERY_GUEST, "EXT4_FS")}
    assert kconfig.missing(config, ["ext4"]) == []
    # not writable: booted read-only, so the overlay is needed too
    assert kconfig.missing(config, ["tarfs"]) == ["CONFIG_TARFS", "CONFIG_OVERLAY_FS", "CONFIG_TMPFS"]


def test_a_registered_format_is_built_listed_and_verified(
    world: World, tarfs: Format, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scripts import verify
    from scripts.pins import load
    from scripts.rootfs import make, plan

    imagerepo.setup(world, runtimes={"python": imagerepo.RUNTIMES["python"]})
    world.use_agent()
    world.pins["alpine"]["formats"] = ["ext4", "tarfs"]
    world.write_pins()
    for key, value in world.env().items():
        monkeypatch.setenv(key, value)
    pins = load(world.pins_path)
    built = make.make(plan.check(pins, "python", ARCH, frozen=False, dry=False).context)
    image = world.out / "images" / "python.tarfs"
    assert [o.image for o in built.outputs] == [world.out / "images" / "python.ext4", image]
    with tarfile.open(image) as tar:
        names = tar.getnames()
    assert "usr/local/bin/vulcan-guest" in names
    listed = {i["format"]: i for i in json.loads((world.out / "images/python.manifest.json").read_text())["images"]}
    assert listed["tarfs"]["tarfs"] == {"members": len(names)}
    rows = {(r.artifact, r.check): r for r in verify.verify(pins, ARCH, False).rows}
    assert rows[("images/python.tarfs", "tar reads it")].result == "pass"
    assert rows[("images/python.tarfs", "agent = bin/vulcan-guest")].result == "pass"
    assert rows[("images/python.tarfs", "sha256 = manifest")].result == "pass"


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc)")
@pytest.mark.skipif(sys.platform != "linux" or __import__("os").uname().machine != "x86_64",
                    reason="the CRC-32C instruction is used on x86-64 only")  # fmt: skip
def test_a_crc32c_shim_that_computes_another_crc_is_never_given_to_mke2fs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """ext4_crc32c.c as it is passes the check against the reference; the same file wrong by one
    bit for one length is refused (said once, nothing kept in the cache) and mke2fs runs plain."""
    from scripts.formats import ext4_preload as ext4_crc

    if not ext4_crc._cpu_has_sse42():
        pytest.skip("this CPU has no SSE4.2")
    assert ext4_crc.crc32c(0xFFFFFFFF, b"123456789") ^ 0xFFFFFFFF == 0xE3069283  # the reference (RFC 3720)
    monkeypatch.setenv("VULCAN_MKE2FS_IO_CACHE", "0")  # the CRC-32C helper alone
    monkeypatch.setenv("VULCAN_CACHE", str(tmp_path / "good"))
    [good] = ext4_crc.preload()
    assert good.parent == tmp_path / "good/tools" and ext4_crc.check(good) is None
    wrong = tmp_path / "wrong.c"  # right for every length but 7
    wrong.write_text("""#include <stddef.h>
#include <stdint.h>
uint32_t ext2fs_crc32c_le(uint32_t crc, unsigned char const *p, size_t len) {
    size_t n = len;
    while (len--) {
        crc ^= *p++;
        for (int k = 0; k < 8; k++) crc = (crc >> 1) ^ (0x82F63B78u & -(crc & 1u));
    }
    return n == 7 ? crc ^ 1u : crc;
}
""")
    monkeypatch.setattr(ext4_crc, "SOURCE", wrong)
    monkeypatch.setenv("VULCAN_CACHE", str(tmp_path / "bad"))
    assert ext4_crc.preload() == []
    assert "gives another CRC of" in capsys.readouterr().err
    assert list((tmp_path / "bad/tools").iterdir()) == []
    monkeypatch.setenv("VULCAN_CACHE", str(tmp_path / "off"))
    monkeypatch.setenv("VULCAN_MKE2FS_CRC32C", "0")
    monkeypatch.setattr(ext4_crc, "SOURCE", tmp_path / "absent.c")  # not even looked at
    assert ext4_crc.preload() == []


@pytest.mark.skipif(shutil.which("setpriv") is None or __import__("os").getuid() != 0,
                    reason="needs root and setpriv to be another user")  # fmt: skip
def test_a_tools_directory_the_user_may_not_enter_leaves_mke2fs_plain() -> None:
    """VULCAN_TOOLS shared by someone else (here root's, mode 0700): no helper, and no error. The
    tool runs from a copy the user can read, with the system's Python: the checkout, and pytest's
    temporary directories, may sit where only root can enter (a clean clone in mktemp -d does)."""
    import os
    import subprocess

    place = Path(f"/tmp/vulcan-tools-{os.getpid()}")
    shutil.rmtree(place, ignore_errors=True)
    try:
        shutil.copytree(Path(__file__).resolve().parents[1] / "scripts", place / "src/scripts",
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
        (place / "root-only").mkdir(mode=0o700)
        place.chmod(0o755)
        code = "from scripts.formats import ext4_preload; print(ext4_preload.preload())"
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(place / "src"), "HOME": str(place),
               "VULCAN_TOOLS": str(place / "root-only/tools"), "VULCAN_CACHE": str(place / "cache")}  # fmt: skip
        proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3",
                               "-c", code], env=env, capture_output=True, text=True, cwd="/")  # fmt: skip
        assert (proc.returncode, proc.stdout.strip()) == (0, "[]"), proc.stderr
    finally:
        shutil.rmtree(place, ignore_errors=True)


def test_without_a_c_compiler_mke2fs_runs_plain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from scripts.formats import ext4_preload

    monkeypatch.setenv("VULCAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no cc
    assert ext4_preload.preload() == []
    assert not (tmp_path / "cache/tools").exists()


# Run under LD_PRELOAD of ext4_iocache.c: random reads and writes of a file (aligned or not, through
# two descriptors, truncate, punched holes, fsync, O_APPEND, a shared mapping), each read against a
# model of the file, the file against it after each change as this process reads it, and as another
# process reads it after each fsync; then what only the helper's work explains: writes gathered
# (another process does not see them before the fsync) and reads served from kept blocks (a change
# made behind the cache is not read back).
_IO_CACHE_DRIVER = r"""
import ctypes, mmap, os, random, subprocess, sys
path = sys.argv[1]
libc = ctypes.CDLL(None, use_errno=True)  # its fallocate is the preloaded one
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
rng = random.Random(26)
model = bytearray(os.urandom(1 << 18))
with open(path, "wb") as f:
    f.write(model)
fd = os.open(path, os.O_RDWR)
other = os.open(path, os.O_RDWR)

def check_read(at, n):
    got = os.pread(fd, n, at)
    want = bytes(model[at:at + n])
    if got != want:
        sys.exit(f"read of {n} at {at}: not what the file holds")

def check_file():  # read(2) on a new descriptor, nothing else
    f = os.open(path, os.O_RDONLY)
    got = b"".join(iter(lambda: os.read(f, 1 << 16), b""))
    os.close(f)
    if got != bytes(model):
        sys.exit("the file is not what was written to it")

def outside():  # the file as another process reads it
    code = "import sys; sys.stdout.buffer.write(open(sys.argv[1], 'rb').read())"
    return subprocess.run([sys.executable, "-c", code, path], check=True, capture_output=True).stdout

def check_synced():
    os.fsync(fd)
    if outside() != bytes(model):
        sys.exit("after fsync, the file is not what was written to it")

for step in range(int(sys.argv[3])):
    op = rng.random()
    at = rng.randrange(0, len(model) + 8192) if rng.random() < 0.3 else rng.randrange(0, len(model) // 4096) * 4096
    n = rng.choice((4096, 8192, 512, 1, 784, rng.randrange(1, 20000)))
    if op < 0.6:
        check_read(at, n)
    elif op < 0.85:
        data = os.urandom(n)
        os.pwrite(fd if rng.random() < 0.8 else other, data, at)
        if at > len(model):
            model.extend(bytes(at - len(model)))
        model[at:at + n] = data
        check_file()
    elif op < 0.9:
        data = os.urandom(n)
        os.lseek(other, at, 0)
        os.write(other, data)
        if at > len(model):
            model.extend(bytes(at - len(model)))
        model[at:at + n] = data
        check_file()
    elif op < 0.94:
        at = at // 4096 * 4096
        if libc.fallocate(fd, 3, at, 8192) != 0:  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
            sys.exit(f"fallocate: errno {ctypes.get_errno()}")
        end = min(at + 8192, len(model))
        if at < end:
            model[at:end] = bytes(end - at)
        check_file()
    elif op < 0.97:
        size = rng.randrange(1 << 17, 1 << 18)
        (os.ftruncate(fd, size) if rng.random() < 0.5 else os.truncate(path, size))
        model = model[:size] + bytes(max(0, size - len(model)))
        check_file()
    elif op < 0.995:
        os.close(fd)
        fd = os.open(path, os.O_RDWR)
    else:  # another process, so not too often
        check_synced()
for at in range(0, len(model), 4096):
    check_read(at, 4096)
check_synced()

# writes that continue each other are gathered: another process sees them after the fsync only
os.pwrite(fd, b"A" * 4096, 8192)
os.pwrite(fd, b"B" * 4096, 12288)
model[8192:16384] = b"A" * 4096 + b"B" * 4096
gathered = outside()[8192:16384] != bytes(model[8192:16384])
check_synced()

# every block is kept now: a change the cache cannot see (another process) is not read back
os.pwrite(fd, os.urandom(4096), 0)
model[0:4096] = os.pread(other, 4096, 0)
check_read(0, 4096)

def behind(data):  # written by another process, which the cache cannot follow
    code = "import os, sys; os.pwrite(os.open(sys.argv[1], os.O_WRONLY), bytes.fromhex(sys.argv[2]), 0)"
    subprocess.run([sys.executable, "-c", code, path, data.hex()], check=True)

behind(os.urandom(64))
stale = os.pread(fd, 4096, 0) == bytes(model[:4096])  # the block as this process last wrote it
if sys.argv[2] == "append":  # written through an O_APPEND descriptor: the cache is off for good
    os.pwrite(os.open(path, os.O_RDWR | os.O_APPEND), b"x", 0)
else:  # through a shared writable mapping: off for good as well
    with mmap.mmap(os.open(path, os.O_RDWR), 4096) as mapped:
        mapped[100:101] = b"y"
data = os.urandom(64)
behind(data)
model = bytearray(outside())
check_read(0, 4096)
print("gathered" if gathered else "written at once", "served from the cache" if stale else "read from the file")
"""


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc)")
@pytest.mark.skipif(sys.platform != "linux" or __import__("os").uname().machine not in ("x86_64", "aarch64"),
                    reason="the I/O cache is built on 64-bit Linux only")  # fmt: skip
def test_the_io_cache_reads_and_writes_what_the_file_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import subprocess

    from scripts.formats import ext4_preload

    monkeypatch.setenv("VULCAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("VULCAN_MKE2FS_CRC32C", "0")
    [shim] = ext4_preload.preload()
    assert shim.name.startswith("mke2fs-iocache-")
    image = tmp_path / "image"
    image.touch()  # the file is found when the cache is loaded
    env = {**os.environ, **ext4_preload.image_env(image), "LD_PRELOAD": str(shim)}
    for end, steps in (("append", "3000"), ("mmap", "300")):
        run = subprocess.run([sys.executable, "-c", _IO_CACHE_DRIVER, str(image), end, steps], env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == "gathered served from the cache"
    # the same driver without the cache: it reads the change made behind it
    plain = subprocess.run([sys.executable, "-c", _IO_CACHE_DRIVER, str(image), "mmap", "300"],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.strip() == "written at once read from the file"
