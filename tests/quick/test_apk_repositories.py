"""Extra repositories (#25): a team's signed repository over https, a tagged one (``name@tag``),
and a local directory signed by a developer key, each trusted only through its own pinned keys.

The first part runs the engine in-process against generated repositories (served upstream-shaped
on the test mirror, or written to a directory as abuild and ``apk index`` leave them). The second
builds a real image: the real Alpine v3.19.1 repository as main plus the three extra ones, and
the real apk 2.14.0 accepts it."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from scripts.apk import indexes, lockfile, packages
from scripts.apk.trust import TrustError
from scripts.errors import PinError
from scripts.pins import load
from tests.support import realapk
from tests.support.apkrepo import CDN, KEY_NAME, Entry, Pkg, alpine_pins, public_pem, publish
from tests.support.apkrepo import repository as repo_files
from tests.support.extrarepos import (
    ARCH,
    BASE,
    BRANCH,
    DEV,
    EDGE,
    EDGE_URL,
    TEAM,
    TEAM_URL,
    WORLD,
    dev_packages,
    edge_packages,
    extra_repositories,
    key_entry,
    serve_extra,
    team_packages,
    tree,
    write_local,
)
from tests.support.world import BASE_PINS, World

# -- in-process, generated repositories ------------------------------------------------------


def base_packages() -> list[Pkg]:
    return [
        Pkg("musl", "1.2.6-r0", entries=[Entry("lib/ld-musl-x86_64.so.1", b"musl" * 100, 0o755)]),
        Pkg("busybox", "1.37.0-r31", depends=["musl"], entries=[Entry("bin/busybox", b"bb" * 500, 0o755)]),
    ]


@pytest.fixture
def env(world: World, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    world.in_process(monkeypatch)
    world.pins["alpine"] = alpine_pins(
        {"tools": {"world": ["team-tool", "newthing@edge", "devpkg"], "check": ["true"], "binary": "/bin/busybox"}},
        ["busybox", "musl"],
        ["main"],
    )
    world.pins["alpine"]["extra_repositories"] = extra_repositories()
    publish(world.mirror, {"main": base_packages()})
    serve_extra(world.mirror, world.tmp)
    world.write_pins()
    indexes._index_memo.clear()
    packages._keyrings.clear()
    yield world
    indexes._index_memo.clear()
    packages._keyrings.clear()


def test_each_package_comes_from_the_repository_its_world_entry_asks_for(env: World) -> None:
    pins = load(env.pins_path)
    closure = lockfile.lock_runtime(pins, "tools", ARCH)
    got = {p.name: (p.version, p.repo, p.tag, p.key) for p in closure}
    assert got == {
        "musl": ("1.2.6-r0", "main", "", KEY_NAME),
        "busybox": ("1.37.0-r31", "main", "", KEY_NAME),
        "team-tool": ("1.0-r0", "acme", "", TEAM),  # not 9.0 from @edge: the name is untagged
        "newthing": ("2.0-r0", "acme-edge", "edge", EDGE),
        "edgelib": ("2.0-r0", "acme-edge", "edge", EDGE),  # its dependency, allowed there through newthing@edge
        "devpkg": ("0.1-r0", "local", "", DEV),
    }
    entry = json.loads((env.tmp / "alpine.lock.json").read_text())["entries"][f"tools/{ARCH}"]
    where = {p["name"]: p["repository"] for p in entry["packages"]}
    assert where["team-tool"] == TEAM_URL and where["newthing"] == EDGE_URL and where["devpkg"] == "local-repo"
    assert where["musl"] == f"{CDN}/v3.24/main"
    index = env.tmp / "local-repo" / ARCH / "APKINDEX.tar.gz"
    assert entry["local_indexes"] == {"local": hashlib.sha256(index.read_bytes()).hexdigest()}
    verified = packages.fetch_all(pins, closure, ARCH, "tools")
    assert [v.pkginfo["pkgname"][0] for v in verified] == [p.name for p in closure]


def test_an_index_signed_by_another_repositorys_key_is_refused(env: World) -> None:
    # the team's repository, its index signed by the edge repository's key (trusted there, not here)
    for name, data in repo_files(team_packages(), key=EDGE).items():
        env.mirror.add(f"{TEAM_URL}/{ARCH}/{name}", data)
    with pytest.raises(TrustError, match=rf"acme .*APKINDEX.tar.gz: signed by {re.escape(EDGE)}, which is not"):
        indexes.resolve(load(env.pins_path), "tools", ARCH)


def test_a_package_signed_by_another_repositorys_key_is_refused(env: World) -> None:
    # the index is the team's own, and vouches for the package's control checksum; the package
    # itself is signed by the developer's key, which the team's repository does not trust
    pkgs = [Pkg("team-tool", "1.0-r0", entries=tree("usr/bin/team-tool"), depends=["musl"], key=DEV)]
    apk, record = pkgs[0].build()
    from tests.support.apkrepo import index

    env.mirror.add(f"{TEAM_URL}/{ARCH}/APKINDEX.tar.gz", index([record], key=TEAM))
    env.mirror.add(f"{TEAM_URL}/{ARCH}/team-tool-1.0-r0.apk", apk)
    pins = load(env.pins_path)
    closure = lockfile.lock_runtime(pins, "tools", ARCH)
    team = [p for p in closure if p.name == "team-tool"]
    with pytest.raises(TrustError, match=rf"team-tool-1.0-r0.apk \(acme: .*signed by {re.escape(DEV)}, which is not"):
        packages.fetch_all(pins, team, ARCH, "tools")
    assert not list((env.cache / "apk").rglob("*team-tool*.apk")), "nothing of it was kept"


def test_frozen_refuses_a_local_repository_whose_index_changed(env: World) -> None:
    pins = load(env.pins_path)
    lockfile.lock_runtime(pins, "tools", ARCH)
    assert lockfile.ensure_locked(pins, "tools", ARCH, frozen=True)  # as locked: fine
    write_local(env.tmp / "local-repo", dev_packages("0.2-r0"))  # the developer rebuilt it
    with pytest.raises(lockfile.LockError, match=r"index of local repository local \(local-repo/x86_64\) changed"):
        lockfile.ensure_locked(pins, "tools", ARCH, frozen=True)
    relocked = lockfile.ensure_locked(pins, "tools", ARCH, frozen=False)  # without --frozen: re-locked
    assert {p.name: p.version for p in relocked}["devpkg"] == "0.2-r0"


# -- bad input: each a clear error naming the pins path, and nothing built ---------------------


def pins_with(tmp: Path, change: object) -> Path:
    raw = copy.deepcopy(BASE_PINS)
    raw["alpine"] = alpine_pins(
        {"tools": {"world": ["team-tool", "newthing@edge"], "check": ["true"], "binary": "/bin/busybox"}},
        ["busybox", "musl"],
        ["main"],
    )
    raw["alpine"]["extra_repositories"] = extra_repositories()
    (tmp / "local-repo").mkdir(exist_ok=True)
    (tmp / "keys").mkdir(exist_ok=True)
    (tmp / "keys" / DEV).write_bytes(public_pem(DEV))
    change(raw["alpine"])  # type: ignore[operator]
    path = tmp / "pins.json"
    path.write_text(json.dumps(raw))
    return path


BAD = {
    "ftp": (lambda a: a["extra_repositories"]["acme"].update(url="ftp://example.com/repo"),
            r"alpine.extra_repositories.acme.url: expected an https:// URL, got 'ftp://example.com/repo'"),
    "missing dir": (lambda a: a["extra_repositories"]["local"].update(path="no/such/dir"),
                    r"alpine.extra_repositories.local.path: 'no/such/dir' is not an existing directory"),
    "path as url": (lambda a: a["extra_repositories"]["acme"].update(url="/srv/repo"),
                    r"alpine.extra_repositories.acme.url: '/srv/repo' is neither an https:// URL nor a local"),
    "unknown tag": (lambda a: a["runtimes"]["tools"]["world"].append("python3@testing"),
                    r"alpine.runtimes.tools.world\[2\]: 'python3@testing': no repository of runtime tools is tagged "
                    r"@testing \(tags: @edge\)"),
    "two tags": (lambda a: a["extra_repositories"]["acme"].update(tag="edge"),
                 r"extra_repositories.acme-edge.tag: @edge is already the tag of alpine.extra_repositories.acme"),
    "no keys": (lambda a: a["extra_repositories"]["acme"].update(keys={}),
                r"alpine.extra_repositories.acme.keys: no trusted keys"),
    "same name": (lambda a: a["extra_repositories"].update(main={"url": TEAM_URL, "keys": {}}),
                  r"alpine.extra_repositories.main: a repository named 'main' is already alpine.repositories\[0\]"),
    "key clash": (lambda a: a["extra_repositories"]["acme"]["keys"].update({EDGE: key_entry(TEAM, TEAM_URL)}),
                  r"acme-edge.keys.acme-edge-61a0c0df.rsa.pub: another key of the same name is pinned at "
                  r"alpine.extra_repositories.acme.keys.acme-edge-61a0c0df.rsa.pub"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_repository_pin_is_a_clear_error(case: str, tmp_path: Path) -> None:
    change, message = BAD[case]
    with pytest.raises(PinError, match=message) as err:
        load(pins_with(tmp_path, change))
    assert err.value.message.startswith("pins.json: alpine.")


def test_a_local_repository_inside_images_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VULCAN_OUT", str(tmp_path))
    (tmp_path / "images" / "repo").mkdir(parents=True)
    with pytest.raises(PinError, match=r"local.path: 'images/repo' is, or leads, inside images/") as err:
        load(pins_with(tmp_path, lambda a: a["extra_repositories"]["local"].update(path="images/repo")))
    assert "keep local packages elsewhere" in (err.value.hint or "")
    (tmp_path / "repo").mkdir()  # a repository elsewhere whose architecture directory leads into images/
    (tmp_path / "repo/x86_64").symlink_to(tmp_path / "images/repo")
    with pytest.raises(PinError, match=r"local.path: 'repo' is, or leads, inside images/"):
        load(pins_with(tmp_path, lambda a: a["extra_repositories"]["local"].update(path="repo")))


def test_a_nul_in_a_local_path_and_a_huge_key_file_are_clear_errors(env: World, tmp_path: Path) -> None:
    with pytest.raises(PinError, match="holds a NUL character"):
        load(pins_with(tmp_path, lambda a: a["extra_repositories"]["local"].update(path="repo\0x")))
    with open(env.tmp / "keys" / DEV, "wb") as f:
        f.truncate(2 << 30)  # 2 GiB, sparse: never read whole
    proc = env.run("rootfs", "--runtime", "tools")
    assert proc.returncode == 6 and "is larger than 64 KiB" in proc.stderr and "Traceback" not in proc.stderr


def test_a_local_key_that_is_not_a_pem_public_key_is_refused(env: World) -> None:
    (env.tmp / "keys" / DEV).write_bytes(b"-----BEGIN RSA PRIVATE KEY-----\nnot this\n-----END RSA PRIVATE KEY-----\n")
    proc = env.run("rootfs", "--runtime", "tools")
    assert proc.returncode == 6
    assert f"alpine.extra_repositories.local.keys.{DEV}: " in proc.stderr and "is not a PEM public key" in proc.stderr
    assert "Traceback" not in proc.stderr and not (env.out / "images" / "tools.ext4").exists()


def test_a_key_url_that_serves_no_pem_key_names_its_pins_path(env: World) -> None:
    env.mirror.add(f"{TEAM_URL}/{TEAM}", b"<html>not found</html>")
    proc = env.run("lock")
    assert proc.returncode == 6
    assert f"check alpine.extra_repositories.acme.keys.{TEAM} in pins.json" in proc.stderr, proc.stderr
    assert not (env.tmp / "alpine.lock.json").exists()


# -- a real image: real Alpine main + the three extra repositories, accepted by real apk -------

EDITED = {"etc/passwd", "etc/group", "etc/shadow", "etc/inittab", "etc/hostname"}


def image_root(w: World, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    img = w.out / "images" / "tools.ext4"
    subprocess.run(["debugfs", "-R", f"rdump / {dest}", str(img)], check=True, capture_output=True)
    return dest


def offline_repositories(w: World, tmp: Path) -> tuple[list[str], Path]:
    """The image's four repositories for real apk, offline: the mirror's bytes as directories,
    the same tags, in the same order (and where the tagged one is)."""
    dirs = {}
    for name, pkgs, key in (("acme", team_packages(), TEAM), ("edge", edge_packages(), EDGE)):
        dirs[name] = tmp / name
        write_local(dirs[name], pkgs, key=key)
    return [str(realapk.ISO), str(dirs["acme"]), f"@edge {dirs['edge']}", str(w.tmp / "local-repo")], dirs["edge"]


def test_the_image_lists_exactly_its_repositories_and_keys(real: World, tmp_path: Path) -> None:
    root = image_root(real, tmp_path / "img")
    assert (root / "etc/apk/repositories").read_text().splitlines() == [
        f"{CDN}/{BRANCH}/main", TEAM_URL, f"@edge {EDGE_URL}", "local-repo",
    ]  # fmt: skip
    keys = {p.name for p in (root / "etc/apk/keys").iterdir()}
    assert {TEAM, EDGE, DEV} | set(real.pins["alpine"]["keys"]) <= keys  # (alpine-keys links Alpine's others)
    assert (root / f"etc/apk/keys/{TEAM}").read_bytes() == public_pem(TEAM)
    db = (root / "lib/apk/db/installed").read_text()
    records = {r.split("\nP:", 1)[1].split("\n", 1)[0]: r for r in db.strip("\n").split("\n\n")}
    assert "\ns:edge\n" in records["newthing"] + "\n" and "\ns:edge\n" in records["edgelib"] + "\n"
    assert "\ns:" not in records["team-tool"] and "\ns:" not in records["devpkg"]
    assert (root / "etc/apk/world").read_text().split() == sorted([*BASE, *WORLD], key=lambda d: d.split("@")[0])


def test_real_apk_accepts_an_image_built_from_extra_tagged_and_local_repositories(real: World, tmp_path: Path) -> None:
    apk: realapk.Apk = real.apk  # type: ignore[attr-defined]
    root = image_root(real, tmp_path / "img")
    lines, edge = offline_repositories(real, tmp_path)
    (root / "etc/apk/repositories").write_text("\n".join(lines) + "\n")
    keys = str(root / "etc/apk/keys")  # the image's own keys: real apk trusts what we installed
    listed = apk.run("info", "-v", root=root, keys=keys)
    assert listed.returncode == 0 and "WARNING" not in listed.stderr, listed.stderr
    entry = json.loads((real.tmp / "alpine.lock.json").read_text())["entries"]["tools/x86_64"]
    assert sorted(listed.stdout.split()) == sorted(f"{p['name']}-{p['version']}" for p in entry["packages"])
    audit = apk.run("audit", root=root, keys=keys).stdout.splitlines()
    assert {line for line in audit if line.startswith("U ")} == {f"U {p}" for p in EDITED}, audit
    assert not [line for line in audit if re.match(r"[MXe] ", line)], audit  # no package file or dir changed
    world = (root / "etc/apk/world").read_text().split()
    nothing = apk.run("--simulate", "add", *world, root=root, keys=keys)
    out = nothing.stdout + nothing.stderr
    assert nothing.returncode == 0 and "Installing" not in out and "Upgrading" not in out, out
    assert "WARNING" not in out and "untrusted" not in out.lower(), out
    policy = apk.run("policy", "newthing", root=root, keys=keys).stdout
    assert re.search(rf"2\.0-r0:\n(\s+.*\n)*\s+@edge {re.escape(str(edge))}", policy), policy
    assert "lib/apk/db/installed" in policy
    team = apk.run("policy", "team-tool", root=root, keys=keys).stdout
    assert re.search(r"1\.0-r0:\n\s+lib/apk/db/installed", team) and "9.0-r0" in team, team


def test_the_sbom_names_each_repositorys_supplier_and_location(real: World) -> None:
    doc = json.loads((real.out / "images" / "tools.spdx.json").read_text())
    by_name = {p["name"]: p for p in doc["packages"]}
    team = by_name["team-tool"]
    assert team["supplier"] == "Organization: Acme"
    assert team["downloadLocation"] == f"{TEAM_URL}/x86_64/team-tool-1.0-r0.apk"
    assert team["externalRefs"][0]["referenceLocator"].startswith("pkg:apk/acme/team-tool@1.0-r0?arch=x86_64")
    assert by_name["newthing"]["downloadLocation"] == f"{EDGE_URL}/x86_64/newthing-2.0-r0.apk"
    assert "tagged @edge" in by_name["newthing"]["sourceInfo"]
    dev = by_name["devpkg"]
    assert dev["downloadLocation"] == "NOASSERTION" and "local repository local (local-repo)" in dev["sourceInfo"]
    assert by_name["musl"]["supplier"] == "Organization: Alpine Linux"
    manifest = json.loads((real.out / "images" / "tools.manifest.json").read_text())
    rows = {p["name"]: p for p in manifest["packages"]}
    assert rows["devpkg"]["repository"] == "local-repo" and rows["devpkg"]["key"] == DEV
    assert rows["newthing"]["tag"] == "edge"


def test_verify_reads_the_image_built_from_extra_repositories(real: World) -> None:
    proc = real.run("verify", "--json")
    rows = [r for r in json.loads(proc.stdout)["rows"] if r["artifact"].startswith("images/tools")]
    assert rows and not [r for r in rows if r["result"] == "FAIL"], rows


def test_our_installed_database_is_what_real_apk_writes_for_tagged_and_extra_packages(
    real: World, tmp_path: Path
) -> None:
    """Real apk installs the same world (newthing@edge included) from the same four repositories,
    trusting the image's own keys: its installed database is ours, s:edge lines and all."""
    apk: realapk.Apk = real.apk  # type: ignore[attr-defined]
    mine = image_root(real, tmp_path / "img")
    lines, _ = offline_repositories(real, tmp_path)
    root = tmp_path / "real"
    (root / "etc/apk").mkdir(parents=True)
    (root / "etc/apk/repositories").write_text("\n".join(lines) + "\n")
    manifest = json.loads((real.out / "images" / "tools.manifest.json").read_text())
    proc = apk.run("--initdb", "--no-scripts", "add", *BASE, *WORLD, root=root, keys=str(mine / "etc/apk/keys"),
                   epoch=manifest["source_date_epoch"])  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    theirs = (root / "lib/apk/db/installed").read_text()
    ours = (mine / "lib/apk/db/installed").read_text()
    assert "\ns:edge\n" in theirs
    assert ours == theirs
