"""Fetching, verifying and locking against a generated, signed Alpine-shaped repository."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from scripts.apk import indexes, lockfile, packages
from scripts.apk.lockfile import Locked
from scripts.apk.package import Verified
from scripts.apk.trust import TrustError
from scripts.errors import VulcanError
from scripts.pins import Pins, load
from tests.support.apkrepo import CDN, Entry, Pkg, alpine_pins, publish
from tests.support.mirror import Mirror
from tests.support.world import World

ARCH = "x86_64"


def base_packages(rev: str = "r0") -> list[Pkg]:
    return [
        Pkg("musl", f"1.2.6-{rev}", entries=[Entry("lib/ld-musl-x86_64.so.1", b"musl" * 100, 0o755)],
            provides=["so:libc.musl-x86_64.so.1=1"]),
        Pkg("busybox", "1.37.0-r31", depends=["so:libc.musl-x86_64.so.1"],
            entries=[Entry("bin/busybox", b"bb" * 500, 0o755)]),
        Pkg("libffi", "3.5-r0", provides=["so:libffi.so.8=8"], depends=["so:libc.musl-x86_64.so.1"]),
        Pkg("python3", "3.14.7-r1", depends=["so:libffi.so.8", "so:libc.musl-x86_64.so.1"]),
    ]  # fmt: skip


@pytest.fixture
def env(world: World, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    """In-process use of the engine, with the world's cache and mirror."""
    world.in_process(monkeypatch)
    world.pins["alpine"] = alpine_pins(
        {"python": {"world": ["python3~3.14"], "check": ["python3", "--version"], "binary": "/usr/bin/python3"}},
        ["busybox", "musl"],
        ["main", "community"],
    )
    publish(world.mirror, {"main": base_packages(), "community": []})
    world.write_pins()
    indexes._index_memo.clear()
    yield world
    indexes._index_memo.clear()


def packages_for(pins: Pins, runtime: str, arch: str, frozen: bool) -> tuple[list[Locked], list[Verified]]:
    """What a build does (rootfs/make.py ``_assemble``): the locked closure, then its verified
    files; after a locked package left the mirror, one re-lock (not with ``frozen``) and again."""
    closure = lockfile.ensure_locked(pins, runtime, arch, frozen)
    try:
        return closure, packages.fetch_all(pins, closure, arch, runtime)
    except packages.PackageGone as exc:
        closure = packages.relock(pins, runtime, arch, frozen, exc)
        return closure, packages.fetch_all(pins, closure, arch, runtime)


def requests_since(mirror: Mirror, n: int) -> list[str]:
    return [p for _, p, _ in mirror.requests[n:]]


def test_lock_records_the_exact_closure(env: World) -> None:
    proc = env.run("lock", "--arch", ARCH, check=True)
    assert "lock python/x86_64: 4 packages" in proc.stderr
    lock = json.loads((env.tmp / "alpine.lock.json").read_text())
    entry = lock["entries"]["python/x86_64"]
    assert [(p["name"], p["version"], p["repo"]) for p in entry["packages"]] == [
        ("musl", "1.2.6-r0", "main"),
        ("busybox", "1.37.0-r31", "main"),
        ("libffi", "3.5-r0", "main"),
        ("python3", "3.14.7-r1", "main"),
    ]
    assert all(p["checksum"].startswith("Q1") and p["size"] > 0 for p in entry["packages"])


def test_fetch_is_parallel_verified_cached_and_second_run_makes_no_requests(env: World) -> None:
    pins = load(env.pins_path)
    env.mirror.delay_s = 0.2
    closure, verified = packages_for(pins, "python", ARCH, frozen=False)
    assert [v.pkginfo["pkgname"][0] for v in verified] == [p.name for p in closure]
    assert env.mirror.max_inflight > 1  # fetched in parallel
    n = len(env.mirror.requests)
    indexes._index_memo.clear()
    closure2, _ = packages_for(load(env.pins_path), "python", ARCH, frozen=True)
    assert closure2 == closure
    assert requests_since(env.mirror, n) == []


def test_frozen_refuses_a_missing_or_stale_lock(env: World) -> None:
    pins = load(env.pins_path)
    with pytest.raises(lockfile.LockError, match="lock for python/x86_64 is missing.*--frozen"):
        packages_for(pins, "python", ARCH, frozen=True)
    packages_for(pins, "python", ARCH, frozen=False)  # writes the lock
    env.pins["alpine"]["runtimes"]["python"]["world"] = ["python3"]
    env.write_pins()
    with pytest.raises(lockfile.LockError, match="is stale"):
        packages_for(load(env.pins_path), "python", ARCH, frozen=True)


def test_package_gone_from_the_mirror_relocks_loudly_unless_frozen(
    env: World, capsys: pytest.CaptureFixture[str]
) -> None:
    pins = load(env.pins_path)
    packages_for(pins, "python", ARCH, frozen=False)
    # Alpine rebuilds musl: the old file disappears, the index names -r1
    env.mirror.remove(f"{CDN}/v3.24/main/{ARCH}/musl-1.2.6-r0.apk")
    publish(env.mirror, {"main": base_packages("r1"), "community": []})
    for d in (env.cache / "apk").iterdir():  # a fresh machine: nothing cached
        for f in d.iterdir():
            f.unlink()
    indexes._index_memo.clear()
    with pytest.raises(lockfile.LockError, match="musl-1.2.6-r0.apk is gone from the mirror"):
        packages_for(load(env.pins_path), "python", ARCH, frozen=True)
    closure, _ = packages_for(load(env.pins_path), "python", ARCH, frozen=False)
    assert ("musl", "1.2.6-r1") in [(p.name, p.version) for p in closure]
    assert "re-resolving python/x86_64 and updating the lock" in capsys.readouterr().err
    lock = json.loads((env.tmp / "alpine.lock.json").read_text())
    assert "1.2.6-r1" in json.dumps(lock)


def test_tampered_package_on_the_mirror_is_rejected_and_not_cached(env: World) -> None:
    pins = load(env.pins_path)
    closure = lockfile.ensure_locked(pins, "python", ARCH, frozen=False)
    url = f"{CDN}/v3.24/main/{ARCH}/busybox-1.37.0-r31.apk"
    path = next(k for k in env.mirror.files if k.endswith("busybox-1.37.0-r31.apk"))
    data = bytearray(env.mirror.files[path])
    data[-100] ^= 0xFF  # inside the data member
    env.mirror.add(url, bytes(data))
    with pytest.raises(TrustError) as info:
        packages.fetch_all(pins, closure, ARCH)
    assert "busybox-1.37.0-r31.apk" in str(info.value) and "main" in str(info.value)
    assert "control -> data" in str(info.value) or "corrupt" in str(info.value)
    assert not list((env.cache / "apk").rglob("*-busybox-*.apk"))
    assert list((env.cache / "apk").rglob("*-musl-*.apk"))  # the good ones were kept


def test_cached_package_tampered_later_is_fetched_again(env: World) -> None:
    pins = load(env.pins_path)
    closure, _ = packages_for(pins, "python", ARCH, frozen=False)
    cached = next((env.cache / "apk").rglob("*-python3-*.apk"))
    cached.write_bytes(cached.read_bytes()[:-10])
    n = env.mirror.count("python3-3.14.7-r1.apk")
    packages.fetch_all(pins, closure, ARCH)
    assert env.mirror.count("python3-3.14.7-r1.apk") == n + 1


def test_index_signed_by_another_key_is_refused(env: World) -> None:
    env.pins["alpine"]["keys"] = {
        "other.rsa.pub": {"url": "https://alpinelinux.org/keys/other.rsa.pub", "sha256": "0" * 64}
    }
    env.write_pins()
    env.mirror.add("https://alpinelinux.org/keys/other.rsa.pub", b"not a key")
    with pytest.raises(TrustError, match="not a PEM public key"):
        lockfile.ensure_locked(load(env.pins_path), "python", ARCH, frozen=False)


def test_unsatisfiable_world_names_the_chain(env: World) -> None:
    publish(env.mirror, {"main": [p for p in base_packages() if p.name != "libffi"], "community": []})
    with pytest.raises(VulcanError, match=r"python3-3.14.7-r1 -> so:libffi.so.8 -> no provider in main, community"):
        lockfile.ensure_locked(load(env.pins_path), "python", ARCH, frozen=False)


def test_cli_lock_with_unknown_runtime(env: World) -> None:
    proc = env.run("lock", "--runtime", "ruby", "--arch", ARCH)
    assert proc.returncode == 2 and "unknown runtime 'ruby'" in proc.stderr
