"""A real Alpine image, end to end: the real, Alpine-signed v3.19.1 repository served as a v3.19
mirror; images of the base plus apk-tools and openssl as runtimes; verify runs the real binaries
through the real musl loader; QEMU boots one; and the real apk 2.14.0 accepts our database: it
lists exactly the lock, audits no package file as changed but the ones we edit on purpose, has
nothing to add for the world, and can add and remove a package without losing a record."""

from __future__ import annotations

import difflib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from scripts.arch import host_arch
from tests.support import realapk
from tests.support.realworld import BASE, RUNTIMES
from tests.support.world import SHARED, World

# What we write over package files on purpose: accounts (sandbox, shadow, klogd) and the init
EDITED = {"etc/passwd", "etc/group", "etc/shadow", "etc/inittab", "etc/hostname"}
TEST_KERNEL = SHARED / "kernel" / "vmlinux.xz"

pytestmark = pytest.mark.skipif(host_arch() != "x86_64", reason="the real repository in ../shared is x86_64")


def image_root(w: World, runtime: str, dest: Path) -> Path:
    """The image's files, copied out with debugfs (owners and modes kept: we are root)."""
    img = w.out / "images" / f"{runtime}.ext4"
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["debugfs", "-R", f"rdump / {dest}", str(img)], check=True, capture_output=True)
    return dest


def real_install(apk: realapk.Apk, root: Path, world: list[str], epoch: int | None = None) -> Path:
    """What real apk installs for ``world`` from the same repository (no scripts)."""
    (root / "etc/apk").mkdir(parents=True)
    (root / "etc/apk/repositories").write_text(f"{realapk.ISO}\n")
    proc = apk.run("--initdb", "--no-scripts", "add", *world, root=root, epoch=epoch)
    assert proc.returncode == 0, proc.stderr
    return root


def lock_of(w: World, runtime: str) -> list[str]:
    entry = json.loads((w.tmp / "alpine.lock.json").read_text())["entries"][f"{runtime}/x86_64"]
    return sorted(f"{p['name']}-{p['version']}" for p in entry["packages"])


def test_real_images_build_and_verify_runs_the_real_binaries(alpine: World) -> None:
    proc = alpine.run("verify", "--json")
    rows = json.loads(proc.stdout)["rows"]
    runs = {r["artifact"]: r for r in rows if r["check"] == "runtime runs"}
    assert runs["images/apk.ext4"]["result"] == "pass", runs
    assert "apk-tools 2.14.0" in runs["images/apk.ext4"]["detail"]
    assert runs["images/openssl.ext4"]["result"] == "pass" and "OpenSSL 3.1.4" in runs["images/openssl.ext4"]["detail"]
    failed = [r for r in rows if r["result"] == "FAIL" and r["artifact"].startswith("images/")]
    assert not failed, failed


def test_our_installed_database_is_what_real_apk_writes(alpine: World, tmp_path: Path) -> None:
    """Real apk installs the same world from the same repository (no scripts): every record,
    field for field, must equal ours (ours is the same text)."""
    apk: realapk.Apk = alpine.apk  # type: ignore[attr-defined]
    root = real_install(apk, tmp_path / "real", [*BASE, *RUNTIMES["apk"]["world"]])
    theirs = (root / "lib/apk/db/installed").read_text()
    mine = image_root(alpine, "apk", tmp_path / "img").joinpath("lib/apk/db/installed").read_text()
    split = lambda text: {r.split("\nP:", 1)[1].split("\n", 1)[0]: r for r in text.strip("\n").split("\n\n")}  # noqa: E731
    a, b = split(mine), split(theirs)
    assert sorted(a) == sorted(b)
    for name in b:
        diff = difflib.unified_diff(b[name].splitlines(), a[name].splitlines(), "real apk", "ours", lineterm="", n=1)
        assert a[name] == b[name], f"{name}:\n" + "\n".join(list(diff)[:40])
    assert mine == theirs


def test_real_apk_accepts_the_image_database(alpine: World, tmp_path: Path) -> None:
    apk: realapk.Apk = alpine.apk  # type: ignore[attr-defined]
    root = image_root(alpine, "apk", tmp_path / "img")
    (root / "etc/apk/repositories").write_text(f"{realapk.ISO}\n")  # the same repository, offline
    listed = apk.run("info", "-v", root=root)
    assert listed.returncode == 0, listed.stderr
    assert sorted(listed.stdout.split()) == lock_of(alpine, "apk")
    # apk audit on what real apk itself installs for the same world is the baseline (it, too,
    # reports etc/apk/world, arch, repositories and key links as added)
    real = real_install(apk, tmp_path / "real", [*BASE, *RUNTIMES["apk"]["world"]])
    baseline = set(apk.run("audit", root=real).stdout.splitlines())
    audit = set(apk.run("audit", root=root).stdout.splitlines())
    pinned = {f"A etc/apk/keys/{name}" for name in alpine.pins["alpine"]["keys"]}  # we install every pinned key
    ours = {f"U {p}" for p in EDITED} | {"D etc/vulcan/"} | pinned
    assert audit - baseline <= ours, sorted(audit - baseline)
    assert {line for line in audit if line.startswith("U ")} == {f"U {p}" for p in EDITED}, sorted(audit)
    world = (root / "etc/apk/world").read_text().split()
    nothing = apk.run("--simulate", "add", *world, root=root)
    assert nothing.returncode == 0 and "Installing" not in nothing.stdout, nothing.stdout + nothing.stderr


def test_real_apk_adds_and_removes_a_package_without_losing_a_record(alpine: World, tmp_path: Path) -> None:
    apk: realapk.Apk = alpine.apk  # type: ignore[attr-defined]
    root = image_root(alpine, "apk", tmp_path / "img")
    (root / "etc/apk/repositories").write_text(f"{realapk.ISO}\n")
    before = lock_of(alpine, "apk")
    added = apk.run("--no-scripts", "add", "scanelf", root=root)
    assert added.returncode == 0, added.stderr
    listed = apk.run("info", "-v", root=root).stdout.split()
    assert sorted(listed) == sorted([*before, "scanelf-1.3.7-r2"])
    files = apk.run("info", "-L", "libcrypto3", root=root).stdout
    assert "lib/libcrypto.so.3" in files and "usr/lib/engines-3" in files
    removed = apk.run("--no-scripts", "del", "scanelf", root=root)
    assert removed.returncode == 0, removed.stderr
    assert sorted(apk.run("info", "-v", root=root).stdout.split()) == before
    db = (root / "lib/apk/db/installed").read_text()
    assert len(re.findall(r"^P:", db, re.M)) == len(before)


def _tree(root: Path, modes: dict[str, tuple[int, int, int]] | None = None) -> dict[str, tuple[object, ...]]:
    """Every path under ``root``: kind, mode, owner, size, link target, content digest; ``modes``
    (from the image itself) overrides what a copy lost (debugfs rdump drops setuid and sticky)."""
    import hashlib
    import os
    import stat

    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            f = Path(dirpath) / name
            st = os.lstat(f)
            rel = str(f.relative_to(root))
            kind = stat.S_IFMT(st.st_mode)
            mode, uid, gid = (modes or {}).get(rel, (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid))
            target = os.readlink(f) if stat.S_ISLNK(st.st_mode) else ""
            digest = hashlib.sha256(_read_as_root_would(f, st)).hexdigest() if stat.S_ISREG(st.st_mode) else ""
            size = st.st_size if stat.S_ISREG(st.st_mode) else 0
            out[rel] = (kind, mode, uid, gid, size, target, digest)
    return out


def _read_as_root_would(f: Path, st: object) -> bytes:
    """A file's bytes even when its mode lets nobody read it: real apk run as an ordinary user
    installs busybox's bbsuid --x--x--x, owned by that user. Its owner may read it after a
    chmod, which is put back (the mode is compared as the tree has it)."""
    import os
    import stat

    try:
        return f.read_bytes()
    except PermissionError:
        mode = stat.S_IMODE(st.st_mode)  # type: ignore[attr-defined]
        os.chmod(f, mode | stat.S_IRUSR)
        try:
            return f.read_bytes()
        finally:
            os.chmod(f, mode)


def _image_modes(image: Path, copy: Path) -> dict[str, tuple[int, int, int]]:
    """Mode and owner of every path as the ext4 image holds them (debugfs ls -p, one process)."""
    import os

    dirs = [""] + [str(Path(d).relative_to(copy)) for d, _, _ in os.walk(copy) if Path(d) != copy]
    cmds = copy.parent / "ls.cmds"
    cmds.write_text("".join(f"ls -p /{d}\n" for d in dirs))
    out = subprocess.run(["debugfs", "-f", str(cmds), str(image)], capture_output=True, text=True, check=True).stdout
    modes: dict[str, tuple[int, int, int]] = {}
    current = ""
    for line in out.splitlines():
        if line.startswith("debugfs: ls -p /"):
            current = line.removeprefix("debugfs: ls -p /")
            continue
        parts = line.split("/")
        if len(parts) >= 7 and parts[5] not in (".", ".."):
            mode = int(parts[2], 8)
            modes[f"{current}/{parts[5]}".lstrip("/")] = (mode & 0o7777, int(parts[3]), int(parts[4]))
    return modes


# What the image has that real apk (--initdb --no-scripts add) does not, on purpose or because an
# install script would have made it; and what real apk has that the image does not. README:
# "Images against real apk, file for file" lists the same.
OURS_ON_PURPOSE = {
    "lost+found",  # mke2fs
    ".vulcan", ".vulcan/new", ".vulcan/ro", ".vulcan/rw",  # overlay-init's mount points
    "etc/vulcan", "etc/vulcan/check.json", "etc/vulcan/overlay-init", "etc/vulcan/rc.init", "etc/vulcan/runtime",
    "usr/local/bin/vulcan-guest", "work",  # the agent and the sandbox user's home
}  # fmt: skip
EDITED_ON_PURPOSE = EDITED | {"etc/apk/repositories"}  # the mirror we built from, not a local path
REAL_APK_ONLY = {
    # /dev: the guest mounts devtmpfs over it, which has these nodes
    "dev/console", "dev/null", "dev/random", "dev/urandom", "dev/zero",
}  # fmt: skip


def test_the_image_tree_is_what_real_apk_installs_file_for_file(alpine: World, tmp_path: Path) -> None:
    """The meta world (alpine-base and libc-utils: packages whose data is only apk's .dummy) with
    our engine and with real apk 2.14 from the same repository, compared path by path: kind,
    mode, owner, size, link target and content. Equal except the listed exceptions."""
    apk: realapk.Apk = alpine.apk  # type: ignore[attr-defined]
    world = [*BASE, *RUNTIMES["meta"]["world"]]
    epoch = json.loads((alpine.out / "images/meta.manifest.json").read_text())["source_date_epoch"]
    theirs = _tree(real_install(apk, tmp_path / "real", world, epoch))
    copy = image_root(alpine, "meta", tmp_path / "img")
    ours = _tree(copy, _image_modes(alpine.out / "images/meta.ext4", copy))
    links = {p for p, (kind, *_rest) in ours.items() if p not in theirs and kind == 0o120000
             and _rest[4] in ("/bin/busybox", "../../bin/busybox", "../bin/busybox", "busybox")}  # fmt: skip
    keys = {f"etc/apk/keys/{name}" for name in alpine.pins["alpine"]["keys"]}
    assert sorted(set(ours) - set(theirs) - OURS_ON_PURPOSE - links - keys) == []  # busybox --install's links
    assert sorted(set(theirs) - set(ours) - REAL_APK_ONLY) == []
    differ = {p: (theirs[p], ours[p]) for p in set(ours) & set(theirs) if ours[p] != theirs[p]}
    unexpected = sorted(set(differ) - EDITED_ON_PURPOSE)
    assert unexpected == [], {p: differ[p] for p in unexpected}


def test_a_file_nobody_may_read_is_compared_as_root_would_read_it() -> None:
    """As an ordinary user real apk installs bbsuid --x--x--x: the comparison reads it anyway
    (the PermissionError a non-root run of the suite hit), and leaves its mode as it was."""
    import inspect
    import os
    import subprocess
    import tempfile

    if os.geteuid() != 0 or shutil.which("setpriv") is None or not Path("/usr/bin/python3").exists():
        pytest.skip("needs root, setpriv and /usr/bin/python3, to be an ordinary user")
    home = Path(tempfile.mkdtemp(prefix="vulcan-user-"))  # pytest's own directory is root's alone
    os.chown(home, 65534, 65534)
    # the function's own source, run by the system's Python: the checkout and its virtualenv may
    # sit in a directory only root may enter (a CI clone under mktemp -d)
    code = ("from __future__ import annotations\nimport os, sys\nfrom pathlib import Path\n\n"
            + inspect.getsource(_read_as_root_would) + "\n"
            "f = Path(sys.argv[1]) / 'bbsuid'; f.write_bytes(b'ELF'); f.chmod(0o111)\n"
            "print(_read_as_root_would(f, os.lstat(f)).decode(), oct(f.stat().st_mode & 0o777))\n")  # fmt: skip
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    proc = subprocess.run([*nobody, "/usr/bin/python3", "-c", code, str(home)], capture_output=True, text=True,
                          cwd="/")  # fmt: skip
    shutil.rmtree(home)
    assert proc.stdout.split() == ["ELF", "0o111"], proc.stderr
