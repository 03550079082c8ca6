"""Fast unit tests of the rootfs logic, without Go, a mirror or mke2fs: the tree merge and its
path rules (like apko's path_traversal_test.go), accounts, image sizing, the stream's shape and
the SBOM's license expressions."""

from __future__ import annotations

import gzip
import hashlib
import io
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.errors import BuildError
from scripts.formats import Shape
from scripts.formats.ext4 import BLOCK, layout
from scripts.rootfs import AGENT, configure, splice, tarwalk
from scripts.rootfs.inflate import inflate
from scripts.rootfs.sbom import license_expression
from scripts.rootfs.splice import splice_agent
from scripts.rootfs.stream import Stream
from scripts.rootfs.tarwalk import read_facts
from scripts.rootfs.tree import Tree, UnsafePackage


def package(tmp: Path, name: str, members: list[tuple[str, str, bytes | str]]) -> Path:
    """A gzip'ed data tar: (path, kind, data-or-link target); kind in file, dir, symlink, hardlink."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, kind, payload in members:
            info = tarfile.TarInfo(path)
            info.mtime = 2_000_000_000
            data = None
            if kind == "file":
                assert isinstance(payload, bytes)
                info.size, info.mode, data = len(payload), 0o644, io.BytesIO(payload)
            elif kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, str(payload)
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, str(payload)
            tar.addfile(info, data)
    path = tmp / f"{name}.tar.gz"
    path.write_bytes(gzip.compress(buf.getvalue(), mtime=0))
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    (tmp_path / "scratch").mkdir()
    return Tree(tmp_path / "scratch")


def add(
    tree: Tree,
    tmp: Path,
    name: str,
    members: list[tuple[str, str, bytes | str]],
    replaces: frozenset[str] = frozenset(),
) -> None:
    tree.add_package(name, inflate(package(tmp, name, members), 0, tree.scratch / f"{name}.tar"), set(replaces))


@pytest.mark.parametrize(
    ("member", "message"),
    [
        ("../../etc/passwd", "contains '..'"),
        ("/etc/passwd", "absolute path"),
        ("usr/../../etc/passwd", "contains '..'"),
        ("./usr/lib/../../../x", "contains '..'"),
    ],
)
def test_paths_outside_the_root_are_refused(tree: Tree, tmp_path: Path, member: str, message: str) -> None:
    with pytest.raises(UnsafePackage, match=message):
        add(tree, tmp_path, "evil", [(member, "file", b"x")])


def test_a_symlink_that_leaves_the_root_cannot_be_written_through(tree: Tree, tmp_path: Path) -> None:
    with pytest.raises(UnsafePackage, match="leads out of the root"):
        add(tree, tmp_path, "evil", [("usr/lib/out", "symlink", "../../../.."), ("usr/lib/out/pwned", "file", b"x")])


def test_an_absolute_symlink_is_followed_inside_the_root(tree: Tree, tmp_path: Path) -> None:
    add(tree, tmp_path, "a", [("lib", "dir", b""), ("lib64", "symlink", "/lib"), ("lib64/libc.so", "file", b"c")])
    assert tree.nodes["lib/libc.so"].owner == "a"
    assert "lib64/libc.so" not in tree.nodes


def test_names_are_normalised(tree: Tree, tmp_path: Path) -> None:
    add(tree, tmp_path, "a", [("./usr/./bin//tool", "file", b"t")])
    assert "usr/bin/tool" in tree.nodes
    assert tree.nodes["usr"].kind == "dir" and tree.nodes["usr/bin"].kind == "dir"


def test_two_packages_may_not_own_one_file_unless_one_replaces_the_other(tree: Tree, tmp_path: Path) -> None:
    add(tree, tmp_path, "a", [("etc/conf", "file", b"a")])
    with pytest.raises(BuildError, match="file conflict: etc/conf is in both a and b"):
        add(tree, tmp_path, "b", [("etc/conf", "file", b"b")])
    add(tree, tmp_path, "c", [("etc/conf", "file", b"c")], replaces={"a"})
    assert tree.read("etc/conf") == b"c" and tree.nodes["etc/conf"].owner == "c"


def test_a_directory_and_a_file_of_one_name_conflict(tree: Tree, tmp_path: Path) -> None:
    add(tree, tmp_path, "a", [("etc/x", "dir", b"")])
    with pytest.raises(BuildError, match="etc/x: a file in b and a dir in a"):
        add(tree, tmp_path, "b", [("etc/x", "file", b"b")])


def test_a_hard_link_must_name_a_file(tree: Tree, tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="which is not a file"):
        add(tree, tmp_path, "a", [("bin", "dir", b""), ("bin/x", "hardlink", "bin")])


def test_the_stream_is_sorted_clamped_and_its_shape_is_recomputed_from_it(tree: Tree, tmp_path: Path) -> None:
    add(tree, tmp_path, "a", [("z", "file", b"z" * 5000), ("b/y", "file", b"y"), ("b/h", "hardlink", "b/y")])
    out = tmp_path / "s.tar"
    with open(out, "wb") as f:
        tree.write_tar(f, epoch=1_700_000_000)
    with tarfile.open(out) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert {m.mtime for m in members} == {1_700_000_000}  # the packages' later mtimes are clamped
    # b/h sorts first: it carries the bytes and b/y links to it
    assert [(m.name, m.type) for m in members if m.name.startswith("b/")] == [("b/h", b"0"), ("b/y", b"1")]
    facts = read_facts(out)
    shape, files = facts.shape, facts.files
    assert shape == Shape(file_blocks=2 + 1, dirs=1, entries=4, content_bytes=5001)
    assert files == {"z": 5000, "b/h": 1, "b/y": 1}
    again = tmp_path / "t.tar"
    with open(again, "wb") as f:
        tree.write_tar(f, epoch=1_700_000_000)
    assert again.read_bytes() == out.read_bytes()


@pytest.mark.parametrize("long_names", [False, True], ids=["ustar", "pax-headers"])
def test_an_agent_splice_gives_the_bytes_and_sha256_of_a_stream_written_with_that_agent(
    tree: Tree, tmp_path: Path, long_names: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The splice copies what precedes the agent's entry without reading it and takes its hash
    from the verification's state there: the result must still be the stream a full write gives
    (entries before and after the agent, PAX headers around it when names need them)."""
    deep = "d" * 120 if long_names else "d"  # a path over 100 characters needs a PAX header
    add(tree, tmp_path, "a", [(f"usr/lib/{deep}/x", "file", b"x" * 9000), ("usr/share/z", "file", b"z" * 700),
                              ("var/y", "file", b"y")])  # fmt: skip
    agent_path = AGENT
    if long_names:  # the agent's own entry behind a PAX header too
        agent_path = f"usr/local/{'b' * 120}/vulcan-guest"
        monkeypatch.setattr(splice, "AGENT", agent_path)
    monkeypatch.setattr(tarwalk, "WINDOW", 1024)  # the hash trails the walk by windows: cross many
    out: dict[str, Path] = {}
    for name, agent in (("old", b"old agent" * 100), ("new", b"a new, longer agent" * 700)):
        tree.put_generated(agent_path, "file", 0o755, agent)
        out[name] = tmp_path / f"{name}.tar"
        with open(out[name], "wb") as f:
            tree.write_tar(f, epoch=1_700_000_000)
    with tarfile.open(out["old"]) as tar:
        assert bool(tar.getmember(agent_path).pax_headers) == long_names
    facts = read_facts(out["old"], agent_path)  # the walk keeps the hash state where the splice asks
    base = Stream(out["old"], facts.sha256, facts.shape, {}, [], 0, None)
    (tmp_path / "scratch2").mkdir()
    spliced = splice_agent(base, facts, b"a new, longer agent" * 700, 1_700_000_000, tmp_path / "scratch2")
    assert spliced.tar.read_bytes() == out["new"].read_bytes()
    assert spliced.sha256 == hashlib.sha256(out["new"].read_bytes()).hexdigest()
    assert spliced.shape == read_facts(out["new"]).shape


def test_a_splice_refuses_a_stream_replaced_after_its_verification(tree: Tree, tmp_path: Path) -> None:
    tree.put_generated(AGENT, "file", 0o755, b"agent")
    tar = tmp_path / "s.tar"
    with open(tar, "wb") as f:
        tree.write_tar(f, epoch=1_700_000_000)
    facts = read_facts(tar, AGENT)
    other = tmp_path / "other.tar"
    other.write_bytes(tar.read_bytes())
    other.replace(tar)  # same bytes, but not the file that was read: its hash state says nothing of it
    with pytest.raises(BuildError, match="changed after it was verified"):
        splice_agent(Stream(tar, facts.sha256, facts.shape, {}, [], 0, None), facts, b"x", 1_700_000_000, tmp_path)


def test_accounts_add_the_sandbox_user_and_the_groups_install_scripts_would(tree: Tree, tmp_path: Path) -> None:
    passwd = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/sbin/nologin\n"
    group = b"root:x:0:root\nnobody:x:65534:\n"
    add(tree, tmp_path, "alpine-baselayout-data", [("etc/passwd", "file", passwd), ("etc/group", "file", group)])
    configure.accounts(tree, has_busybox=True)
    users = (tree.read("etc/passwd") or b"").decode().splitlines()
    groups = (tree.read("etc/group") or b"").decode().splitlines()
    shadow = (tree.read("etc/shadow") or b"").decode().splitlines()
    assert "sandbox:x:1000:1000:Vulcan sandbox:/work:/bin/sh" in users
    assert "klogd:x:100:100:klogd:/dev/null:/sbin/nologin" in users  # first free system id, as adduser -S
    assert {"shadow:x:42:", "klogd:x:100:", "sandbox:x:1000:"} <= set(groups)
    assert shadow[0] == "root:*::0:::::" and "sandbox:!::0:::::" in shadow
    node = tree.nodes["etc/shadow"]
    assert (node.mode, node.gid) == (0o640, 42)
    configure.accounts(tree, has_busybox=True)  # idempotent: nothing added twice
    assert (tree.read("etc/passwd") or b"").decode().splitlines() == users


def test_image_size_grows_with_content_and_leaves_the_headroom() -> None:
    small = layout(file_blocks=1000, dirs=100, entries=2000, headroom_mib=64)
    big = layout(file_blocks=50_000, dirs=3000, entries=12_000, headroom_mib=64)
    assert small.size_bytes < big.size_bytes and small.size_bytes % (1 << 20) == 0
    for lay, blocks, dirs, entries in ((small, 1000, 100, 2000), (big, 50_000, 3000, 12_000)):
        used = (blocks + dirs) * BLOCK + lay.inodes * 256
        assert lay.size_bytes - used >= 64 << 20  # the headroom is free space, after the content
        assert lay.inodes >= entries + (64 << 20) // 16384
    assert layout(0, 0, 0, 0).size_bytes == 16 << 20  # a floor for tiny images


@pytest.mark.parametrize(
    ("alpine", "spdx"),
    [
        ("MIT", "MIT"),
        ("GPL-2.0-only MIT", "GPL-2.0-only AND MIT"),
        ("MIT AND (GPL-2.0-or-later OR BSD-3-Clause)", "MIT AND (GPL-2.0-or-later OR BSD-3-Clause)"),
        ("", "NOASSERTION"),
        ("custom:weird license", "NOASSERTION"),
    ],
)
def test_sbom_license_expressions(alpine: str, spdx: str) -> None:
    assert license_expression(alpine) == spdx


@pytest.mark.parametrize("seed", ["", "0" * 64, "e171c91df27a28ddcfce76f3cd978c7a5d58238fa26318928d27c367bc7d20c7"])
def test_the_filesystem_uuid_is_the_version_4_uuid_of_the_stream_digest(seed: str) -> None:
    """Written by hand (the uuid module costs every build's start 3 ms): the same UUIDs as
    uuid.UUID(bytes=..., version=4), so images keep their bytes."""
    import uuid

    from scripts.formats.ext4 import derived_uuid

    for purpose in ("uuid", "hash_seed"):
        digest = hashlib.sha256(f"{purpose}:{seed}".encode()).digest()[:16]
        assert derived_uuid(seed, purpose) == str(uuid.UUID(bytes=digest, version=4))


def test_what_is_wrong_with_os_release_is_said_as_it_is(tree: Tree) -> None:
    from scripts.rootfs.stream import os_release_problem

    assert "add alpine-release to alpine.base" in (os_release_problem(tree, set()) or "")
    assert "ships no /etc/os-release" in (os_release_problem(tree, {"alpine-release"}) or "")
    tree.put_generated("etc/os-release", "symlink", 0o777, linkname="../usr/lib/os-release")
    assert "links to ../usr/lib/os-release, which is not in the image" in (os_release_problem(tree, set()) or "")
    tree.put_generated("usr/lib/os-release", "file", 0o644, b"<html>not found</html>\n")
    assert "/usr/lib/os-release (from vulcan) has no ID= line" in (os_release_problem(tree, set()) or "")
    tree.put_generated("usr/lib/os-release", "file", 0o644, b'NAME="Alpine Linux"\nID=alpine\nVERSION_ID=3.19.1\n')
    assert os_release_problem(tree, set()) is None


def test_packages_come_out_of_the_decompressing_threads_in_order_and_an_error_stops_the_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the merge gets from ``Ahead``: each verified package with its data tar (in memory
    while the budget lasts, then in a scratch file), in the closure's order; the verifier's error
    (a package that fails its check; checking runs ahead of the merge) raised in the merge, with
    nothing left running and every byte of the budget back."""
    import threading
    import time
    from types import SimpleNamespace

    from scripts.apk.trust import TrustError
    from scripts.rootfs import inflate

    n = 40
    monkeypatch.setattr(inflate, "BUDGET", inflate._Budget(200_000))  # the first ones in memory, then files
    files = [package(tmp_path, f"p{i}", [(f"usr/share/p{i}", "file", bytes([i]) * (1000 * i))]) for i in range(n)]

    def verified(fail_at: int | None) -> Iterator[SimpleNamespace]:
        for i, f in enumerate(files):
            if i == fail_at:
                while inflate.BUDGET.left == 10 << 20:  # until one made ahead waits in memory
                    time.sleep(0.001)
                raise TrustError(f"p{i}: data hash mismatch")
            yield SimpleNamespace(path=f, data_offset=0)

    (tmp_path / "scratch").mkdir()
    with inflate.Ahead(verified(None), tmp_path / "scratch") as ahead:  # type: ignore[arg-type]
        got = [(v.path, data) for v, data in ahead]
    assert [path for path, _ in got] == files
    for i, (_, data) in enumerate(got):
        tar = data.buf if data.buf is not None else data.path.read_bytes()  # type: ignore[union-attr]
        assert bytes([i]) * (1000 * i) in tar
    kept = [data.buf is not None for _, data in got]
    assert any(kept) and not all(kept)  # the budget ran out on the way
    for _, data in got:
        data.release()  # as the tree does when it is closed
    assert inflate.BUDGET.left == 200_000
    monkeypatch.setattr(inflate, "BUDGET", inflate._Budget(10 << 20))  # all in memory
    merged = []
    with pytest.raises(TrustError, match="p25: data hash mismatch"), \
            inflate.Ahead(verified(25), tmp_path / "scratch") as ahead:  # type: ignore[arg-type]  # fmt: skip
        for v, data in ahead:
            merged.append(v.path)
            data.release()
    assert merged == files[: len(merged)] and len(merged) < 25
    assert inflate.BUDGET.left == 10 << 20  # what was made ahead and never merged was given back too
    assert not [t for t in threading.enumerate() if t.daemon and t.is_alive() and "_run" in t.name]


def test_a_quick_handoff_of_the_gil_ends_with_the_last_build_that_asked_for_it() -> None:
    """`rootfs --all` merges in threads: the first merge to end must not give the others back
    Python's 5 ms switch interval, and the last must (the rest of the process runs on it)."""
    from scripts.background import quick_handoff

    before = sys.getswitchinterval()
    first, second = quick_handoff(), quick_handoff()
    first.__enter__()
    second.__enter__()
    assert sys.getswitchinterval() < before / 100
    first.__exit__(None, None, None)
    assert sys.getswitchinterval() < before / 100  # the other build still merges
    second.__exit__(None, None, None)
    assert sys.getswitchinterval() == before


def test_a_data_member_that_does_not_inflate_gives_its_budget_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A package whose data member is damaged after its check (the cache changed under the
    build) fails the merge with the inflater's error, and holds no memory afterwards."""
    from scripts.rootfs import inflate

    monkeypatch.setattr(inflate, "BUDGET", inflate._Budget(1 << 20))
    good = package(tmp_path, "p", [("usr/share/p", "file", bytes(range(256)) * 100)])
    raw = bytearray(good.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside the DEFLATE stream; the trailer still says its size
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(raw)
    with pytest.raises(Exception, match="(?i)error|invalid|incorrect|corrupt"):
        inflate.inflate(bad, 0, tmp_path / "bad.tar")
    assert inflate.BUDGET.left == 1 << 20
    data = inflate.inflate(good, 0, tmp_path / "good.tar")
    assert data.buf is not None and inflate.BUDGET.left < 1 << 20
    data.release()
    assert inflate.BUDGET.left == 1 << 20


@pytest.mark.parametrize("in_memory", [True, False], ids=["in-memory", "scratch-file"])
def test_a_package_only_tarfile_reads_is_merged_from_memory_or_its_scratch_file(
    tree: Tree, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_memory: bool
) -> None:
    """GNU long names are something pkgtar leaves to tarfile: the package is merged all the same,
    from its bytes in memory or from its scratch file."""
    from scripts.rootfs import inflate

    monkeypatch.setattr(inflate, "BUDGET", inflate._Budget(1 << 20 if in_memory else 0))
    long = "usr/share/" + "d" * 120 + "/file"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo(long)
        info.size, info.mode, info.mtime = 5, 0o644, 1_700_000_000
        tar.addfile(info, io.BytesIO(b"hello"))
    apk = tmp_path / "gnu.tar.gz"
    apk.write_bytes(gzip.compress(buf.getvalue(), mtime=0))
    data = inflate.inflate(apk, 0, tree.scratch / "gnu.tar")
    assert (data.buf is not None) == in_memory
    tree.add_package("gnu", data, set())
    assert tree.read(long) == b"hello"
    tree.close()


def test_why_a_step_runs_again_names_the_input_with_whole_short_values(tmp_path: Path) -> None:
    """A changed digest shows its first 12 hex digits, a string its text without cut quotes."""
    from scripts import stamps

    old, new = "4dee74e6" + "1" * 56, "825cc44c" + "2" * 56
    stamps.write(tmp_path / "stamp.json", {"source": {"sha256": old}, "url": "u" * 80}, tmp_path, [])
    why = stamps.outdated(tmp_path / "stamp.json", {"source": {"sha256": new}, "url": "u" * 80}, tmp_path)
    assert why == "input source.sha256 changed: 4dee74e61111… -> 825cc44c2222…"
    why = stamps.outdated(tmp_path / "stamp.json", {"source": {"sha256": old}, "url": "v" * 80}, tmp_path)
    assert why == f"input url changed: {'u' * 59}… -> {'v' * 59}…"
    why = stamps.outdated(tmp_path / "stamp.json", {"source": {"sha256": old}}, tmp_path)
    assert why == f"input url changed: {'u' * 59}… -> (none)"
