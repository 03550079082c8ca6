"""Templates from OCI images: layers applied as the image spec says, bad layers refused by their
digest, memory bounded, the Vulcan part added, pins and package rows read; what goes through the
real docker-registry (media types, indexes, the bad cases, the Debian image) is tests/system/."""

from __future__ import annotations

import copy
import hashlib
import json
import tarfile
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from scripts.errors import VulcanError
from scripts.rootfs.tree import UnsafePackage
from scripts.template import configure, source
from scripts.template.layers import LayerTree
from scripts.template.source import Layer, TemplateError
from tests.support import ociimages
from tests.support.ociimages import GZ, TAR, ZSTD, entry, layer_tar
from tests.support.world import BASE_PINS, sha256

# -- the layers, applied -----------------------------------------------------------------------------


def _apply(tmp: Path, *layers: bytes, media: str = TAR) -> LayerTree:
    tree = LayerTree(tmp)
    for i, tar in enumerate(layers):
        blob = tmp / f"blob-{i}"
        blob.write_bytes(ociimages.compress(tar, media))
        digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
        tree.add_layer(Layer(digest, blob.stat().st_size, media), blob, tmp)
    return tree


class Member:
    """A member of the written stream, with its bytes (``data``; None but for a regular file)."""

    def __init__(self, info: tarfile.TarInfo, data: bytes | None) -> None:
        self.info, self.data = info, data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.info, name)


def _stream(tree: LayerTree, tmp: Path) -> dict[str, Any]:
    out = tmp / "out.tar"
    with open(out, "wb") as f:
        tree.write_tar(f, ociimages.EPOCH)
    with tarfile.open(out) as t:
        return {m.name.rstrip("/"): Member(m, t.extractfile(m).read() if m.isreg() else None) for m in t}  # type: ignore[union-attr]


D, F, L, H = tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE


def test_whiteouts_and_opaque_directories_delete_only_what_the_layers_below_had(tmp_path: Path) -> None:
    lower = layer_tar([
        entry("etc", kind=D, mode=0o755), entry("etc/motd", b"hello\n"), entry("etc/keep", b"k"),
        entry("usr/share/doc", kind=D, mode=0o755), entry("usr/share/doc/a/copyright", b"a"),
        entry("usr/share/doc/b", b"b"), entry("var/cache/x", b"x"),
    ])  # fmt: skip
    upper = layer_tar([
        entry("etc/.wh.motd", b""), entry("usr/share/doc/.wh..wh..opq", b""),
        entry("usr/share/doc/c", b"new in this layer"), entry("var/.wh.cache", b""),
        entry("etc/.wh.never-was", b""),
    ])  # fmt: skip
    got = _stream(_apply(tmp_path, lower, upper), tmp_path)
    assert "etc/motd" not in got and got["etc/keep"].data == b"k"
    assert [n for n in got if n.startswith("usr/share/doc/")] == ["usr/share/doc/c"]
    assert "usr/share/doc" in got and "var" in got and not any(n.startswith("var/cache") for n in got)
    assert not any(".wh." in n for n in got)


def test_a_later_layer_replaces_files_and_directories_and_takes_a_directorys_metadata(tmp_path: Path) -> None:
    lower = layer_tar([entry("opt", kind=D, mode=0o755), entry("opt/tool", kind=D, mode=0o755),
                       entry("opt/tool/bin", b"old"), entry("srv", b"a file"),
                       entry("data", kind=D, mode=0o700)])  # fmt: skip
    upper = layer_tar([entry("opt/tool", b"now a file", mode=0o755), entry("srv", kind=D, mode=0o755),
                       entry("srv/index", b"i"), entry("data", kind=D, mode=0o750, uid=33, gid=33)])  # fmt: skip
    got = _stream(_apply(tmp_path, lower, upper), tmp_path)
    assert got["opt/tool"].isreg() and got["opt/tool"].data == b"now a file"
    assert "opt/tool/bin" not in got
    assert got["srv"].isdir() and got["srv/index"].data == b"i"
    assert (got["data"].mode, got["data"].uid, got["data"].gid) == (0o750, 33, 33)


def test_hard_links_reach_across_layers_and_keep_their_bytes_when_the_target_goes(tmp_path: Path) -> None:
    lower = layer_tar([entry("usr/bin/perl", b"PERL", mode=0o755), entry("usr/bin/tool", b"OLD", mode=0o755)])
    upper = layer_tar([
        entry("usr/bin/perl5.36", kind=H, link="usr/bin/perl"),  # a hard link to a file of the layer below
        entry("usr/bin/tool2", kind=H, link="usr/bin/tool"),
        entry("usr/bin/tool3", kind=H, link="usr/bin/tool"),
    ])  # fmt: skip
    top = layer_tar([entry("usr/bin/.wh.tool", b"")])  # the target goes: its links keep its bytes
    got = _stream(_apply(tmp_path, lower, upper, top), tmp_path)
    assert got["usr/bin/perl"].data == b"PERL" and got["usr/bin/perl5.36"].islnk()
    assert got["usr/bin/perl5.36"].linkname == "usr/bin/perl"
    assert "usr/bin/tool" not in got and got["usr/bin/tool2"].data == b"OLD"
    assert got["usr/bin/tool3"].islnk() and got["usr/bin/tool3"].linkname == "usr/bin/tool2"


def test_devices_xattrs_owners_and_modes_come_from_the_layers(tmp_path: Path) -> None:
    layer = layer_tar([
        entry("dev/kmsg", kind=tarfile.CHRTYPE, mode=0o644, dev=(1, 11)),
        entry("usr/bin/ping", b"ELF", mode=0o4755, pax={"SCHILY.xattr.security.capability": "\x01\x00\x00\x02"}),
        entry("home/app", kind=D, mode=0o700, uid=1001, gid=1001),
    ])  # fmt: skip
    got = _stream(_apply(tmp_path, layer, media=GZ), tmp_path)
    assert got["dev/kmsg"].ischr() and (got["dev/kmsg"].devmajor, got["dev/kmsg"].devminor) == (1, 11)
    assert got["usr/bin/ping"].mode == 0o4755
    assert got["usr/bin/ping"].pax_headers["SCHILY.xattr.security.capability"] == "\x01\x00\x00\x02"
    assert (got["home/app"].uid, got["home/app"].gid, got["home/app"].mode) == (1001, 1001, 0o700)


@pytest.mark.parametrize(
    ("layers", "said"),
    [
        ([[entry("../etc/passwd", b"x")]], "contains '..'"),
        ([[entry("/etc/passwd", b"x")]], "absolute path"),
        ([[entry("etc/.wh...", b"")]], "whiteout 'etc/.wh...' names '..'"),
        ([[entry("etc/.wh.", b"")]], "names ''"),
        ([[entry("lib", kind=L, link="/usr/lib")], [entry("lib/x.so", b"x")]],
         "a symlink to the absolute path /usr/lib"),
        ([[entry("escape", kind=L, link="../../..")], [entry("escape/etc/cron.d/x", b"x")]], "leads out of the root"),
        ([[entry("x/.wh..wh..opq", b""), entry("x", kind=L, link="../..")]], None),  # opaque of nothing: fine
    ],
    ids=["dotdot", "absolute", "whiteout-dotdot", "whiteout-empty", "through-absolute-link", "through-escaping-link",
         "harmless"],
)  # fmt: skip
def test_a_layer_that_would_write_outside_the_root_is_refused_naming_its_digest(
    tmp_path: Path, layers: list[list[Any]], said: str | None
) -> None:
    tars = [layer_tar(entries) for entries in layers]
    if said is None:
        _apply(tmp_path, *tars)
        return
    with pytest.raises(UnsafePackage) as caught:
        _apply(tmp_path, *tars)
    bad = "sha256:" + hashlib.sha256(tars[-1]).hexdigest()
    assert caught.value.message.startswith(f"layer {bad}: ") and said in caught.value.message, caught.value.message
    assert caught.value.exit_code == 6 and caught.value.hint == "refusing the layer"


@pytest.mark.parametrize("media", [GZ, ZSTD, TAR])
def test_a_layer_whose_bytes_are_not_its_media_type_is_a_clear_error(tmp_path: Path, media: str) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(b"this is not a " + media.encode() + b" layer" * 100)
    x = Layer("sha256:" + sha256(blob.read_bytes()), blob.stat().st_size, media)
    with pytest.raises(TemplateError) as caught:
        LayerTree(tmp_path).add_layer(x, blob, tmp_path)
    assert caught.value.message.startswith(f"layer {x.digest}: ") and caught.value.exit_code == 4


def test_memory_stays_bounded_whatever_the_layer_size(tmp_path: Path) -> None:
    """A 256 MiB file in a gzip layer: decompressed as it streams, its bytes never held."""
    big = tmp_path / "big.tar"
    with tarfile.open(big, "w") as t:
        info = tarfile.TarInfo("var/big")
        info.size = 256 << 20
        with open("/dev/zero", "rb") as zero:
            t.addfile(info, zero)
    import gzip
    import shutil

    blob = tmp_path / "blob"
    with open(big, "rb") as src, gzip.open(blob, "wb", compresslevel=1) as out:
        shutil.copyfileobj(src, out, 1 << 20)
    big.unlink()
    x = Layer("sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest(), blob.stat().st_size, GZ)
    tracemalloc.start()
    try:
        tree = LayerTree(tmp_path)
        tree.add_layer(x, blob, tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert tree.nodes["var/big"].size == 256 << 20
    assert peak < 16 << 20, f"peak {peak >> 20} MiB of Python memory for a 256 MiB layer"
    tree.close()


# -- the Vulcan part ---------------------------------------------------------------------------------


def _base(tmp: Path, passwd: bytes, group: bytes) -> LayerTree:
    return _apply(tmp, layer_tar([
        entry("etc/passwd", passwd), entry("etc/group", group), entry("usr/bin/sh", b"ELF", mode=0o755),
        entry("bin", kind=L, link="usr/bin"), entry("sbin", kind=L, link="usr/sbin"), entry("usr/sbin", kind=D),
        entry("etc/shadow", b"root:*:19000:0:99999:7:::\n", mode=0o640, gid=42),
    ]))  # fmt: skip


def test_the_sandbox_user_is_added_through_a_merged_usr_and_the_agent_is_init(tmp_path: Path) -> None:
    tree = _base(tmp_path, b"root:x:0:0:root:/root:/bin/sh\n", b"root:x:0:\nshadow:x:42:\n")
    configure.vulcan(tree, ["python3", "--version"], "py", b"AGENT", {"Env": ["PATH=/opt/bin:/usr/bin", "A=b=c"],
                     "WorkingDir": "/srv"}, "r/x@sha256:" + "0" * 64)  # fmt: skip
    got = _stream(tree, tmp_path)
    assert got["etc/passwd"].data.decode().splitlines()[-1] == "sandbox:x:1000:1000:Vulcan sandbox:/work:/bin/sh"
    assert got["etc/group"].data.decode().splitlines()[-1] == "sandbox:x:1000:"
    shadow = got["etc/shadow"]
    assert shadow.data.decode().splitlines()[-1] == "sandbox:!::0:::::" and (shadow.mode, shadow.gid) == (0o640, 42)
    # sbin is the image's link to usr/sbin: init goes where the link leads, not over it
    assert got["sbin"].issym() and got["usr/sbin/init"].linkname == "/usr/local/bin/vulcan-guest"
    assert got["etc/vulcan/overlay-init"].linkname == "/usr/local/bin/vulcan-guest"
    assert got["usr/local/bin/vulcan-guest"].data == b"AGENT" and got["usr/local/bin/vulcan-guest"].mode == 0o755
    assert (got["work"].uid, got["work"].gid) == (1000, 1000)
    assert json.loads(got["etc/vulcan/env.json"].data) == {"env": {"PATH": "/opt/bin:/usr/bin", "A": "b=c"},
                                                           "cwd": "/srv"}  # fmt: skip


@pytest.mark.parametrize("taken", ["passwd", "group"])
def test_a_uid_or_gid_1000_of_another_name_is_refused_saying_which(tmp_path: Path, taken: str) -> None:
    passwd = b"root:x:0:0::/root:/bin/sh\n" + (b"node:x:1000:1000::/home/node:/bin/sh\n" if taken == "passwd" else b"")
    group = b"root:x:0:\n" + (b"node:x:1000:\n" if taken == "group" else b"")
    tree = _base(tmp_path, passwd, group)
    with pytest.raises(TemplateError) as caught:
        configure.vulcan(tree, ["sh"], "t", b"A", {}, "127.0.0.1:1/x:1")
    what = "uid" if taken == "passwd" else "gid"
    assert f"{what} 1000 is 'node' in the image's /etc/{taken}" in caught.value.message


def test_an_image_config_created_time_is_read_as_go_writes_it() -> None:
    assert source.created({"created": "2024-12-06T00:00:00Z"}) == 1733443200
    assert source.created({"created": "2024-12-06T00:00:00.123456789Z"}) == 1733443200
    assert source.created({"created": "2024-12-06T02:00:00+02:00"}) == 1733443200
    assert source.created({}) == 0 and source.created({"created": "yesterday"}) == 0


# -- what the pins and the image's database say -------------------------------------------------


def test_pins_with_an_image_are_checked_like_every_other_pin(tmp_path: Path) -> None:
    from scripts.errors import PinError
    from scripts.pins import load

    def pins(rt: dict[str, Any]) -> Path:
        p = copy.deepcopy(BASE_PINS)
        p["alpine"]["runtimes"] = {"t": {"check": ["x"], "binary": "/x", **rt}}
        path = tmp_path / "pins.json"
        path.write_text(json.dumps(p))
        return path

    assert load(pins({"image": {"reference": "docker.io/library/python:3.12-slim"}})).alpine.runtimes["t"].image
    for rt, said in [
        ({"image": {"reference": "python:3.12"}}, "is not REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST]"),
        ({"image": {"reference": "ghcr.io/a/b", "user": "x"}}, "unknown key; image takes reference"),
        ({"image": {"reference": "ghcr.io/a/b"}, "world": ["python3"]}, "either a world"),
        ({}, "alpine.runtimes.t.world: expected a non-empty list"),
    ]:
        with pytest.raises(PinError) as caught:
            load(pins(rt))
        assert said in caught.value.message, caught.value.message


def test_a_template_error_is_a_configuration_error() -> None:
    assert issubclass(TemplateError, VulcanError) and TemplateError("x").exit_code == 4


def test_the_package_rows_are_what_the_images_own_database_says(tmp_path: Path) -> None:
    """dpkg's status (only what is installed) and apk's installed database, each package's files
    from its own list, through the image's symlinks; files another layer deleted are not listed."""
    from scripts.template import ospackages

    status = (b"Package: libc6\nStatus: install ok installed\nArchitecture: amd64\nSource: glibc\n"
              b"Version: 2.36-9+deb12u14\nMaintainer: GNU Libc Maintainers <debian-glibc@lists.debian.org>\n"
              b"Description: GNU C Library\n continued\n\n"
              b"Package: gone\nStatus: deinstall ok config-files\nArchitecture: amd64\nVersion: 1\n")  # fmt: skip
    tree = _apply(tmp_path, layer_tar([
        entry("lib", kind=L, link="usr/lib"), entry("usr/lib/x86_64-linux-gnu/libc.so.6", b"ELF" * 10),
        entry("var/lib/dpkg/status", status),
        entry("var/lib/dpkg/info/libc6:amd64.list", b"/.\n/lib/x86_64-linux-gnu/libc.so.6\n/usr/share/doc/libc6/x\n"),
    ]))  # fmt: skip
    kind, rows = ospackages.installed(tree)
    assert kind == "dpkg" and [r["name"] for r in rows] == ["libc6"]
    assert rows[0]["version"] == "2.36-9+deb12u14" and rows[0]["origin"] == "glibc"
    assert rows[0]["files"] == {"usr/lib/x86_64-linux-gnu/libc.so.6": 30}  # through lib -> usr/lib; doc gone
    db = b"C:Q1abc=\nP:musl\nV:1.2.4_git20230717-r4\nA:x86_64\nL:MIT\no:musl\nF:lib\nR:ld-musl-x86_64.so.1\n\n"
    (tmp_path / "apk").mkdir()
    apk_tree = _apply(tmp_path / "apk", layer_tar([
        entry("lib/apk/db/installed", db), entry("lib/ld-musl-x86_64.so.1", b"ELF"),
    ]))  # fmt: skip
    kind, rows = ospackages.installed(apk_tree)
    assert kind == "apk" and rows[0]["name"] == "musl" and rows[0]["license"] == "MIT"
    assert rows[0]["files"] == {"lib/ld-musl-x86_64.so.1": 3}
