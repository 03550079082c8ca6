"""`nox -s update_pins` against a mirror imitating the GitHub API, the S3 listing, go.dev's
JSON and an Alpine branch: new releases appear, checksums disagree, the network fails."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support import imagerepo
from tests.support.apkrepo import KEY_NAME, Entry, Pkg, public_pem, publish
from tests.support.world import REPO, World, firecracker_tgz, sha256

WORKFLOW = REPO / ".github/workflows/images.yml"

BUCKET = "https://s3.amazonaws.com/spec.ccfc.min"
OLD_PREFIX = "20260930-a738f18a8db0-0"
NEW_PREFIX = "20261014-0c1d2e3f4a5b-0"


def _listing(objects: list[tuple[str, bytes, bool]]) -> bytes:
    items = "".join(
        f"<Contents><Key>{key}</Key><ETag>&quot;{hashlib.md5(data).hexdigest() if good else '0' * 32}&quot;</ETag>"
        f"<Size>{len(data)}</Size></Contents>"
        for key, data, good in objects
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        f"<Name>spec.ccfc.min</Name><Prefix>firecracker-ci/</Prefix><IsTruncated>false</IsTruncated>{items}"
        "</ListBucketResult>"
    ).encode()


@functools.lru_cache(maxsize=1)
def other_key_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture
def upstream(world: World) -> World:
    m = world.mirror
    # Firecracker: the pinned 1.17.0, a new 1.18.0, a prerelease and another major line
    releases = []
    for version, pre in (("1.17.0", False), ("1.18.0", False), ("1.19.0-rc1", True), ("2.0.0", False)):
        assets = []
        for arch in ("x86_64", "aarch64"):
            name = f"firecracker-v{version}-{arch}.tgz"
            url = f"https://github.com/firecracker-microvm/firecracker/releases/download/v{version}/{name}"
            tgz = firecracker_tgz(version, arch)
            m.add(url, tgz)
            m.add(url + ".sha256.txt", f"{sha256(tgz)}  {name}\n".encode())
            assets += [{"name": name, "browser_download_url": url},
                       {"name": name + ".sha256.txt", "browser_download_url": url + ".sha256.txt"}]  # fmt: skip
        releases.append({"tag_name": f"v{version}", "draft": False, "prerelease": pre, "assets": assets})
    m.add("https://api.github.com/repos/firecracker-microvm/firecracker/releases", json.dumps(releases).encode())
    # kernels: the pinned prefix, a newer one with both arches, a newest one with x86_64 only, a 6.6 line
    objects = []
    for prefix, version, arches in ((OLD_PREFIX, "6.1.186", ("x86_64", "aarch64")),
                                    (NEW_PREFIX, "6.1.190", ("x86_64", "aarch64")),
                                    ("20261021-aaaaaaaaaaaa-0", "6.1.191", ("x86_64",)),
                                    (NEW_PREFIX, "6.6.60", ("x86_64", "aarch64"))):  # fmt: skip
        for arch in arches:
            key = f"firecracker-ci/{prefix}/{arch}/vmlinux-{version}"
            data = f"kernel {version} {arch}".encode() * 100
            m.add(f"{BUCKET}/{key}", data)
            objects.append((key, data, True))
    world.kernel_objects = objects  # type: ignore[attr-defined]
    m.add(f"{BUCKET}/", _listing(objects))
    # Go: the pinned 1.26.9, a newer 1.26.10, an unstable 1.26.11rc1 and the 1.27 line
    go = []
    for version, stable in (("1.26.9", True), ("1.26.10", True), ("1.26.11rc1", False), ("1.27.0", True)):
        go.append({"version": f"go{version}", "stable": stable, "files": [
            {"filename": f"go{version}.linux-{ga}.tar.gz", "os": "linux", "arch": ga, "kind": "archive",
             "sha256": hashlib.sha256(f"go {version} {ga}".encode()).hexdigest()}
            for ga in ("amd64", "arm64")]})  # fmt: skip
    m.add("https://go.dev/dl/", json.dumps(go).encode())
    # Alpine: the branch's alpine-keys now also ships a new key
    new_pem = other_key_pem()
    m.add("https://alpinelinux.org/keys/vulcan-new-1.rsa.pub", new_pem)
    world.new_key_fp = hashlib.sha256(  # type: ignore[attr-defined]
        serialization.load_pem_public_key(new_pem).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    ).hexdigest()
    for arch in ("x86_64", "aarch64"):
        pkgs = imagerepo.packages(arch)
        keys_entries = [Entry(f"usr/share/apk/keys/{KEY_NAME}", public_pem()),
                        Entry("usr/share/apk/keys/vulcan-new-1.rsa.pub", new_pem)]  # fmt: skip
        for a in ("x86_64", "aarch64"):
            for n in (KEY_NAME, "vulcan-new-1.rsa.pub"):
                keys_entries.append(Entry(f"usr/share/apk/keys/{a}/{n}", kind="symlink", mode=0o777, target=f"../{n}"))
        pkgs["main"] = [p for p in pkgs["main"] if p.name != "alpine-keys"]
        pkgs["main"].append(Pkg("alpine-keys", "2.6-r0", arch, entries=keys_entries))
        publish(m, pkgs, arch)
    world.pins["alpine"] = imagerepo.alpine_pins(imagerepo.RUNTIMES, imagerepo.BASE, ["main", "community"])
    # the 6.1 line pinned, newer 6.1 builds in the bucket (the 6.18 line joins it in a test below)
    world.pins["kernel"]["version"] = "6.1.186"
    world.pins["kernel"]["url"] = f"{BUCKET}/firecracker-ci/{OLD_PREFIX}/{{arch}}/vmlinux-{{version}}"
    world.write_pins()
    # the workflow's actions: each one's pinned tag is its latest release (a test changes that)
    for repo, _sha, tag in re.findall(r"uses: ([\w.-]+/[\w.-]+)@([0-9a-f]{40}) # (v[\d.]+)", WORKFLOW.read_text()):
        m.add(f"https://api.github.com/repos/{repo}/releases/latest", json.dumps({"tag_name": tag}).encode())
    return world


def test_outdated_action_pins_are_reported_and_updated_by_sha(upstream: World) -> None:
    workflow = upstream.tmp / "images.yml"
    workflow.write_text(WORKFLOW.read_text())
    new_sha = "0123456789abcdef0123456789abcdef01234567"
    upstream.mirror.add("https://api.github.com/repos/actions/cache/releases/latest",
                        json.dumps({"tag_name": "v9.9.9"}).encode())  # fmt: skip
    upstream.mirror.add(
        "https://api.github.com/repos/actions/cache/commits/v9.9.9", json.dumps({"sha": new_sha}).encode()
    )
    check = upstream.run("update_pins", "--check", "--workflow", str(workflow))
    assert check.returncode == 1
    assert re.search(r"images.yml: actions/cache v[\d.]+ \([0-9a-f]{12}\) -> v9.9.9 \(0123456789ab\)", check.stdout)
    assert workflow.read_text() == WORKFLOW.read_text()  # --check changes nothing
    upstream.run("update_pins", "--workflow", str(workflow), "--no-lock", check=True)
    assert f"actions/cache@{new_sha} # v9.9.9" in workflow.read_text()
    assert workflow.read_text().count("actions/cache@") == WORKFLOW.read_text().count("actions/cache@")


def test_check_reports_the_diff_and_changes_nothing(upstream: World) -> None:
    before = upstream.pins_path.read_text()
    proc = upstream.run("update_pins", "--check")
    assert proc.returncode == 1, proc.stderr
    diff = proc.stdout
    for expected in ('+    "version": "1.18.0"', '+    "version": "6.1.190"', NEW_PREFIX, '+    "version": "1.26.10"',
                     "vulcan-new-1.rsa.pub"):  # fmt: skip
        assert expected in diff
    for never in ("2.0.0", "1.19.0-rc1", "6.6.60", "6.1.191", "1.27.0", "1.26.11rc1"):
        assert never not in diff
    assert upstream.pins_path.read_text() == before
    print("\n" + diff)


def test_update_writes_valid_pins_relocks_and_then_is_current(upstream: World) -> None:
    proc = upstream.run("update_pins", check=True)
    pins = json.loads(upstream.pins_path.read_text())
    assert pins["firecracker"]["version"] == "1.18.0"
    assert pins["firecracker"]["sha256"]["x86_64"] == sha256(firecracker_tgz("1.18.0", "x86_64"))
    assert pins["kernel"]["url"] == f"{BUCKET}/firecracker-ci/{NEW_PREFIX}/{{arch}}/vmlinux-{{version}}"
    assert pins["kernel"]["sha256"]["aarch64"] == sha256(b"kernel 6.1.190 aarch64" * 100)
    assert pins["go"]["version"] == "1.26.10"
    assert pins["alpine"]["keys"]["vulcan-new-1.rsa.pub"]["sha256"] == upstream.new_key_fp  # type: ignore[attr-defined]
    lock = json.loads((upstream.tmp / "alpine.lock.json").read_text())
    assert {"python/x86_64", "python/aarch64", "go/aarch64", "node/x86_64"} <= set(lock["entries"])
    assert "lock python/aarch64" in proc.stderr
    upstream.pins = pins  # (World.run writes its pins before each run)
    again = upstream.run("update_pins", "--check")
    assert again.returncode == 0 and "pins are current" in again.stderr, again.stdout


def test_asset_disagreeing_with_its_checksum_file_is_refused(upstream: World) -> None:
    before = upstream.pins_path.read_text()
    url = "https://github.com/firecracker-microvm/firecracker/releases/download/v1.18.0/firecracker-v1.18.0-aarch64.tgz"
    upstream.mirror.add(url, b"tampered release asset")
    proc = upstream.run("update_pins")
    assert proc.returncode == 6 and "disagrees with its .sha256.txt" in proc.stderr
    assert upstream.pins_path.read_text() == before


def test_kernel_not_matching_its_etag_is_refused(upstream: World) -> None:
    objects = [(k, d, "6.1.190/aarch64" not in k.replace("/vmlinux-", "/").replace(f"{NEW_PREFIX}/", "6.1.190/"))
               for k, d, _ in upstream.kernel_objects]  # type: ignore[attr-defined]  # fmt: skip
    upstream.mirror.add(f"{BUCKET}/", _listing(objects))
    before = upstream.pins_path.read_text()
    proc = upstream.run("update_pins")
    assert proc.returncode == 6 and "differs from the object's ETag" in proc.stderr
    assert upstream.pins_path.read_text() == before


@pytest.mark.parametrize("fault", ["404", "500"])
def test_network_errors_leave_the_pins_unchanged(upstream: World, fault: str) -> None:
    before = upstream.pins_path.read_text()
    upstream.mirror.fail(f"{BUCKET}/", *[fault] * 4)
    proc = upstream.run("update_pins")
    assert proc.returncode == 3 and "spec.ccfc.min" in proc.stderr and "Traceback" not in proc.stderr
    assert "could not tell whether the pins are current" in proc.stderr
    assert upstream.pins_path.read_text() == before
    if fault == "404":  # (500s are retried with back-off: seconds, once is enough)
        # a scheduled --check tells "could not look" (3) from "outdated" (1)
        upstream.mirror.fail(f"{BUCKET}/", *[fault] * 4)
        assert upstream.run("update_pins", "--check").returncode == 3
    assert not list(Path(upstream.pins_path.parent).glob(".pins.json.new"))


def test_the_newest_line_firecrackers_policy_supports_is_followed_and_6_1_stays_selectable(upstream: World) -> None:
    """The bucket gains 6.18.51 (Firecracker supports 6.18 guests from v1.16.1): update_pins moves
    the pin to that line; --kernel 6.1.190 still pins the older line."""
    objects = list(upstream.kernel_objects)  # type: ignore[attr-defined]
    for arch in ("x86_64", "aarch64"):
        key = f"firecracker-ci/{NEW_PREFIX}/{arch}/vmlinux-6.18.51"
        data = f"kernel 6.18.51 {arch}".encode() * 100
        upstream.mirror.add(f"{BUCKET}/{key}", data)
        objects.append((key, data, True))
    upstream.mirror.add(f"{BUCKET}/", _listing(objects))
    proc = upstream.run("update_pins", "--check")
    assert proc.returncode == 1 and '+    "version": "6.18.51"' in proc.stdout, proc.stdout + proc.stderr
    proc = upstream.run("update_pins", "--check", "--kernel", "6.1.190")
    assert '+    "version": "6.1.190"' in proc.stdout and "6.18.51" not in proc.stdout, proc.stdout + proc.stderr


def test_a_firecracker_before_6_18_support_keeps_the_6_1_line() -> None:
    from scripts.update_pins import kernel_lines

    assert kernel_lines("1.12.1") == [(6, 1)]
    assert kernel_lines("1.16.1") == [(6, 18), (6, 1)]
