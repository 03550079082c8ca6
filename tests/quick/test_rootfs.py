"""`nox -s rootfs_all` against a generated, signed Alpine-shaped mirror; images read with debugfs."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.arch import host_arch
from scripts.formats import ext4
from scripts.formats import ext4_read as debugfs
from scripts.rootfs import cache
from tests.support import imagerepo
from tests.support.apkrepo import CDN, Entry, Pkg, publish
from tests.support.toolchains import find_go
from tests.support.world import REPO, World, built_world

pytestmark = pytest.mark.skipif(shutil.which("mke2fs") is None, reason="e2fsprogs (mke2fs) is not installed")
TAR_OK = shutil.which("mke2fs") is not None and ext4.e2fsprogs_version() >= ext4.TAR_INPUT_VERSION


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, go_build_cache: Path, agent_bin: Path) -> Iterator[World]:
    """One world with all three images, shared by the inspection tests."""
    with built_world(tmp_path_factory.mktemp("built"), go_build_cache, agent_bin) as w:
        w.log = w.build.stderr  # type: ignore[attr-defined]
        yield w


def test_a_fresh_clone_without_a_lock_is_told_once_what_happens(built: World) -> None:
    """Three runtimes resolved on a first build without alpine.lock.json: one warning that says
    what it does and how to pin, not one per runtime; the lock is then written for all three."""
    assert built.log.count("alpine.lock.json does not exist (a fresh clone)") == 1, built.log  # type: ignore[attr-defined]
    assert "is missing: resolving" not in built.log  # type: ignore[attr-defined]
    entries = json.loads((built.pins_path.parent / "alpine.lock.json").read_text())["entries"]
    assert sorted(entries) == ["go/x86_64", "node/x86_64", "python/x86_64"]


def image(w: World, runtime: str = "python") -> Path:
    return w.out / "images" / f"{runtime}.ext4"


def test_rootfs_all_writes_three_clean_images_with_manifest_and_sbom(built: World) -> None:
    for rt in ("go", "node", "python"):
        img = image(built, rt)
        ext4.fsck(img)  # raises on any problem
        manifest = json.loads((built.out / "images" / f"{rt}.manifest.json").read_text())
        assert manifest["sha256"] == sha(img)
        assert manifest["reproducible"] == ("yes" if TAR_OK else "no")
        names = {p["name"] for p in manifest["packages"]}
        assert {"busybox", "musl", "alpine-baselayout", "alpine-baselayout-data"} <= names
        assert {"go": "go", "node": "nodejs", "python": "python3"}[rt] in names
        spdx = json.loads((built.out / "images" / f"{rt}.spdx.json").read_text())
        assert spdx["spdxVersion"] == "SPDX-2.3" and spdx["dataLicense"] == "CC0-1.0"
        sbom = {p["name"]: p for p in spdx["packages"]}
        for p in manifest["packages"]:
            entry = sbom[p["name"]]
            assert entry["versionInfo"] == p["version"]
            assert entry["licenseDeclared"] not in ("", None)
            assert entry["externalRefs"][0]["referenceLocator"].startswith(f"pkg:apk/alpine/{p['name']}@")
        assert sbom["ca-certificates-bundle"]["licenseDeclared"] == "MPL-2.0 AND MIT"
    # the base packages were fetched once for all three images
    assert built.mirror.count("busybox-1.37.0-r31.apk") == 1


def test_image_contents_seen_through_debugfs(built: World) -> None:
    img = image(built)
    paths = ["bin/busybox", "bin/sh", "sbin/init", "bin/ls", "usr/local/bin/vulcan-guest", "work", "etc/shadow",
             "tmp", "root", "dev/console", "usr/bin/python3", "usr/bin/python3.14", "usr/bin/python", "var/run",
             "etc/vulcan/check.json", "etc/inittab", "etc/vulcan/rc.init"]  # fmt: skip
    st = debugfs.stat_many(img, paths)
    assert st["bin/busybox"] and st["bin/busybox"].kind == "regular" and st["bin/busybox"].mode & 0o777 == 0o755
    assert st["bin/sh"] and (st["bin/sh"].kind, st["bin/sh"].target) == ("symlink", "/bin/busybox")
    assert st["sbin/init"] and st["sbin/init"].target == "/bin/busybox"  # busybox applet link
    assert st["bin/ls"] and st["bin/ls"].target == "/bin/busybox"
    agent = st["usr/local/bin/vulcan-guest"]
    assert agent and agent.mode & 0o777 == 0o755 and agent.uid == 0
    assert debugfs.cat(img, "usr/local/bin/vulcan-guest") == (built.out / "bin/vulcan-guest").read_bytes()
    work = st["work"]
    assert work and work.kind == "directory" and (work.uid, work.gid) == (1000, 1000)
    shadow = st["etc/shadow"]
    assert shadow and (shadow.uid, shadow.gid, shadow.mode & 0o777) == (0, 42, 0o640)
    assert st["tmp"] and st["tmp"].mode & 0o7777 == 0o1777
    assert st["root"] and st["root"].mode & 0o777 == 0o700
    assert st["dev/console"] and st["dev/console"].kind == "character special"
    assert st["usr/bin/python3"] and st["usr/bin/python3"].links == 2  # a hard link, kept as one
    assert st["usr/bin/python"] and st["usr/bin/python"].target == "python3"
    assert st["var/run"] and st["var/run"].target == "../run"
    assert json.loads(debugfs.cat(img, "etc/vulcan/check.json")) == ["python3", "--version"]
    assert b"::respawn:/usr/local/bin/vulcan-guest" in debugfs.cat(img, "etc/inittab")
    assert b"mount -t devtmpfs" in debugfs.cat(img, "etc/vulcan/rc.init")


def test_accounts_and_apk_database(built: World) -> None:
    img = image(built)
    group = debugfs.cat(img, "etc/group").decode()
    passwd = debugfs.cat(img, "etc/passwd").decode()
    assert "shadow:x:42:" in group and "sandbox:x:1000:" in group and "klogd:x:101:" in group
    assert "sandbox:x:1000:1000:Vulcan sandbox:/work:/bin/sh" in passwd
    assert "root:x:0:0:root:/root:/bin/sh" in passwd  # the package's lines are kept
    assert "sandbox:!:" in debugfs.cat(img, "etc/shadow").decode()
    db = debugfs.cat(img, "lib/apk/db/installed").decode()
    assert "P:python3\nV:3.14.7-r1" in db and "R:busybox" in db
    # sorted by name, as apk writes its world
    assert debugfs.cat(img, "etc/apk/world").decode().split() == sorted([*imagerepo.BASE, "python3~3.14"])
    assert debugfs.cat(img, "etc/apk/repositories").decode().split() == [f"{CDN}/v3.24/main", f"{CDN}/v3.24/community"]
    assert b"VERSION_ID=3.24.0" in debugfs.cat(img, "etc/os-release")


def test_manifest_records_every_install_script(built: World) -> None:
    manifest = json.loads((built.out / "images/python.manifest.json").read_text())
    scripts = {(s["package"], s["script"]): s["action"] for s in manifest["install_scripts"]}
    assert scripts[("alpine-baselayout", ".pre-install")] == "replicated"
    assert scripts[("alpine-baselayout", ".post-install")] == "replicated"
    assert scripts[("busybox", ".post-install")] == "replicated"
    if imagerepo.REAL_BUSYBOX.is_file():  # the real Alpine scripts, read from the real package
        assert scripts[("busybox", ".trigger")] == "replicated"
        assert scripts[("busybox", ".post-upgrade")] == "not needed"
    files = {p["name"]: p["files"] for p in manifest["packages"]}
    assert files["python3"]["usr/lib/python3.14/os.py"] == 1000


def test_second_run_rewrites_nothing_and_one_runtime_change_rebuilds_only_it(built: World) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in (built.out / "images").iterdir() if p.is_file()}
    n = len(built.mirror.requests)
    proc = built.run("rootfs", "--all", "--frozen", check=True)
    assert proc.stderr.count("up to date") == 3
    assert len(built.mirror.requests) == n
    assert {p.name: p.stat().st_mtime_ns for p in (built.out / "images").iterdir() if p.is_file()} == before
    built.pins["alpine"]["runtimes"]["node"]["check"] = ["node", "-v"]
    built.write_pins()
    proc = built.run("rootfs", "--all", check=True)
    assert f"rootfs node ({host_arch()}): input runtime.check changed" in proc.stderr
    after = {p.name: p.stat().st_mtime_ns for p in (built.out / "images").iterdir() if p.is_file()}
    assert after["node.ext4"] != before["node.ext4"]
    assert after["python.ext4"] == before["python.ext4"] and after["go.ext4"] == before["go.ext4"]


def test_an_up_to_date_nox_run_still_checks_every_setting(built: World) -> None:
    """The no-op fast path starts no step, but a bad value or a misspelt name is said all the same."""
    nox = shutil.which("nox") or pytest.skip("nox is not installed in this environment")

    def nox_rootfs_all(**env: str) -> subprocess.CompletedProcess[str]:
        built.write_pins()
        return subprocess.run(
            [nox, "--no-venv", "-s", "rootfs_all"], cwd=REPO, env=built.env(VULCAN_GO=find_go(), **env),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
        )  # fmt: skip

    assert nox_rootfs_all().returncode == 0  # up to date from here on
    typo = nox_rootfs_all(VULCAN_OUTT="/tmp/elsewhere")
    assert typo.returncode == 0 and "python -m scripts" not in typo.stdout, typo.stdout
    assert typo.stdout.count("VULCAN_OUTT is not a setting of this tool and is ignored; did you mean VULCAN_OUT?") == 1
    # steps that run (no fast path): the nox process said it, the steps it starts do not again
    typo = nox_rootfs_all(VULCAN_OUTT="/tmp/elsewhere", VULCAN_NO_FASTPATH="1")
    assert typo.returncode == 0 and "python -m scripts" in typo.stdout, typo.stdout
    assert typo.stdout.count("VULCAN_OUTT is not a setting of this tool") == 1, typo.stdout
    bad = nox_rootfs_all(VULCAN_MIRROR="ftp://x")
    assert bad.returncode != 0, bad.stdout
    assert "VULCAN_MIRROR='ftp://x': not an http:// or https:// URL" in bad.stdout


def test_noop_nox_run_starts_no_step_and_a_hand_edited_image_is_still_rebuilt(built: World) -> None:
    nox = shutil.which("nox") or pytest.skip("nox is not installed in this environment")

    def nox_rootfs_all() -> str:
        built.write_pins()
        proc = subprocess.run(
            [nox, "--no-venv", "-s", "rootfs_all"], cwd=REPO, env=built.env(VULCAN_GO=find_go()),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout
        return proc.stdout  # nox's lines and the steps' own, in order

    nox_rootfs_all()  # whatever earlier tests changed is rebuilt here
    files = [p for p in (built.out / "images").iterdir() if p.is_file()]
    before = {p.name: p.stat().st_mtime_ns for p in files}
    n = len(built.mirror.requests)
    out = nox_rootfs_all()
    assert "python -m scripts" not in out  # nox logs every command it starts: none
    for step in ("guest (", "rootfs go (", "rootfs node (", "rootfs python ("):
        assert out.count(f"vulcan: {step}") == 1 and f"{step}{host_arch()}): up to date" in out
    assert len(built.mirror.requests) == n
    assert {p.name: p.stat().st_mtime_ns for p in files} == before
    # the in-process check only ever skips what the step itself would skip
    with open(image(built), "r+b") as f:
        f.seek(4096)
        f.write(b"edited by hand")
    out = nox_rootfs_all()
    assert "nox > python -m scripts rootfs --all" in out  # one process builds whatever is out of date
    assert "images/python.ext4 was modified since it was built" in out
    assert f"rootfs go ({host_arch()}): up to date" in out and f"rootfs go ({host_arch()}): images/go" not in out
    assert out.count("python -m scripts") == 1
    assert sha(image(built)) == json.loads((built.out / "images/python.manifest.json").read_text())["sha256"]


@pytest.mark.skipif(not TAR_OK, reason="needs e2fsprogs >= 1.47.1 (tar input) for bit-identical images")
def test_two_builds_in_different_scratch_directories_are_bit_identical(built: World, tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) if not shm.is_dir() else shm
    out = tmp_path / "again"
    shutil.copytree(built.out / "bin", out / "bin")  # the same agent: the same input
    built.run(
        "rootfs", "--runtime", "python", check=True, VULCAN_OUT=str(out), VULCAN_SCRATCH=str(scratch),
        VULCAN_CACHE=str(tmp_path / "cache"),  # independent: nothing shared with the first build
    )  # fmt: skip
    assert sha(out / "images/python.ext4") == sha(image(built))


def _helpers_here() -> str | None:
    """Why mke2fs cannot get the helper of ext4_preload.py on this machine (None: it can)."""
    from scripts.formats import ext4_preload

    if os.uname().machine != "x86_64" or not ext4_preload._cpu_has_sse42():
        return "not x86-64 with SSE4.2"
    if shutil.which("cc") is None:
        return "no C compiler (cc)"
    return None


@pytest.mark.skipif(not TAR_OK, reason="needs e2fsprogs >= 1.47.1 (tar input) for bit-identical images")
@pytest.mark.skipif(_helpers_here() is not None, reason=f"{_helpers_here()}")
def test_mke2fs_with_its_helper_writes_the_image_plain_mke2fs_writes(built: World, tmp_path: Path) -> None:
    """The built images had mke2fs with ext4_crc32c.c (built into the tools directory, given as
    LD_PRELOAD); plain mke2fs, from the same cached stream, writes the same bytes, with the same
    holes, and each build's plain e2fsck found every checksum right."""
    tools = Path(built.env()["VULCAN_TOOLS"])  # the session's worlds share one build (else: the cache's tools/)
    assert list(tools.glob("ext2fs-crc32c-*.so")), "not used"
    images = {}
    for name, plain in (("helped", {}), ("plain", {"VULCAN_MKE2FS_CRC32C": "0"})):
        out = tmp_path / name  # both from the cached stream, written in RAM and copied out the same way
        shutil.copytree(built.out / "bin", out / "bin")
        built.run("rootfs", "--runtime", "python", check=True, VULCAN_OUT=str(out), **plain)
        images[name] = out / "images/python.ext4"
    assert sha(images["helped"]) == sha(images["plain"]) == sha(image(built))
    assert images["helped"].stat().st_blocks == images["plain"].stat().st_blocks  # the same holes
    ext4.fsck(image(built))


def test_staging_directory_fallback_gives_the_same_stream_and_a_correct_image(built: World, tmp_path: Path) -> None:
    out = tmp_path / "fallback"
    shutil.copytree(built.out / "bin", out / "bin")
    built.run(
        "rootfs", "--runtime", "python", check=True, VULCAN_OUT=str(out), VULCAN_MKE2FS_INPUT="dir",
        VULCAN_REASSEMBLE="1",  # the stream is assembled again, not taken from the cache
    )  # fmt: skip
    a = json.loads((built.out / "images/python.manifest.json").read_text())
    b = json.loads((out / "images/python.manifest.json").read_text())
    assert b["tar_sha256"] == a["tar_sha256"]
    assert (b["reproducible"], b["mke2fs_input"]) == ("no", "staging directory")
    img = out / "images/python.ext4"
    ext4.fsck(img)
    st = debugfs.stat_many(img, ["work", "etc/shadow", "bin/sh", "usr/bin/python3"])
    assert st["work"] and (st["work"].uid, st["work"].gid) == (1000, 1000)
    assert st["etc/shadow"] and (st["etc/shadow"].gid, st["etc/shadow"].mode & 0o777) == (42, 0o640)
    assert st["bin/sh"] and st["bin/sh"].target == "/bin/busybox"
    assert st["usr/bin/python3"] and st["usr/bin/python3"].links == 2


SYSTEM_PYTHON = "/usr/bin/python3"


def _system_python_ok() -> bool:
    if not os.path.exists(SYSTEM_PYTHON):
        return False
    code = "import requests, cryptography"
    return subprocess.run([SYSTEM_PYTHON, "-c", code], capture_output=True).returncode == 0


@pytest.mark.skipif(os.getuid() != 0, reason="already an ordinary user: every other test covers it")
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux) to drop to another user")
@pytest.mark.skipif(not _system_python_ok(), reason="needs Debian's python3 with python3-requests/-cryptography")
@pytest.mark.parametrize("how", ["tar", "dir"])
def test_ordinary_user_builds_an_image(built: World, tmp_path_factory: pytest.TempPathFactory, how: str) -> None:
    """As uid 65534 (no root, no sudo, no mount): the tar path directly, the fallback under fakeroot."""
    if how == "tar" and not TAR_OK:
        pytest.skip("needs e2fsprogs >= 1.47.1")
    if how == "dir" and shutil.which("fakeroot") is None:
        pytest.skip("needs fakeroot")
    place = Path(f"/tmp/vulcan-user-{os.getpid()}-{how}")
    shutil.rmtree(place, ignore_errors=True)
    shutil.copytree(built.out / "bin", place / "out/bin")
    pins = json.loads(built.pins_path.read_text())
    formats = ["ext4", "squashfs"] if shutil.which("tar2sqfs") else ["ext4"]
    pins["alpine"]["formats"] = formats  # both formats, as an ordinary user
    (place / "pins.json").write_text(json.dumps(pins))
    shutil.copy(built.tmp / "alpine.lock.json", place / "alpine.lock.json")
    # the tool from a copy the user can read: the checkout may sit where only root can enter
    shutil.copytree(REPO / "scripts", place / "src/scripts", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["chown", "-R", "65534:65534", str(place)], check=True)
    place.chmod(0o755)
    base = {k: v for k, v in built.env().items() if k not in ("VULCAN_GOCACHE", "VULCAN_TOOLS")}  # root's
    env = {**base, "VULCAN_OUT": str(place / "out"), "VULCAN_CACHE": str(place / "cache"),
           "VULCAN_PINS": str(place / "pins.json"), "VULCAN_MKE2FS_INPUT": how, "HOME": str(place),
           "PYTHONPATH": str(place / "src")}  # fmt: skip
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", SYSTEM_PYTHON, "-m", "scripts",
         "rootfs", "--runtime", "python", "--frozen"],
        cwd=place / "src", env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    try:
        assert proc.returncode == 0, proc.stderr
        img = place / "out/images/python.ext4"
        assert img.stat().st_uid == 65534
        if how == "tar" and _helpers_here() is None:  # the user built mke2fs's helper in their own cache
            assert [p.stat().st_uid for p in (place / "cache/tools").glob("*.so")] == [65534]
        for fmt in formats:
            assert (place / f"out/images/python.{fmt}").stat().st_uid == 65534
        ext4.fsck(img)
        st = debugfs.stat_many(img, ["work", "etc/shadow", "bin/busybox"])
        assert st["work"] and (st["work"].uid, st["work"].gid) == (1000, 1000)  # owners from the packages
        assert st["etc/shadow"] and st["etc/shadow"].gid == 42
        assert st["bin/busybox"] and st["bin/busybox"].uid == 0
    finally:
        shutil.rmtree(place, ignore_errors=True)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (Entry("../../etc/evil", b"x"), "contains '..'"),
        (Entry("/etc/evil", b"x"), "absolute path"),
        (Entry("usr/lib/x/../../../../tmp/evil", b"x"), "contains '..'"),
    ],
)
def test_malicious_package_paths_are_refused_and_no_image_is_written(world: World, entry: Entry, message: str) -> None:
    _malicious(world, [entry], message)


def test_symlink_escape_is_refused(world: World) -> None:
    _malicious(
        world,
        [Entry("usr/lib/out", kind="symlink", mode=0o777, target="../../../../.."), Entry("usr/lib/out/pwned", b"x")],
        "leads out of the root",
    )


def _malicious(world: World, entries: list[Entry], message: str) -> None:
    imagerepo.setup(world, runtimes={"evil": {"world": ["evil"], "check": ["true"], "binary": "/bin/busybox"}})
    pkgs = imagerepo.packages()
    pkgs["main"].append(Pkg("evil", "1.0-r0", entries=entries))
    publish(world.mirror, pkgs)
    world.use_agent()
    proc = world.run("rootfs", "--runtime", "evil")
    assert proc.returncode == 6, proc.stderr
    assert "package evil" in proc.stderr and message in proc.stderr
    assert "Traceback" not in proc.stderr
    images = world.out / "images"
    assert not [p for p in images.rglob("*") if p.is_file() and ".stamps" not in p.parts] if images.exists() else True
    assert not (world.tmp / "etc").exists()


def test_missing_agent_is_a_clear_error(world: World) -> None:
    imagerepo.setup(world)
    proc = world.run("rootfs", "--runtime", "python")
    assert proc.returncode == 1 and "vulcan-guest is missing" in proc.stderr and "nox -s guest" in proc.stderr


def test_file_conflict_between_packages_is_refused(world: World) -> None:
    imagerepo.setup(world, runtimes={"clash": {"world": ["clash"], "check": ["true"], "binary": "/bin/busybox"}})
    pkgs = imagerepo.packages()
    pkgs["main"].append(Pkg("clash", "1.0-r0", entries=[Entry("etc/hosts", b"mine\n")]))
    publish(world.mirror, pkgs)
    world.use_agent()
    proc = world.run("rootfs", "--runtime", "clash")
    assert (
        proc.returncode == 1 and "file conflict: etc/hosts is in both alpine-baselayout-data and clash" in proc.stderr
    )


def test_meta_packages_dummy_files_are_not_installed_as_apk_does(world: World) -> None:
    """Meta packages ship a .dummy (no files of their own): apk never installs a name that
    begins with ".", so two meta packages in one world are no file conflict."""
    rt = {"meta": {"world": ["meta-a", "meta-b"], "check": ["true"], "binary": "/bin/busybox"}}
    imagerepo.setup(world, runtimes=rt)
    pkgs = imagerepo.packages()
    for name in ("meta-a", "meta-b"):
        pkgs["main"].append(Pkg(name, "1.0-r0", entries=[Entry(".dummy", b""), Entry(f"etc/{name}", b"x\n")]))
    publish(world.mirror, pkgs)
    world.use_agent()
    proc = world.run("rootfs", "--runtime", "meta")
    assert proc.returncode == 0, proc.stderr
    img = world.out / "images" / "meta.ext4"
    st = debugfs.stat_many(img, [".dummy", "etc/meta-a", "etc/meta-b"])
    assert st[".dummy"] is None and st["etc/meta-a"] is not None and st["etc/meta-b"] is not None
    db = debugfs.cat(img, "lib/apk/db/installed").decode()
    assert "R:.dummy" not in db and "P:meta-a" in db


def test_many_small_files_in_many_directories_fit(world: World) -> None:
    """The size estimate counts a block per directory and per small file (a go-like tree)."""
    rt = {"many": {"world": ["many"], "check": ["true"], "binary": "/bin/busybox", "headroom_mib": 0}}
    imagerepo.setup(world, runtimes=rt)
    pkgs = imagerepo.packages()
    entries = [Entry(f"usr/lib/many/d{i}/f{j}", b"x" * (j + 1)) for i in range(1500) for j in range(2)]
    pkgs["main"].append(Pkg("many", "1.0-r0", entries=entries))
    publish(world.mirror, pkgs)
    world.use_agent()
    world.run("rootfs", "--runtime", "many", check=True)
    ext4.fsck(world.out / "images/many.ext4")


# Each would add to every warm rebuild's start (python -X importtime, on top of the rootfs
# step's own ~50 ms): requests 50 ms, securesystemslib 30, cryptography 22, concurrent.futures 12,
# zstandard 10, tarfile 8; the python-like warm rebuild's floor (mke2fs in RAM) is 200-240 ms.
# dataclasses: 13 ms to import (inspect, ast, dis, tokenize) and 0.5 ms per class made; the records
# a start makes are NamedTuples (0.08 ms) or plain classes: the step's imports went from 72 to 48 ms.
WARM_NEVER_IMPORTS = {"requests", "urllib3", "securesystemslib", "cryptography", "concurrent", "zstandard", "tarfile",
                      "dataclasses", "inspect"}  # fmt: skip
# An assembly from cached packages: its records (a verified package, the tree's nodes, the package
# tars' members) are not dataclasses either (~9 ms of an 83-package assembly's 0.4 s); nothing is
# downloaded, so no HTTP; a cached package is held to the lock's C: (no RSA signature to check).
ASSEMBLY_NEVER_IMPORTS = {"requests", "urllib3", "securesystemslib", "cryptography", "concurrent", "dataclasses",
                          "inspect"}  # fmt: skip


def _imported(proc: subprocess.CompletedProcess[str]) -> set[str]:
    """The top-level modules a run imported, from its PYTHONPROFILEIMPORTTIME listing."""
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in proc.stderr.splitlines()
                if line.startswith("import time:")}  # fmt: skip
    assert "scripts" in imported  # (the listing is there)
    return imported


def test_warm_rebuild_reuses_the_cached_stream_and_a_corrupt_one_is_reassembled(built: World, tmp_path: Path) -> None:
    out = tmp_path / "warm"
    shutil.copytree(built.out / "bin", out / "bin")
    proc = built.run("rootfs", "--runtime", "python", check=True, VULCAN_OUT=str(out), PYTHONPROFILEIMPORTTIME="1")
    assert "reusing its tar" in proc.stderr
    assert sha(out / "images/python.ext4") == sha(image(built))
    # what a warm rebuild never imports (each lazily, where it is used: docs/performance.md)
    assert _imported(proc) & WARM_NEVER_IMPORTS == set()
    for tar in (built.cache / "rootfs").rglob("*.tar"):
        tar.write_bytes(b"garbage")
    (out / "images/python.ext4").unlink()
    proc = built.run("rootfs", "--runtime", "python", check=True, VULCAN_OUT=str(out), PYTHONPROFILEIMPORTTIME="1")
    assert re.search(r"cached tar stream .* is corrupt \(.*\); assembling it again", proc.stderr)
    assert sha(out / "images/python.ext4") == sha(image(built))
    assert _imported(proc) & ASSEMBLY_NEVER_IMPORTS == set()


@pytest.mark.parametrize("field", ["file_blocks", "entries", "dirs", "content_bytes"])
def test_an_edited_stream_sidecar_is_not_trusted(built: World, tmp_path: Path, field: str) -> None:
    """The cached stream's sidecar shapes the image (size, inodes): an edit must not change the image."""
    out = tmp_path / "side"
    shutil.copytree(built.out / "bin", out / "bin")
    built.run("rootfs", "--runtime", "python", check=True, VULCAN_OUT=str(out))  # the cache has the stream now
    for side in (built.cache / "rootfs").rglob("*.json"):
        data = json.loads(side.read_text())
        data["shape"][field] += 5000
        data["binding"] = cache.binding(data)  # even an edit that binds the sidecar again: the tar says otherwise
        side.write_text(json.dumps(data))
    (out / "images/python.ext4").unlink()
    proc = built.run("rootfs", "--runtime", "python", check=True, VULCAN_OUT=str(out))
    assert re.search(rf"cached tar stream .* is corrupt \(the sidecar's shape .*{field}", proc.stderr)
    assert sha(out / "images/python.ext4") == sha(image(built))


@pytest.mark.parametrize("edit", ["files", "os_release", "busybox_links", "not json"])
def test_an_edited_or_unreadable_sidecar_is_assembled_again_and_repaired(
    built: World, tmp_path: Path, edit: str
) -> None:
    """What only the assembly knows (each package's files, os-release, busybox's links) is bound
    to the tar: an edit gives the same manifest as a clean build, never a false one, and the
    cache entry is written anew (the next build reuses it)."""
    out = tmp_path / "side"
    shutil.copytree(built.out / "bin", out / "bin")
    built.run("rootfs", "--runtime", "python", check=True, VULCAN_OUT=str(out))
    want = json.loads((out / "images/python.manifest.json").read_text())
    for side in (built.cache / "rootfs").rglob("*.json"):
        data = json.loads(side.read_text())
        if edit == "files":
            data["files"] = {pkg: {} for pkg in data["files"]}  # python3's files vanish from the manifest
        elif edit == "os_release":
            data["os_release"] = "Alpine Linux v0.1"
        elif edit == "busybox_links":
            data["busybox_links"] = 0
        side.write_text("{not json" if edit == "not json" else json.dumps(data))
    (out / "images/python.ext4").unlink()
    proc = built.run("rootfs", "--runtime", "python", check=True, VULCAN_OUT=str(out))
    assert re.search(r"a cached tar stream of .* is corrupt \(its sidecar (was changed|is unreadable)", proc.stderr)
    assert json.loads((out / "images/python.manifest.json").read_text()) == want
    assert sha(out / "images/python.ext4") == sha(image(built))
    (out / "images/python.ext4").unlink()
    proc = built.run("rootfs", "--runtime", "python", check=True, VULCAN_OUT=str(out))
    assert "reusing its tar" in proc.stderr and "corrupt" not in proc.stderr


def test_an_agent_change_splices_the_cached_stream_into_the_same_bytes_as_a_full_build(
    built: World, tmp_path: Path
) -> None:
    """Only the agent changed: the cached stream of the same packages gets the new agent entry
    instead of every package being merged again, and the image is bit-identical to one
    assembled from the packages."""
    src = tmp_path / "agent-src"
    shutil.copytree(REPO / "guest", src)
    (src / "change.go").write_text(
        'package main\n\nimport "os"\n\nvar change = "another agent"\n\n'
        "func init() {\n\tif len(os.Args) > 1000 {\n\t\tprintln(change)\n\t}\n}\n"
    )
    spliced, full = tmp_path / "spliced", tmp_path / "full"
    env = {"VULCAN_GUEST_SOURCE": str(src), "VULCAN_GO": find_go()}
    built.run("guest", check=True, VULCAN_OUT=str(spliced), **env)
    assert sha(spliced / "bin/vulcan-guest") != sha(built.out / "bin/vulcan-guest")
    shutil.copytree(spliced / "bin", full / "bin")
    proc = built.run("rootfs", "--runtime", "python", check=True, VULCAN_OUT=str(spliced))
    assert "only the agent changed since a cached build: replacing it" in proc.stderr, proc.stderr
    built.run("rootfs", "--runtime", "python", check=True, VULCAN_OUT=str(full), VULCAN_REASSEMBLE="1",
              VULCAN_CACHE=str(tmp_path / "cache"))  # fmt: skip
    a, b = (json.loads((d / "images/python.manifest.json").read_text()) for d in (spliced, full))
    assert a["tar_sha256"] == b["tar_sha256"] and a["sha256"] == b["sha256"]
    assert sha(spliced / "images/python.ext4") == sha(full / "images/python.ext4")
    assert (
        debugfs.cat(spliced / "images/python.ext4", "usr/local/bin/vulcan-guest")
        == (spliced / "bin/vulcan-guest").read_bytes()
    )


def test_all_runtimes_build_at_once_and_one_failure_leaves_the_others_published(built: World, tmp_path: Path) -> None:
    """`rootfs --all` (what `nox -s rootfs_all` runs) builds every out-of-date runtime at the
    same time; a runtime that fails is said as its own error, the others still land whole."""
    pins = copy.deepcopy(built.pins)
    pins["alpine"]["runtimes"]["python"]["binary"] = "/usr/bin/no-such-python"
    (tmp_path / "pins.json").write_text(json.dumps(pins))
    shutil.copy(built.pins_path.with_name("alpine.lock.json"), tmp_path / "alpine.lock.json")
    out = tmp_path / "out"
    shutil.copytree(built.out / "bin", out / "bin")
    proc = built.run("rootfs", "--all", VULCAN_OUT=str(out), VULCAN_PINS=str(tmp_path / "pins.json"),
                     VULCAN_TIMING="1")  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "vulcan: error: the runtime binary /usr/bin/no-such-python is not in the image" in proc.stderr
    for rt in ("go", "node"):
        assert sha(out / f"images/{rt}.ext4") == sha(image(built, rt))
        assert (out / f"images/{rt}.manifest.json").is_file()
        # each build counts its own phases, though they ran in one process at the same time
        assert re.search(rf"timing rootfs {rt} \({host_arch()}\): .*write ext4=", proc.stderr)
    assert not (out / "images/python.ext4").exists() and not (out / "images/python.manifest.json").exists()
    assert not [p for p in out.rglob("*") if p.name.startswith(".vulcan-") or p.name.endswith(".tmp")]
