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
from scripts.arch import host_arch
from scripts.formats import Format, Inode, Job, Written
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


def _digests(image: Path, paths: set[str]) -> dict[str, str]:
    import hashlib

    with tarfile.open(image) as tar:  # extractfile() reads a hard link's target
        return {m.name: hashlib.sha256(tar.extractfile(m).read()).hexdigest()  # type: ignore[union-attr]
                for m in tar.getmembers() if (m.isreg() or m.islnk()) and m.name in paths}  # fmt: skip


@pytest.fixture
def tarfs(monkeypatch: pytest.MonkeyPatch) -> Format:
    writer = types.ModuleType("scripts.formats.tarfs")
    writer.WRITER = TarfsWriter()  # type: ignore[attr-defined]
    reader = types.ModuleType("scripts.formats.tarfs_read")
    reader.stat_many, reader.cat, reader.rdump, reader.digests = _stat_many, _cat, _rdump, _digests  # type: ignore[attr-defined]
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
    assert rows[("images/python.tarfs", "package files = packages")].result == "pass"


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
        shutil.copytree(Path(__file__).resolve().parents[2] / "scripts", place / "src/scripts",
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
