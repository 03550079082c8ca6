"""The trust model tried as an adversary would: a malicious registry (or a proxy on its path) in
front of the real docker-registry, and a second local user on the build machine (uid 65534).

Each test is a case that once gave way: it fails on the code before the fix. What is trusted
(the publisher's key, the user who builds, the pins and lock) is this test's; everything the
registry serves and everything another user could write is the adversary's."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scripts.registry import attest, oci
from scripts.registry.client import Registry, RegistryError
from scripts.registry.publish import Publisher
from tests.support.imagerepo import RUNTIMES
from tests.support.registry import Interposer, RunningRegistry, require_registry, running_registry
from tests.support.world import World, built_world

pytestmark = pytest.mark.skipif(shutil.which("tar2sqfs") is None, reason="squashfs-tools-ng is not installed")
REPO_NAME = "acme/vulcan-images"
NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--")


def _as_root_with_setpriv() -> str | None:
    if os.getuid() != 0:
        return "needs root, to be a second user with setpriv"
    if shutil.which("setpriv") is None:
        return "needs setpriv (util-linux) to be a second user"
    return None


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, go_build_cache: Path, agent_bin: Path) -> Iterator[World]:
    require_registry()
    with built_world(
        tmp_path_factory.mktemp("trust"),
        go_build_cache,
        agent_bin,
        runtimes={"python": RUNTIMES["python"]},
        formats=["ext4", "squashfs"],
        download=True,
    ) as w:
        yield w


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    d = tmp_path_factory.mktemp("keys")
    key = ed25519.Ed25519PrivateKey.generate()
    (d / "ours.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    (d / "ours.pub").write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return {"ours": d / "ours.pem", "ours.pub": d / "ours.pub"}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    with running_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="module")
def published(
    built: World, registry: RunningRegistry, keys: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("pub") / "published.json"
    proc = built.run(
        "publish",
        "--to",
        f"{registry.host}/{REPO_NAME}",
        "--key",
        str(keys["ours"]),
        "--digests",
        str(out),
        "--insecure",
    )
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(out.read_text())["published"])


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _pull(w: World, ref: str, dest: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return w.run("pull", ref, "--dest", str(dest), *args, **env)


def _client(registry: RunningRegistry) -> Registry:
    return Registry(registry.host, insecure=True)


def _manifest(reg: Registry, ref: str) -> dict[str, Any]:
    return dict(json.loads(reg.manifest(REPO_NAME, ref)[0]))


def _push_host_manifest(reg: Registry, like: str, firecracker: bytes, key: Path | None) -> str:
    """A host manifest like ``like`` but for its firecracker layer (and so its digest); signed
    with ``key`` as publish signs, or unsigned. Its digest."""
    blob = oci.Blob(
        oci.HOST_LAYER["firecracker"], oci.digest_of(firecracker), len(firecracker), firecracker, title="firecracker"
    )
    return _push_replacing(reg, like, blob, key)


def _push_replacing(reg: Registry, like: str, blob: oci.Blob, key: Path | None) -> str:
    """A manifest like ``like`` but for the layer titled as ``blob`` is; signed with ``key`` as
    publish signs, or unsigned. Its digest."""
    doc = _manifest(reg, like)
    reg.push_blob(REPO_NAME, blob)
    doc["layers"] = [blob.descriptor() if x["annotations"][oci.TITLE] == blob.title else x for x in doc["layers"]]
    body = oci.canonical(doc)
    reg.put_manifest(REPO_NAME, oci.digest_of(body), body, oci.MANIFEST)
    desc = {"mediaType": oci.MANIFEST, "digest": oci.digest_of(body), "size": len(body)}
    if key is not None:
        private = attest.load_private_key(key.read_bytes(), str(key))
        files = [{"name": x["annotations"][oci.TITLE], "digest": {"sha256": x["digest"][7:]}} for x in doc["layers"]]
        Publisher(reg, REPO_NAME, private, None).sign(desc, attest.provenance("test", desc["digest"], {}, [], files))
    return str(desc["digest"])


# -- a host keeps only what a trusted key vouched for ----------------------------------------------


@pytest.mark.parametrize("frame", ["without a checksum", "without its size", "with a wrong checksum", "naming another"])
def test_an_image_is_hashed_unless_its_frame_and_layer_vouch_for_it(
    built: World, registry: RunningRegistry, published: dict[str, Any], keys: dict[str, Path], tmp_path: Path,
    frame: str,
) -> None:  # fmt: skip
    """A pull takes an image's sha256 from its signed layer (what publish measured) without
    hashing it only when zstd checks what it decodes (a checksum and the size in the frame) and
    the layer's sha256 is the one manifest.json names; otherwise it hashes what it writes. Each
    image here is one byte off what its manifest.json names, signed by the trusted key."""
    import zstandard

    reg = _client(registry)
    like = published["python"]["manifests"]["x86_64"]
    layer = next(x for x in _manifest(reg, like)["layers"] if x["annotations"][oci.TITLE] == "python.ext4")
    named = json.loads((built.out / "images/python.manifest.json").read_text())["images"][0]["sha256"]
    assert layer["annotations"][oci.CONTENT] == f"sha256:{named}"  # publish says what it measured
    image = bytearray((built.out / "images/python.ext4").read_bytes())
    image[len(image) // 2] ^= 0x01
    content = layer["annotations"][oci.CONTENT]
    if frame == "without a checksum":
        data = zstandard.ZstdCompressor(write_checksum=False).compress(bytes(image))
    elif frame == "without its size":
        data = zstandard.ZstdCompressor(write_checksum=True, write_content_size=False).compress(bytes(image))
    elif frame == "with a wrong checksum":  # the very image, but the frame's checksum (its last 4 bytes) off by one bit
        raw = zstandard.ZstdCompressor(write_checksum=True).compress((built.out / "images/python.ext4").read_bytes())
        data = raw[:-1] + bytes([raw[-1] ^ 0x01])
    else:  # zstd checks it, but the layer names what it decompresses to, not what manifest.json names
        data = zstandard.ZstdCompressor(write_checksum=True).compress(bytes(image))
        content = "sha256:" + hashlib.sha256(image).hexdigest()
    blob = oci.Blob(layer["mediaType"], oci.digest_of(data), len(data), data, title="python.ext4", content=content)
    digest = _push_replacing(reg, like, blob, keys["ours"])
    dest = tmp_path / "host"
    proc = _pull(built, f"{registry.host}/{REPO_NAME}@{digest}", dest, "--trust", str(keys["ours.pub"]), "--insecure")
    want = {
        "with a wrong checksum": "python.ext4: the blob does not decompress as zstd",
        "naming another": f"python.ext4 is published as sha256 {hashlib.sha256(image).hexdigest()}",
    }.get(frame, f"python.ext4 arrived as sha256 {hashlib.sha256(image).hexdigest()}")
    assert proc.returncode == 6 and want in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (dest / "images").exists()


@pytest.mark.parametrize("second", ["unsigned", "signed"])
def test_a_verified_pull_is_not_up_to_date_over_files_another_pull_placed(
    built: World,
    registry: RunningRegistry,
    published: dict[str, Any],
    keys: dict[str, Path],
    tmp_path: Path,
    second: str,
) -> None:
    """Pull D verified, then another manifest E (whose firecracker is a script) into the same
    place, then D again: D's bytes are back, and verify agrees with what is there."""
    reg = _client(registry)
    host = published["host"]["manifests"]["x86_64"]
    d_ref = f"{registry.host}/{REPO_NAME}@{host}"
    script = b"#!/bin/sh\necho 'not firecracker'\n"
    e = _push_host_manifest(reg, host, script, keys["ours"] if second == "signed" else None)
    dest, trust = tmp_path / "host", ["--trust", str(keys["ours.pub"]), "--insecure"]
    assert _pull(built, d_ref, dest, *trust).returncode == 0
    e_args = trust if second == "signed" else ["--no-verify", "--insecure"]
    assert _pull(built, f"{registry.host}/{REPO_NAME}@{e}", dest, *e_args).returncode == 0
    assert (dest / "bin/firecracker").read_bytes() == script
    if second == "unsigned":  # what an unverified pull placed is not reported as verified
        rows = json.loads(built.run("verify", "--json", VULCAN_OUT=str(dest)).stdout)["rows"]
        row = next(r for r in rows if (r["artifact"], r["check"]) == ("bin/firecracker", "sha256 = stamp"))
        assert row["result"] == "FAIL" and "--no-verify" in row["detail"], row
    again = _pull(built, d_ref, dest, *trust)
    assert again.returncode == 0, again.stderr
    assert "up to date" not in again.stderr and "signed by" in again.stderr
    assert _sha(dest / "bin/firecracker") == _sha(built.out / "bin/firecracker")
    rows = json.loads(built.run("verify", "--json", VULCAN_OUT=str(dest)).stdout)["rows"]
    assert {r["result"] for r in rows if r["artifact"] == "bin/firecracker" and r["check"] == "sha256 = stamp"} == {
        "pass"
    }
    assert "up to date" in _pull(built, d_ref, dest, *trust).stderr  # and now it is


def test_a_verified_pull_places_only_the_sbom_its_signature_names(
    built: World,
    registry: RunningRegistry,
    published: dict[str, Any],
    keys: dict[str, Path],
    tmp_path: Path,
) -> None:
    """Anyone with push rights adds SBOM referrers first in the referrers index: one about another
    subject, one about this manifest but unsigned. Neither is placed; the signed one is."""
    reg = _client(registry)
    digest = published["python"]["manifests"]["x86_64"]
    tag = oci.referrers_tag(digest)
    index = _manifest(reg, tag)
    planted = []
    for subject in ("sha256:" + "0" * 64, digest):
        data = json.dumps({"spdxVersion": "SPDX-2.3", "name": f"planted for {subject[:12]}"}).encode()
        blob = oci.Blob(oci.SBOM, oci.digest_of(data), len(data), data, title="python.spdx.json")
        reg.push_blob(REPO_NAME, blob)
        body = oci.manifest(oci.SBOM, [blob], subject={"mediaType": oci.MANIFEST, "digest": subject, "size": 1})
        reg.put_manifest(REPO_NAME, oci.digest_of(body), body, oci.MANIFEST)
        planted.append(oci.descriptor_of(oci.MANIFEST, body, artifactType=oci.SBOM))
    try:
        reg.put_manifest(REPO_NAME, tag, oci.index(planted + index["manifests"]), oci.INDEX)
        dest = tmp_path / "host"
        proc = _pull(built, published["python"]["reference"], dest, "--trust", str(keys["ours.pub"]), "--insecure")
        assert proc.returncode == 0, proc.stderr
        assert _sha(dest / "images/python.spdx.json") == _sha(built.out / "images/python.spdx.json")
        assert "its subject is sha256:000" in proc.stderr and "which the signature does not name" in proc.stderr
    finally:
        reg.put_manifest(REPO_NAME, tag, oci.index(index["manifests"]), oci.INDEX)


# -- nothing is loaded from, or trusted in, a place another user can write --------------------------


_PLANT = r"""
#include <fcntl.h>
#include <unistd.h>
__attribute__((constructor)) static void planted(void) {
    int fd = open(MARKER, O_WRONLY | O_CREAT, 0644);
    if (fd >= 0) close(fd);
}
"""


def _plant(path: Path, marker: Path) -> None:
    src = path.with_name("plant.c")
    src.write_text(_PLANT)
    subprocess.run(["cc", "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(path), str(src)], check=True)
    src.unlink()


@pytest.mark.skipif(_as_root_with_setpriv() is not None, reason=f"{_as_root_with_setpriv()}")
@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler to make the planted library")
@pytest.mark.parametrize("where", ["another user's directory", "a path with a space"])
def test_mke2fs_never_loads_a_library_another_user_planted(built: World, tmp_path: Path, where: str) -> None:
    from scripts.formats import ext4_preload

    marker = tmp_path / "constructor-ran"
    place = Path(f"/tmp/vulcan-plant-{os.getpid()}")
    shutil.rmtree(place, ignore_errors=True)
    try:
        place.mkdir(mode=0o755)
        if where == "another user's directory":
            tools = place / "tools"
            tools.mkdir()
            digest = hashlib.sha256(ext4_preload.SOURCE.read_bytes()).hexdigest()[:24]
            _plant(tools / f"ext2fs-crc32c-{digest}.so", marker)  # the name the tool looks for
            subprocess.run(["chown", "-R", "65534:65534", str(tools)], check=True)
            said = "owned by uid 65534"
        else:
            tools = place / "sp ace"  # LD_PRELOAD="/tmp/.../sp ace/x.so" would load /tmp/.../sp
            _plant(place / "sp", marker)
            subprocess.run(["chown", "65534:65534", str(place / "sp")], check=True)
            said = "would split LD_PRELOAD"
        out = tmp_path / "out"
        shutil.copytree(built.out / "bin", out / "bin")
        proc = built.run("rootfs", "--runtime", "python", VULCAN_TOOLS=str(tools), VULCAN_OUT=str(out))
        assert proc.returncode == 0, proc.stderr
        assert not marker.exists(), "the planted library ran inside mke2fs"
        assert said in proc.stderr and "mke2fs runs without ext4_crc32c.c" in proc.stderr
        assert _sha(out / "images/python.ext4") == _sha(built.out / "images/python.ext4")  # plain mke2fs: same bytes
    finally:
        shutil.rmtree(place, ignore_errors=True)


@pytest.mark.parametrize("what", ["VULCAN_CACHE", "VULCAN_OUT", "VULCAN_GOCACHE"])
def test_a_directory_another_user_can_write_is_refused_with_a_hint(built: World, tmp_path: Path, what: str) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # what a careless `mkdir -m 777 /srv/cache` leaves
    out = tmp_path / "out"  # a new output: the step must run, and read what it is given
    env = {"VULCAN_OUT": str(out), what: str(shared / "x")}
    step = "guest" if what == "VULCAN_GOCACHE" else "rootfs"
    if step == "guest":
        from tests.support.toolchains import find_go

        env["VULCAN_GO"] = find_go()
    else:
        shutil.copytree(built.out / "bin", Path(env["VULCAN_OUT"]) / "bin")
    if what == "VULCAN_CACHE":
        shutil.copytree(built.cache, shared / "x")  # its streams: exactly what another user could edit
    args = ["--runtime", "python", "--frozen"] if step == "rootfs" else []
    proc = built.run(step, *args, **env)
    assert proc.returncode == 6 and "could be changed by another user" in proc.stderr, proc.stderr
    assert f"{shared} is writable by every user (mode 0777)" in proc.stderr and what in proc.stderr
    assert "Traceback" not in proc.stderr
    shared.chmod(0o1777)  # sticky, like /tmp: what is ours inside stays ours
    again = built.run(step, *args, **env)
    assert again.returncode == 0, again.stderr


def test_verify_finds_a_package_file_changed_in_the_cached_stream(built: World, tmp_path: Path) -> None:
    """The attack on a shared cache, done here by the test itself: the cached stream's
    usr/bin/python3 is replaced by a script of the same length, the sidecar re-bound; the
    rebuild takes it (the stream is only re-hashed), and verify must see it, whatever its size."""
    from scripts.rootfs import cache

    cache_dir, out = tmp_path / "cache", tmp_path / "out"
    shutil.copytree(built.cache, cache_dir)
    shutil.copytree(built.out / "bin", out / "bin")
    env = {"VULCAN_CACHE": str(cache_dir), "VULCAN_OUT": str(out)}
    tars = [t for t in (cache_dir / "rootfs").glob("??/*.tar")]
    assert tars, "no cached stream"
    for tar_path in tars:
        with tarfile.open(tar_path) as tar:
            member = tar.getmember("usr/bin/python3")
        evil = b"#!/bin/sh\necho 'PWNED! 3.14.0'\n#"
        evil += b"#" * (member.size - len(evil) - 1) + b"\n"
        with open(tar_path, "r+b") as f:
            f.seek(member.offset_data)
            f.write(evil)
        sidecar = tar_path.with_suffix(".json")
        side = json.loads(sidecar.read_text())
        side["sha256"] = _sha(tar_path)
        side["binding"] = cache.binding(side)
        sidecar.write_text(json.dumps(side))
    proc = built.run("rootfs", "--runtime", "python", **env)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(built.run("verify", "--json", **env).stdout)["rows"]
    for fmt in ("ext4", "squashfs"):
        row = next(
            r for r in rows if (r["artifact"], r["check"]) == (f"images/python.{fmt}", "package files = packages")
        )
        assert row["result"] == "FAIL" and "/usr/bin/python3" in row["detail"], row
    # and the honest images pass the same check
    rows = json.loads(built.run("verify", "--json").stdout)["rows"]
    assert {r["result"] for r in rows if r["check"] == "package files = packages"} == {"pass"}


# -- credentials go to the registry's own host only ------------------------------------------------


@contextlib.contextmanager
def _behind_a_proxy(workdir: Path, auth: str) -> Iterator[tuple[RunningRegistry, Interposer, Interposer]]:
    """A registry with credentials over TLS, the proxy (over TLS too) the client talks to, and a
    sniffer on "another host" that records whatever reaches it."""
    with running_registry(workdir, auth=auth, tls=True) as reg:
        sniffer, proxy = Interposer(None), Interposer(reg, ca=reg.ca)
        try:
            yield reg, proxy, sniffer
        finally:
            proxy.close()
            sniffer.close()


def _publish_with_credentials(
    built: World, keys: dict[str, Path], reg: RunningRegistry, proxy: Interposer
) -> subprocess.CompletedProcess[str]:
    from tests.support.registry import PASSWORD, USER

    assert reg.ca is not None
    return built.run(
        "publish",
        "--to",
        f"{proxy.host}/{REPO_NAME}",
        "--key",
        str(keys["ours"]),
        "--ca",
        str(reg.ca.cert),
        VULCAN_REGISTRY_USER=USER,
        VULCAN_REGISTRY_PASSWORD=PASSWORD,
    )


def test_an_upload_location_on_another_host_gets_no_credentials(
    built: World, keys: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    with _behind_a_proxy(tmp_path_factory.mktemp("creds"), "htpasswd") as (reg, proxy, sniffer):

        def elsewhere(seen: Any, headers: dict[str, str]) -> dict[str, str]:
            if seen.method == "POST" and "Location" in headers:
                path = headers["Location"].split("://", 1)[-1].split("/", 1)[1]
                headers["Location"] = f"{scheme}://{sniffer.host}/{path}"
            return headers

        proxy.rewrite = elsewhere
        for scheme in ("http", "https"):
            proc = _publish_with_credentials(built, keys, reg, proxy)
            assert proc.returncode == 3, proc.stderr
            if scheme == "http":
                assert "plain HTTP: refused" in proc.stderr
        assert proxy.authorized(), "the registry itself got the credentials"
        assert sniffer.authorized() == []


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_a_blob_redirected_to_another_host_is_fetched_there_without_credentials(
    tmp_path_factory: pytest.TempPathFactory, scheme: str
) -> None:
    from tests.support.registry import PASSWORD, USER

    with _behind_a_proxy(tmp_path_factory.mktemp("redirect"), "htpasswd") as (reg, proxy, sniffer):
        assert reg.ca is not None
        there = Interposer(None, ca=reg.ca) if scheme == "https" else sniffer
        try:
            client = Registry(proxy.host, credentials=(USER, PASSWORD), ca=reg.ca.cert)
            data = os.urandom(50_000)
            blob = oci.Blob("application/octet-stream", oci.digest_of(data), len(data), data=data, title="b")
            client.push_blob("acme/redirected", blob)
            # as registries send blob downloads to their storage: a redirect to a (signed) URL elsewhere
            proxy.answer = lambda seen: (307, {"Location": f"{scheme}://{there.host}/storage{seen.path}"}, [], 0.0) \
                if seen.method == "GET" and "/blobs/sha256:" in seen.path else None  # fmt: skip
            with pytest.raises(RegistryError):  # the other host serves nothing
                client.small_blob("acme/redirected", {"digest": blob.digest, "size": blob.size}, "the blob")
            assert [s.path for s in there.seen] == [f"/storage/v2/acme/redirected/blobs/{blob.digest}"]
            assert there.authorized() == []
            assert proxy.authorized(), "the registry itself got the credentials"
        finally:
            if there is not sniffer:
                there.close()


def test_a_token_service_over_plain_http_on_another_host_gets_no_credentials(
    built: World, keys: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    with _behind_a_proxy(tmp_path_factory.mktemp("realm"), "token") as (reg, proxy, sniffer):

        def realm_elsewhere(seen: Any, headers: dict[str, str]) -> dict[str, str]:
            for name in [k for k in headers if k.lower() == "www-authenticate"]:
                scheme, _, rest = headers.pop(name).partition(" ")
                params = [p for p in rest.split(",") if not p.startswith("realm=")]
                headers["WWW-Authenticate"] = f'{scheme} realm="http://{sniffer.host}/token",' + ",".join(params)
            return headers

        proxy.rewrite = realm_elsewhere
        proc = _publish_with_credentials(built, keys, reg, proxy)
        assert proc.returncode == 3 and "names a token service at http://" in proc.stderr, proc.stderr
        assert sniffer.seen == []


# -- bounded reads, deadlines, and a waiting pull that says whom it waits for ----------------------


@pytest.mark.parametrize("what", ["manifest", "manifest of no stated length", "signature"])
def test_a_huge_document_is_refused_before_it_is_read_whole(
    built: World,
    registry: RunningRegistry,
    published: dict[str, Any],
    keys: dict[str, Path],
    tmp_path: Path,
    what: str,
) -> None:
    proxy = Interposer(registry)
    flood = [b" " * (1 << 20)] * 256  # 256 MiB, never sent whole

    def answer(seen: Any) -> tuple[int, dict[str, str], list[bytes], float] | None:
        if what.startswith("manifest") and "/manifests/" in seen.path and seen.method == "GET":
            length = {"Content-Length": ""} if "no stated length" in what else {}
            return 200, {"Content-Type": oci.INDEX, **length}, [b"{", *flood], 0.0
        if what == "signature" and "/blobs/" in seen.path and seen.method == "GET" and signature_blob in seen.path:
            return 200, {"Content-Type": "application/octet-stream"}, flood, 0.0
        return None

    reg = _client(registry)
    att = next(
        r
        for r in reg.referrers_of(REPO_NAME, published["python"]["manifests"]["x86_64"])
        if r["artifactType"] == oci.ATTESTATION
    )
    signature_blob = _manifest(reg, att["digest"])["layers"][0]["digest"]
    proxy.answer = answer
    try:
        ref = published["python"]["reference"].replace(registry.host, proxy.host)
        proc = _pull(built, ref, tmp_path / "host", "--trust", str(keys["ours.pub"]), "--insecure")
        assert proc.returncode == (6 if what == "signature" else 3) and "Traceback" not in proc.stderr, proc.stderr
        assert "refused" in proc.stderr and "more than" in proc.stderr
        assert ("more than 4,194,304" in proc.stderr) == what.startswith("manifest")
        if what == "signature":  # no further than the size its descriptor declares
            assert f"signature {att['digest']}" in proc.stderr
    finally:
        proxy.close()


def test_a_trickling_registry_is_cut_off_at_the_deadline(
    built: World, registry: RunningRegistry, published: dict[str, Any], keys: dict[str, Path], tmp_path: Path
) -> None:
    proxy = Interposer(registry)
    proxy.answer = lambda seen: (
        (200, {"Content-Type": oci.INDEX}, [b"{"] * 1000, 0.5) if "/manifests/" in seen.path else None
    )
    try:
        ref = published["python"]["reference"].replace(registry.host, proxy.host)
        start = time.monotonic()
        proc = _pull(
            built, ref, tmp_path / "host", "--trust", str(keys["ours.pub"]), "--insecure", VULCAN_REGISTRY_DEADLINE="3"
        )
        took = time.monotonic() - start
        assert proc.returncode == 3 and "not done within the deadline of 3 s" in proc.stderr, proc.stderr
        assert "VULCAN_REGISTRY_DEADLINE" in proc.stderr
        assert took < 300  # a bound on a failure only: the trickle alone would take 500 s
    finally:
        proxy.close()


def test_a_pull_that_waits_for_another_says_which_process(
    built: World, published: dict[str, Any], keys: dict[str, Path], tmp_path: Path
) -> None:
    import fcntl

    dest = tmp_path / "host"
    dest.mkdir()
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # this test process plays the other pull
    proc = built.popen("pull", published["python"]["reference"], "--dest", str(dest), "--trust",
                       str(keys["ours.pub"]), "--insecure")  # fmt: skip
    assert proc.stderr is not None
    # a bound on a failure only: a pull that says nothing is not left waiting for ever
    release = threading.Timer(60, fcntl.flock, (fd, fcntl.LOCK_UN))
    release.start()
    line = proc.stderr.readline()
    release.cancel()
    os.close(fd)
    rest = proc.communicate(timeout=300)[1]
    assert f"a pull waits for process {os.getpid()}" in line and str(dest) in line, line + rest
    assert proc.returncode == 0, rest


# -- what a registry serves that no tool should place ----------------------------------------------


def _push(reg: Registry, doc: dict[str, Any]) -> str:
    body = oci.canonical(doc)
    reg.put_manifest(REPO_NAME, oci.digest_of(body), body, doc.get("mediaType", oci.MANIFEST))
    return oci.digest_of(body)


@pytest.mark.parametrize(
    "case",
    [
        "two layers, one title",
        "an index whose entry is an index",
        "an aarch64 manifest",
        "deeply nested JSON",
        "referrers that are not objects",
    ],
)
def test_what_a_registry_should_not_serve_is_a_clear_error_and_places_nothing(
    built: World,
    registry: RunningRegistry,
    published: dict[str, Any],
    keys: dict[str, Path],
    tmp_path: Path,
    case: str,
) -> None:
    reg = _client(registry)
    digest = published["python"]["manifests"]["x86_64"]
    doc = _manifest(reg, digest)
    host = registry.host
    flags = ["--no-verify", "--insecure"]
    proxy = None
    if case == "two layers, one title":
        doc["layers"] = doc["layers"] + [doc["layers"][0]]
        ref, want = f"{host}/{REPO_NAME}@{_push(reg, doc)}", "two layers are titled"
    elif case == "an index whose entry is an index":  # (no index can list its own digest)
        inner = _push(
            reg,
            json.loads(
                oci.index(
                    [{"mediaType": oci.MANIFEST, "digest": digest, "size": 1, "platform": oci.PLATFORM["x86_64"]}]
                )
            ),
        )
        outer = _push(
            reg,
            json.loads(
                oci.index([{"mediaType": oci.INDEX, "digest": inner, "size": 1, "platform": oci.PLATFORM["x86_64"]}])
            ),
        )
        ref, want = f"{host}/{REPO_NAME}@{outer}", "is an index, not an image manifest"
    elif case == "an aarch64 manifest":
        doc["annotations"]["vnd.vulcan.arch"] = "aarch64"
        ref, want = f"{host}/{REPO_NAME}@{_push(reg, doc)}", "is for aarch64, not x86_64"
    elif case == "deeply nested JSON":
        proxy = Interposer(registry)
        nested = b"[" * 100_000 + b"]" * 100_000
        proxy.answer = lambda seen: (
            (200, {"Content-Type": oci.MANIFEST}, [nested], 0.0) if "/manifests/" in seen.path else None
        )
        ref, want = f"{proxy.host}/{REPO_NAME}:deep", "is not JSON a registry would serve"
    else:
        proxy = Interposer(registry)
        junk = json.dumps({"schemaVersion": 2, "mediaType": oci.INDEX, "manifests": [1, "x", None]}).encode()
        proxy.answer = lambda seen: (
            (200, {"Content-Type": oci.MANIFEST}, [junk], 0.0) if "/manifests/sha256-" in seen.path else None
        )
        ref = published["python"]["reference"].replace(host, proxy.host)
        flags, want = ["--trust", str(keys["ours.pub"]), "--insecure"], "no signature is attached"
    try:
        dest = tmp_path / "host"
        proc = _pull(built, ref, dest, *flags)
        code = {"deeply nested JSON": 3, "referrers that are not objects": 6}.get(case, 4)  # docs/errors.md
        assert proc.returncode == code and want in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
        if case == "referrers that are not objects":
            assert "3 entries of a referrers list are not descriptors: ignored" in proc.stderr
        placed = [p.name for p in dest.rglob("*") if p.is_file()] if dest.exists() else []
        assert not [n for n in placed if n != "CACHEDIR.TAG"], placed
        assert not (dest / "images").exists() and not (dest / "bin").exists()
    finally:
        if proxy is not None:
            proxy.close()


def test_directories_a_pull_made_are_ours_to_clean(
    built: World, published: dict[str, Any], keys: dict[str, Path], tmp_path: Path
) -> None:
    dest = tmp_path / "host"
    assert (
        _pull(built, published["python"]["reference"], dest, "--trust", str(keys["ours.pub"]), "--insecure").returncode
        == 0
    )
    proc = built.run("clean", VULCAN_OUT=str(dest))
    assert proc.returncode == 0, proc.stderr
    assert not list((dest / "images").glob("python.*")) if (dest / "images").exists() else True


def test_a_publish_sweeps_what_a_killed_publish_left_while_compressing(
    built: World, registry: RunningRegistry, published: dict[str, Any], keys: dict[str, Path]
) -> None:
    blobs = built.cache / "oci/blobs"
    dead = blobs / ".zstd-killed.tmp"
    dead.write_bytes(b"half a compressed image")  # nobody holds its flock: its run died
    image = built.out / "images/python.ext4"
    os.utime(image)  # a new fingerprint: compressed again
    proc = built.run("publish", "--to", f"{registry.host}/{REPO_NAME}", "--key", str(keys["ours"]), "--insecure")
    assert proc.returncode == 0, proc.stderr
    assert not dead.exists() and not list(blobs.glob(".zstd-*.tmp"))
