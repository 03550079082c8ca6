"""Read-only squashfs images from the same tar stream as ext4: squashfs_built, reproducible, the same files
as the ext4 image, checked by verify, and refused with a clear error where they cannot be made."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from scripts.formats import ext4_read as debugfs
from scripts.formats import squashfs_read
from tests.support import imagerepo
from tests.support.world import SHARED, World

pytestmark = [
    pytest.mark.skipif(shutil.which("tar2sqfs") is None, reason="squashfs-tools-ng (tar2sqfs) is not installed"),
    pytest.mark.skipif(shutil.which("mke2fs") is None, reason="e2fsprogs is not installed"),
]
BOTH = ["ext4", "squashfs"]


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def both_formats(w: World) -> None:
    w.pins["alpine"]["formats"] = BOTH
    w.write_pins()


def test_both_formats_are_built_described_and_listed_in_the_sbom(squashfs_built: World) -> None:
    images = squashfs_built.out / "images"
    manifest = json.loads((images / "python.manifest.json").read_text())
    listed = {i["format"]: i for i in manifest["images"]}
    assert sorted(listed) == BOTH
    for fmt, entry in listed.items():
        path = images / f"python.{fmt}"
        assert entry["image"] == path.name and entry["sha256"] == sha(path) and entry["size"] == path.stat().st_size
    assert listed["squashfs"]["squashfs"]["compressor"] == "zstd" and listed["squashfs"]["reproducible"]
    content = manifest["filesystem"]["content_bytes"]
    assert (images / "python.squashfs").stat().st_size < 0.5 * content  # compressed (text-heavy test data)
    spdx = json.loads((images / "python.spdx.json").read_text())
    variants = [r for r in spdx["relationships"] if r["relationshipType"] == "VARIANT_OF"]
    assert len(variants) == 1
    names = {p["name"] for p in spdx["packages"]}
    assert {"python.ext4", "python.squashfs"} <= names


def test_squashfs_holds_exactly_the_files_of_the_ext4_image(squashfs_built: World) -> None:
    """Every owner, mode, size, symlink, hard link, device node and xattr (rdsquashfs/sqfs2tar
    against debugfs)."""
    images = squashfs_built.out / "images"
    sq = squashfs_read.entries(images / "python.squashfs")
    ext = debugfs.stat_many(images / "python.ext4", sorted(sq))
    assert len(sq) > 100
    for path, entry in sq.items():
        e = ext[path]
        assert e is not None, path
        mine = entry.inode
        assert (mine.kind, mine.mode & 0o7777, mine.uid, mine.gid) == (e.kind, e.mode & 0o7777, e.uid, e.gid), path
        if mine.kind == "regular":
            assert (mine.size, mine.links) == (e.size, e.links), path
        if mine.kind == "symlink":
            assert mine.target == (e.target or debugfs.cat(images / "python.ext4", path).decode()), path
    kinds = {e.inode.kind for e in sq.values()}
    assert {"regular", "directory", "symlink", "character special"} <= kinds
    assert sq["usr/bin/python3"].hardlink_to or sq["usr/bin/python3.14"].hardlink_to  # a hard-link pair
    assert sq["dev/console"].devices == (5, 1)
    assert ("user.vulcan", "test") in sq["usr/lib/python3.14/os.py"].xattrs
    assert (sq["work"].inode.uid, sq["work"].inode.gid) == (1000, 1000)


def test_squashfs_is_bit_identical_on_rebuild(squashfs_built: World, tmp_path: Path) -> None:
    """Another output and scratch directory, another cache (so the stream is assembled again)."""
    out = tmp_path / "again"
    shutil.copytree(squashfs_built.out / "bin", out / "bin")
    squashfs_built.run("rootfs", "--all", check=True, VULCAN_OUT=str(out), VULCAN_CACHE=str(tmp_path / "cache"),
              VULCAN_SCRATCH=str(tmp_path / "scratch"))  # fmt: skip
    for fmt in BOTH:
        assert sha(out / "images" / f"python.{fmt}") == sha(squashfs_built.out / "images" / f"python.{fmt}"), fmt


def test_verify_checks_the_squashfs_image(squashfs_built: World) -> None:
    proc = squashfs_built.run("verify", "--json", "--reproduce")
    rows = json.loads(proc.stdout)["rows"]
    # --reproduce compares both formats with what was published
    assert {(r["artifact"], r["result"]) for r in rows if r["check"] == "--reproduce"} == {
        ("images/python.ext4", "pass"), ("images/python.squashfs", "pass")}  # fmt: skip
    assert sum(r["check"] == "--reproduce" for r in rows) == 2
    sq = {r["check"]: r for r in rows if r["artifact"] == "images/python.squashfs"}
    assert sq["sha256 = manifest"]["result"] == "pass"
    assert sq["sqfs2tar reads it all"]["result"] == "pass"
    assert sq["agent = bin/vulcan-guest"]["result"] == "pass"
    assert sq["package files intact"]["result"] == "pass"
    if imagerepo.musl_python():
        assert sq["runtime runs"]["result"] == "pass", sq["runtime runs"]


def test_a_changed_squashfs_image_fails_verify(squashfs_built: World, tmp_path: Path) -> None:
    out = tmp_path / "copy"
    shutil.copytree(squashfs_built.out, out)
    img = out / "images/python.squashfs"
    data = bytearray(img.read_bytes())
    # a byte of the (compressed) inode table: squashfs has no checksums, so a flipped byte of a
    # data block stored uncompressed passes sqfs2tar (the sha256 row catches that); one of a
    # compressed metadata block must break decompression. The superblock says where it is.
    inode_table = int.from_bytes(data[64:72], "little")
    data[inode_table + 10] ^= 0xFF
    img.write_bytes(bytes(data))
    proc = squashfs_built.run("verify", "--json", VULCAN_OUT=str(out))
    assert proc.returncode == 1
    failed = {(r["artifact"], r["check"]) for r in json.loads(proc.stdout)["rows"] if r["result"] == "FAIL"}
    assert ("images/python.squashfs", "sha256 = manifest") in failed
    assert ("images/python.squashfs", "sqfs2tar reads it all") in failed
    assert "Traceback" not in proc.stderr


def test_the_build_check_reads_all_metadata_and_verify_also_every_block(squashfs_built: World, tmp_path: Path) -> None:
    """After writing, a build reads every inode and directory back (as e2fsck -fn does for
    ext4); verify also decompresses every block, since squashfs has no checksums of its own."""
    import struct

    from scripts.errors import BuildError
    from scripts.formats.squashfs import WRITER

    image = squashfs_built.out / "images/python.squashfs"
    WRITER.check(image)
    WRITER.check(image, deep=True)
    inode_table = struct.unpack_from("<Q", image.read_bytes(), 64)[0]  # the superblock's inode_table_start
    # the inode table's first block header (its length: zstd frames carry no checksum, so a
    # flipped byte inside one may decompress "fine"); a byte of a file's data block
    for where, deep_only in ((inode_table, False), (4096 * 50, True)):
        bad = tmp_path / f"bad-{where}.squashfs"
        data = bytearray(image.read_bytes())
        data[where] ^= 0xFF
        bad.write_bytes(bytes(data))
        if deep_only:
            WRITER.check(bad)
        else:
            with pytest.raises(BuildError, match="cannot be read back"):
                WRITER.check(bad)
        with pytest.raises(BuildError, match="cannot be read back"):
            WRITER.check(bad, deep=True)


def test_an_epoch_squashfs_cannot_store_is_refused_before_anything_is_built(
    squashfs_built: World, tmp_path: Path
) -> None:
    """SOURCE_DATE_EPOCH takes up to 2106 (ext4, tar); tar2sqfs only up to 2038-01-19."""
    out = tmp_path / "o"
    shutil.copytree(squashfs_built.out / "bin", out / "bin")
    proc = squashfs_built.run("rootfs", "--all", SOURCE_DATE_EPOCH="2147483648", VULCAN_OUT=str(out))
    assert proc.returncode == 4 and "Traceback" not in proc.stderr
    assert "SOURCE_DATE_EPOCH=2147483648: later than squashfs images can store (at most 2147483647)" in proc.stderr
    assert "leave squashfs out of alpine.formats" in proc.stderr
    assert not (out / "images").exists() or not list((out / "images").glob("python.*"))
    proc = squashfs_built.run("rootfs", "--all", SOURCE_DATE_EPOCH="2147483647", VULCAN_OUT=str(out))
    assert proc.returncode == 0, proc.stderr
    assert (out / "images/python.squashfs").is_file() and (out / "images/python.ext4").is_file()


def test_an_unknown_format_is_a_pins_error(world: World) -> None:
    imagerepo.setup(world, runtimes={"python": imagerepo.RUNTIMES["python"]})
    world.pins["alpine"]["formats"] = ["ext4", "erofs"]
    proc = world.run("rootfs", "--runtime", "python")
    assert proc.returncode == 4 and "Traceback" not in proc.stderr
    assert "alpine.formats: unknown image format 'erofs'" in proc.stderr and "formats: ext4, squashfs" in proc.stderr


def test_tar2sqfs_missing_is_a_clear_error_and_leaves_no_image(world: World, tmp_path: Path) -> None:
    imagerepo.setup(world, runtimes={"python": imagerepo.RUNTIMES["python"]})
    both_formats(world)
    world.use_agent()
    bindir = tmp_path / "path"
    bindir.mkdir()
    for tool in ("mke2fs", "e2fsck", "debugfs", "go"):  # everything but tar2sqfs
        found = shutil.which(tool)
        if found:
            (bindir / tool).symlink_to(found)
    proc = world.run("rootfs", "--runtime", "python", PATH=f"{bindir}:/usr/bin/nothing")
    assert proc.returncode == 5 and "Traceback" not in proc.stderr
    assert "tar2sqfs not found" in proc.stderr and "squashfs-tools-ng" in proc.stderr
    assert not list((world.out / "images").glob("python.*"))


TEST_KERNEL = SHARED / "kernel" / "vmlinux.xz"
