"""Publish and pull through a real registry (Debian's docker-registry, distribution 2.8), checked
by clients we did not write (skopeo, oras) and a DSSE verification done here from its spec with
cryptography (not with the product's code). The registry has no referrers API, so the referrers
tag schema is what it gets."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from scripts.registry.client import Reference, RegistryError
from tests.support.imagerepo import RUNTIMES
from tests.support.registry import (
    PASSWORD,
    PROXY_PASSWORD,
    PROXY_USER,
    USER,
    ReferrersProxy,
    RunningRegistry,
    require_registry,
    running_proxy,
    running_registry,
)
from tests.support.world import World, built_world

pytestmark = [
    pytest.mark.skipif(shutil.which("tar2sqfs") is None, reason="squashfs-tools-ng is not installed"),
]
REPO_NAME = "acme/vulcan-images"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, go_build_cache: Path, agent_bin: Path) -> Iterator[World]:
    require_registry()
    with built_world(tmp_path_factory.mktemp("reg"), go_build_cache, agent_bin, runtimes={"python": RUNTIMES["python"]},
                     formats=["ext4", "squashfs"], download=True) as w:  # fmt: skip
        yield w


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    d = tmp_path_factory.mktemp("keys")
    out = {}
    for name, key in (
        ("ours", ed25519.Ed25519PrivateKey.generate()),
        ("other", ec.generate_private_key(ec.SECP256R1())),
    ):
        (d / f"{name}.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))  # fmt: skip
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        (d / f"{name}.pub").write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, spki))
        out[name], out[f"{name}.pub"] = d / f"{name}.pem", d / f"{name}.pub"
    return out


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRegistry]:
    with running_registry(tmp_path_factory.mktemp("registry")) as reg:
        yield reg


@pytest.fixture(scope="module")
def published(built: World, registry: RunningRegistry, keys: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, Any]:  # fmt: skip
    out = tmp_path_factory.mktemp("pub") / "published.json"
    proc = built.run("publish", "--to", f"{registry.host}/{REPO_NAME}", "--key", str(keys["ours"]), "--digests",
                     str(out), *registry.flags())  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(out.read_text())
    doc["stdout"], doc["stderr"] = proc.stdout, proc.stderr
    return doc


def _get(registry: RunningRegistry, path: str, accept: str = "") -> requests.Response:
    r = requests.get(registry.base + path, headers={"Accept": accept} if accept else {}, timeout=30)
    r.raise_for_status()
    return r


def _manifest(registry: RunningRegistry, ref: str) -> dict[str, Any]:
    accept = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json"
    return dict(_get(registry, f"/v2/{REPO_NAME}/manifests/{ref}", accept).json())


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _pull(w: World, ref: str, dest: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return w.run("pull", ref, "--dest", str(dest), *args, **env)


def test_publish_pushes_an_index_per_runtime_and_a_host_artifact_with_our_media_types(
    registry: RunningRegistry, published: dict[str, Any]
) -> None:
    python, host = published["published"]["python"], published["published"]["host"]
    assert python["tag"].startswith("python-") and host["tag"].startswith("host-")
    index = _manifest(registry, python["digest"])
    assert index["mediaType"] == "application/vnd.oci.image.index.v1+json"
    assert index["artifactType"] == "application/vnd.vulcan.rootfs.v1"
    [entry] = index["manifests"]
    assert entry["platform"] == {"architecture": "amd64", "os": "linux"}
    m = _manifest(registry, entry["digest"])
    assert m["artifactType"] == "application/vnd.vulcan.rootfs.v1"
    assert m["config"]["mediaType"] == "application/vnd.oci.empty.v1+json" and m["config"]["size"] == 2
    layers = {layer["annotations"]["org.opencontainers.image.title"]: layer["mediaType"] for layer in m["layers"]}
    assert layers == {"python.ext4": "application/vnd.vulcan.rootfs.ext4.v1+zstd",
                      "python.squashfs": "application/vnd.vulcan.rootfs.squashfs.v1",
                      "python.manifest.json": "application/vnd.vulcan.rootfs.manifest.v1+json"}  # fmt: skip
    hm = _manifest(registry, _manifest(registry, host["digest"])["manifests"][0]["digest"])
    assert {x["annotations"]["org.opencontainers.image.title"] for x in hm["layers"]} == {
        "firecracker", "jailer", "vmlinux", "vulcan-guest"}  # fmt: skip
    assert _manifest(registry, python["tag"]) == index  # the tag names the same index
    assert python["reference"] in published["stdout"]


def test_the_sparse_ext4_image_travels_compressed(built: World, registry: RunningRegistry,
                                                  published: dict[str, Any]) -> None:  # fmt: skip
    m = _manifest(registry, published["published"]["python"]["manifests"]["x86_64"])
    ext4 = next(x for x in m["layers"] if x["annotations"]["org.opencontainers.image.title"] == "python.ext4")
    image = built.out / "images/python.ext4"
    allocated = os.stat(image).st_blocks * 512
    assert ext4["size"] < allocated < image.stat().st_size  # neither the holes nor the raw data
    assert published["uploaded_bytes"] <= 1.05 * published["payload_bytes"]


def test_pull_by_digest_verifies_places_sparse_and_verify_passes_as_on_built_files(
    built: World, registry: RunningRegistry, published: dict[str, Any], keys: dict[str, Path], tmp_path: Path
) -> None:
    dest = tmp_path / "host"
    for what in ("python", "host"):
        proc = _pull(built, published["published"][what]["reference"], dest, "--trust", str(keys["ours.pub"]),
                     *registry.flags())  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert "signed by" in proc.stderr and "not verified" not in proc.stderr
    for name in ("python.ext4", "python.squashfs", "python.manifest.json", "python.spdx.json"):
        assert _sha(dest / "images" / name) == _sha(built.out / "images" / name), name
    for name in ("firecracker", "jailer", "vmlinux", "vulcan-guest"):
        assert _sha(dest / "bin" / name) == _sha(built.out / "bin" / name), name
    assert os.access(dest / "bin/firecracker", os.X_OK)
    pulled, original = dest / "images/python.ext4", built.out / "images/python.ext4"
    assert os.stat(pulled).st_blocks <= os.stat(original).st_blocks * 1.02  # written back sparse
    rows = {}
    for where in (built.out, dest):
        proc = built.run("verify", "--json", VULCAN_OUT=str(where))
        rows[where] = {(r["artifact"], r["check"]): r["result"] for r in json.loads(proc.stdout)["rows"]}
    pulled_rows = {k: v for k, v in rows[dest].items() if k[1] != "pulled signed"}
    assert pulled_rows == rows[built.out]  # the same verdicts, check by check
    assert {k[0] for k, v in rows[dest].items() if k[1] == "pulled signed" and v == "pass"} == {
        "images/python.ext4", "images/python.squashfs"}  # and a signature vouched for each pulled image  # fmt: skip
    images = {k: v for k, v in rows[dest].items() if k[0].startswith("images/python.")}
    assert len(images) > 10 and set(images.values()) == {"pass"}, images
    # (this world's kernel is generated bytes, not an ELF: verify says so for both alike)


def test_a_second_publish_uploads_nothing_and_a_second_pull_asks_the_registry_nothing(
    built: World, keys: dict[str, Path], tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with running_registry(tmp_path_factory.mktemp("again")) as reg:
        target = f"{reg.host}/{REPO_NAME}"
        first = built.run("publish", "--to", target, "--key", str(keys["ours"]), "--digests", str(tmp_path / "1.json"),
                          *reg.flags())  # fmt: skip
        assert first.returncode == 0, first.stderr
        stored = sorted(
            (p.relative_to(reg.storage), p.stat().st_mtime_ns) for p in reg.storage.rglob("*") if p.is_file()
        )
        again = built.run("publish", "--to", target, "--key", str(keys["ours"]), "--digests", str(tmp_path / "2.json"),
                          *reg.flags())  # fmt: skip
        assert again.returncode == 0, again.stderr
        doc1, doc2 = json.loads((tmp_path / "1.json").read_text()), json.loads((tmp_path / "2.json").read_text())
        assert doc2["uploaded_bytes"] == 0 and doc2["published"] == doc1["published"]
        assert sorted((p.relative_to(reg.storage), p.stat().st_mtime_ns) for p in reg.storage.rglob("*")
                      if p.is_file()) == stored  # fmt: skip
        dest = tmp_path / "host"
        ref = doc1["published"]["python"]["reference"]
        assert _pull(built, ref, dest, "--trust", str(keys["ours.pub"]), *reg.flags()).returncode == 0
        files = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (dest / "images").iterdir() if p.is_file()}
    # the registry is gone: a second pull of the same digest must not need it
    proc = _pull(built, ref, dest, "--trust", str(keys["ours.pub"]), "--insecure")
    assert proc.returncode == 0 and "up to date" in proc.stderr, proc.stderr
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (dest / "images").iterdir()
            if p.is_file()} == files  # fmt: skip


def _pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding, from its spec (github.com/secure-systems-lab/dsse)."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def _referrers(registry: RunningRegistry, digest: str) -> list[dict[str, Any]]:
    return list(_manifest(registry, digest.replace(":", "-"))["manifests"])  # the referrers tag schema


def test_signature_and_provenance_verify_with_a_verifier_we_did_not_write(
    built: World, registry: RunningRegistry, published: dict[str, Any], keys: dict[str, Path]
) -> None:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    assert requests.get(f"{registry.base}/v2/{REPO_NAME}/referrers/sha256:{'0' * 64}", timeout=30).status_code == 404
    digest = published["published"]["python"]["manifests"]["x86_64"]
    kinds = {r["artifactType"]: r for r in _referrers(registry, digest)}
    assert set(kinds) == {"application/vnd.in-toto+json", "application/spdx+json"}
    att = _manifest(registry, kinds["application/vnd.in-toto+json"]["digest"])
    assert att["subject"]["digest"] == digest
    [layer] = att["layers"]
    assert layer["mediaType"] == "application/vnd.dsse.envelope.v1+json"
    envelope = _get(registry, f"/v2/{REPO_NAME}/blobs/{layer['digest']}").json()
    payload = base64.b64decode(envelope["payload"])
    public = load_pem_public_key(keys["ours.pub"].read_bytes())
    [sig] = envelope["signatures"]
    public.verify(base64.b64decode(sig["sig"]), _pae(envelope["payloadType"], payload))  # type: ignore[call-arg, union-attr]
    statement = json.loads(payload)
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["subject"][0]["digest"] == {"sha256": digest.removeprefix("sha256:")}
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    deps = {d["name"]: d for d in statement["predicate"]["buildDefinition"]["resolvedDependencies"]}
    packages = json.loads((built.out / "images/python.manifest.json").read_text())["packages"]
    for pkg in packages:
        sha1 = base64.b64decode(pkg["checksum"][2:]).hex()
        assert deps[pkg["name"]]["digest"] == {"sha1": sha1} and deps[pkg["name"]]["uri"] == pkg["download"]
    external = statement["predicate"]["buildDefinition"]["externalParameters"]
    assert external["pins"]["sha256"] == _sha(built.pins_path)
    sbom = _manifest(registry, kinds["application/spdx+json"]["digest"])
    blob = _get(registry, f"/v2/{REPO_NAME}/blobs/{sbom['layers'][0]['digest']}").content
    assert blob == (built.out / "images/python.spdx.json").read_bytes()
    # the in-toto library, too, reads the envelope and its statement
    from in_toto.models.metadata import Envelope as InTotoEnvelope

    assert InTotoEnvelope.from_dict(envelope).payload_type == "application/vnd.in-toto+json"


def test_skopeo_reads_what_we_publish(registry: RunningRegistry, published: dict[str, Any]) -> None:
    skopeo = shutil.which("skopeo") or pytest.skip("skopeo is not installed")
    ref = published["published"]["python"]["reference"]
    raw = subprocess.run([skopeo, "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"], capture_output=True,
                         check=True).stdout  # fmt: skip
    assert "sha256:" + hashlib.sha256(raw).hexdigest() == published["published"]["python"]["digest"]
    digest = json.loads(raw)["manifests"][0]["digest"]
    m = subprocess.run([skopeo, "inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/{REPO_NAME}@{digest}"],
                       capture_output=True, check=True).stdout  # fmt: skip
    assert json.loads(m)["artifactType"] == "application/vnd.vulcan.rootfs.v1"


def test_oras_pulls_what_we_publish_and_we_pull_what_oras_pushes(
    built: World, registry: RunningRegistry, published: dict[str, Any], tmp_path: Path
) -> None:
    oras = pytest.importorskip("oras.client")
    import zstandard

    client = oras.OrasClient(hostname=registry.host, insecure=True)
    digest = published["published"]["python"]["manifests"]["x86_64"]
    got = tmp_path / "oras"
    files = client.pull(target=f"{registry.host}/{REPO_NAME}@{digest}", outdir=str(got))
    by_name = {Path(f).name: Path(f) for f in files}
    assert _sha(by_name["python.squashfs"]) == _sha(built.out / "images/python.squashfs")
    with open(by_name["python.ext4"], "rb") as f:
        raw = zstandard.ZstdDecompressor().stream_reader(f).read()
    assert hashlib.sha256(raw).hexdigest() == _sha(built.out / "images/python.ext4")
    # oras pushes an artifact of our type (no signature: oras cannot make ours); we pull it unverified.
    # oras-py writes no artifactType: the config's media type names the artifact then (image-spec)
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(built.out / "images/python.squashfs", src / "python.squashfs")
    shutil.copy(built.out / "images/python.manifest.json", src / "python.manifest.json")
    (src / "config.json").write_text("{}")

    def push(tag: str, *files: str) -> None:
        """``src``'s files pushed by oras as a python runtime artifact (oras takes paths relative to the cwd)."""
        cwd = Path.cwd()
        os.chdir(src)
        try:
            client.push(
                target=f"{registry.host}/{REPO_NAME}:{tag}",
                files=list(files),
                manifest_annotations={"vnd.vulcan.runtime": "python"},
                manifest_config="config.json:application/vnd.vulcan.rootfs.v1",
                disable_path_validation=True,
            )
        finally:
            os.chdir(cwd)

    push("by-oras", "python.squashfs:application/vnd.vulcan.rootfs.squashfs.v1",
         "python.manifest.json:application/vnd.vulcan.rootfs.manifest.v1+json")  # fmt: skip
    m = _manifest(registry, "by-oras")
    assert (m.get("artifactType") or m["config"]["mediaType"]) == "application/vnd.vulcan.rootfs.v1"
    dest = tmp_path / "dest"
    proc = _pull(built, f"{registry.host}/{REPO_NAME}:by-oras", dest, "--no-verify", "--insecure")
    assert proc.returncode == 0, proc.stderr
    assert _sha(dest / "images/python.squashfs") == _sha(built.out / "images/python.squashfs")
    # ours and oras's are two images of the python runtime: one pull cannot place both
    both = built.run("pull", published["published"]["python"]["reference"], f"{registry.host}/{REPO_NAME}:by-oras",
                     "--dest", str(tmp_path / "both"), "--no-verify", "--insecure")  # fmt: skip
    assert both.returncode == 4 and "are different images that both place" in both.stderr, both.stderr
    assert not (tmp_path / "both/images/python.squashfs").exists()
    # a layer typed as zstd that is not: its digest is right (the publisher's very bytes), so the
    # error says it does not decompress, and nothing of it is placed or kept to resume from
    (src / "python.ext4").write_bytes(b"not zstd at all, " * 1000)
    push("not-zstd", "python.ext4:application/vnd.vulcan.rootfs.ext4.v1+zstd")
    bad = _pull(built, f"{registry.host}/{REPO_NAME}:not-zstd", tmp_path / "bad", "--no-verify", "--insecure")
    assert bad.returncode == 6 and "python.ext4: the blob does not decompress as zstd" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr
    assert not (tmp_path / "bad/images").exists()  # made by this pull, so removed again with nothing in it
    # an image other than the one its manifest.json names (one byte): its blob's digest is right,
    # what it decompresses to is not what the build measured; refused, nothing placed
    image = bytearray((built.out / "images/python.ext4").read_bytes())
    image[len(image) // 2] ^= 0x01
    (src / "python.ext4").write_bytes(zstandard.ZstdCompressor().compress(bytes(image)))
    push("not-as-built", "python.ext4:application/vnd.vulcan.rootfs.ext4.v1+zstd",
         "python.manifest.json:application/vnd.vulcan.rootfs.manifest.v1+json")  # fmt: skip
    other = _pull(built, f"{registry.host}/{REPO_NAME}:not-as-built", tmp_path / "other", "--no-verify", "--insecure")
    named = json.loads((built.out / "images/python.manifest.json").read_text())["images"][0]["sha256"]
    assert other.returncode == 6 and f"python.ext4 arrived as sha256 {hashlib.sha256(image).hexdigest()}" in \
        other.stderr and f"names ('{named}', {len(image)})" in other.stderr, other.stderr  # fmt: skip
    assert not (tmp_path / "other/images").exists()


def test_publish_refuses_an_image_changed_after_it_was_built(
    built: World, registry: RunningRegistry, keys: dict[str, Path], tmp_path: Path
) -> None:
    image = built.out / "images/python.ext4"  # a writable image booted in place: one block changed
    saved = image.read_bytes()
    image.write_bytes(saved[:4096] + b"\x01" + saved[4097:])
    try:
        proc = built.run("publish", "--to", f"{registry.host}/acme/changed", "--key", str(keys["ours"]),
                         *registry.flags())  # fmt: skip
    finally:
        image.write_bytes(saved)
    assert proc.returncode == 1, proc.stderr
    assert "images/python.ext4 is not the image images/python.manifest.json names" in proc.stderr, proc.stderr
    assert "nothing was published" in proc.stderr and "nox -s rootfs-python" in proc.stderr
    assert not list(registry.storage.rglob("changed")), "the repository was made: something was pushed"


# the exit code of each (docs/errors.md): 6 trust, 3 the registry, 4 what was asked for
CODES = {"no-trust": 6, "untrusted-key": 6, "unsigned": 6, "no-such-tag": 3, "bad-reference": 4, "wrong-arch": 4,
         "down": 3, "tampered-blob": 6, "tampered-zstd-blob": 6}  # fmt: skip


@pytest.mark.parametrize("case", list(CODES))
def test_a_pull_that_cannot_be_trusted_or_done_says_why_and_places_nothing(
    built: World, registry: RunningRegistry, published: dict[str, Any], keys: dict[str, Path], tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory, case: str,
) -> None:  # fmt: skip
    ref = published["published"]["python"]["reference"]
    trust = ["--trust", str(keys["ours.pub"])]
    dest = tmp_path / "host"
    if case == "no-trust":
        proc, want = _pull(built, ref, dest, "--insecure"), "no trusted keys"
    elif case == "untrusted-key":
        proc, want = _pull(built, ref, dest, "--trust", str(keys["other.pub"]), "--insecure"), "no valid signature"
    elif case == "unsigned":
        with running_registry(tmp_path_factory.mktemp("unsigned")) as reg:
            out = tmp_path / "p.json"
            assert built.run("publish", "--to", f"{reg.host}/{REPO_NAME}", "--no-sign", "--digests", str(out),
                             "--insecure").returncode == 0  # fmt: skip
            unsigned = json.loads(out.read_text())["published"]["python"]["reference"]
            proc, want = _pull(built, unsigned, dest, *trust, "--insecure"), "no signature is attached"
    elif case == "no-such-tag":
        proc, want = _pull(built, f"{registry.host}/{REPO_NAME}:python-000000000000", dest, *trust, "--insecure"), (
            "no manifest 'python-000000000000' (HTTP 404)")  # fmt: skip
    elif case == "bad-reference":
        proc, want = _pull(built, "vulcan-images:latest", dest, *trust), "is not REGISTRY/REPOSITORY"
    elif case == "wrong-arch":
        proc, want = _pull(built, ref, dest, *trust, "--insecure", "--arch", "aarch64"), "has no linux/arm64 entry"
    elif case == "down":
        proc, want = (
            _pull(built, ref.replace(registry.host, "127.0.0.1:9"), dest, *trust, "--insecure"),
            "not reachable",
        )
    else:  # a byte changed in the registry's storage: the last of the squashfs, the middle of the zstd
        manifest = _manifest(registry, published["published"]["python"]["manifests"]["x86_64"])
        kind = "ext4.v1+zstd" if case == "tampered-zstd-blob" else "squashfs.v1"
        layer = next(x for x in manifest["layers"] if x["mediaType"].endswith(kind))
        data = next(p for p in registry.storage.rglob("data") if p.parent.name == layer["digest"][7:])
        saved = data.read_bytes()
        at = len(saved) // 2 if case == "tampered-zstd-blob" else len(saved) - 1
        data.write_bytes(saved[:at] + bytes([saved[at] ^ 0xFF]) + saved[at + 1 :])
        try:
            proc, want = _pull(built, ref, dest, *trust, "--insecure"), "another sha256: refused, nothing placed"
        finally:
            data.write_bytes(saved)
    assert proc.returncode == CODES[case] and want in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    placed = [p.name for p in (dest / "images").glob("*")] if (dest / "images").is_dir() else []
    assert not [n for n in placed if not n.startswith(".")], placed


@pytest.mark.parametrize("image", ["python.squashfs", "python.ext4"])  # as it is; decompressed
def test_an_interrupted_pull_resumes_where_it_stopped(
    built: World, registry: RunningRegistry, published: dict[str, Any], keys: dict[str, Path], tmp_path: Path,
    image: str,
) -> None:  # fmt: skip
    manifest = _manifest(registry, published["published"]["python"]["manifests"]["x86_64"])
    layer = next(x for x in manifest["layers"] if x["annotations"]["org.opencontainers.image.title"] == image)
    blob = _get(registry, f"/v2/{REPO_NAME}/blobs/{layer['digest']}").content
    dest = tmp_path / "host"
    (dest / "images").mkdir(parents=True)
    (dest / "images" / f".{image}.{layer['digest'][7:19]}.part").write_bytes(blob[: len(blob) // 2])
    proc = _pull(built, published["published"]["python"]["reference"], dest, "--trust", str(keys["ours.pub"]),
                 "--insecure")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"resuming at {len(blob) // 2:,} of {len(blob):,} bytes" in proc.stderr
    assert _sha(dest / "images" / image) == _sha(built.out / "images" / image)
    assert not list((dest / "images").glob("*.part"))
    assert os.stat(dest / "images" / image).st_blocks <= os.stat(built.out / "images" / image).st_blocks * 1.02


def test_several_references_in_one_pull_land_together_or_not_at_all(
    built: World, registry: RunningRegistry, published: dict[str, Any], keys: dict[str, Path], tmp_path: Path
) -> None:
    python, host = published["published"]["python"]["reference"], published["published"]["host"]["reference"]
    trust = ["--trust", str(keys["ours.pub"]), "--insecure"]
    dest = tmp_path / "host"
    missing = f"{registry.host}/{REPO_NAME}@sha256:{'0' * 64}"
    proc = built.run("pull", python, host, missing, "--dest", str(dest), *trust)
    assert proc.returncode == 3 and "(HTTP 404)" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not [p for top in ("images", "bin") if (dest / top).is_dir() for p in (dest / top).iterdir()
                if not p.name.startswith(".")]  # nothing of the two good ones either  # fmt: skip
    proc = built.run("pull", python, host, "--dest", str(dest), *trust)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("signed by") == 2 and "pull: received" in proc.stderr
    for name in ("python.ext4", "python.squashfs", "python.manifest.json", "python.spdx.json"):
        assert _sha(dest / "images" / name) == _sha(built.out / "images" / name), name
    for name in ("firecracker", "jailer", "vmlinux", "vulcan-guest"):
        assert _sha(dest / "bin" / name) == _sha(built.out / "bin" / name), name
    again = built.run("pull", python, host, "--dest", str(dest), *trust)
    assert again.returncode == 0 and again.stderr.count("up to date") == 2 and "received" not in again.stderr
    by_tag = python.split("@")[0] + ":" + published["published"]["python"]["tag"]  # the same index, by its tag
    twice = built.run("pull", python, by_tag, "--dest", str(tmp_path / "h2"), *trust)
    assert twice.returncode == 0 and twice.stderr.count("signed by") == 1, twice.stderr


def test_two_pulls_at_once_download_once(
    built: World, registry: RunningRegistry, published: dict[str, Any], keys: dict[str, Path], tmp_path: Path
) -> None:
    dest = tmp_path / "host"
    ref = published["published"]["python"]["reference"]
    procs = [built.popen("pull", ref, "--dest", str(dest), "--trust", str(keys["ours.pub"]), "--insecure")
             for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    said = [err for _, err in outs]
    assert sum("up to date" in s for s in said) == 1 and sum("received" in s for s in said) == 1, said


@pytest.mark.parametrize("auth", ["htpasswd", "token"])
def test_credentials_basic_over_tls_and_the_bearer_token_flow(
    built: World, keys: dict[str, Path], tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, auth: str
) -> None:
    with running_registry(tmp_path_factory.mktemp(auth), auth=auth, tls=True) as reg:
        target = ["--to", f"{reg.host}/{REPO_NAME}", "--key", str(keys["ours"]), *reg.flags()]
        anonymous = built.run("publish", *target)
        assert (
            anonymous.returncode == 3 and "HTTP 401" in anonymous.stderr
        ) or "refused an anonymous" in anonymous.stderr
        assert "()" not in anonymous.stderr  # an empty explanation is said as such, not as "()"
        wrong = built.run("publish", *target, VULCAN_REGISTRY_USER=USER, VULCAN_REGISTRY_PASSWORD="nope")
        assert wrong.returncode == 3 and "refused" in wrong.stderr and "credentials" in wrong.stderr, wrong.stderr
        out = tmp_path / "p.json"
        ok = built.run("publish", *target, "--digests", str(out), VULCAN_REGISTRY_USER=USER,
                       VULCAN_REGISTRY_PASSWORD=PASSWORD)  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        if reg.issuer is not None:
            granted = [(s.rsplit(":", 1)[0], set(s.rsplit(":", 1)[1].split(","))) for scopes in reg.issuer.issued
                       for s in scopes]  # the registry lists actions in no fixed order  # fmt: skip
            assert (f"repository:{REPO_NAME}", {"pull", "push"}) in granted, reg.issuer.issued
        # a host logged in the way Docker leaves it: config.json's auths
        docker = tmp_path / "docker"
        docker.mkdir()
        auth_b64 = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        (docker / "config.json").write_text(json.dumps({"auths": {reg.host: {"auth": auth_b64}}}))
        ref = json.loads(out.read_text())["published"]["python"]["reference"]
        issued = len(reg.issuer.issued) if reg.issuer is not None else 0
        proc = built.run("pull", ref, "--dest", str(tmp_path / "host"), "--trust", str(keys["ours.pub"]), *reg.flags(),
                         DOCKER_CONFIG=str(docker))  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        if reg.issuer is not None:  # one token, used by each of the pull's connections (one per blob)
            assert len(reg.issuer.issued) - issued == 1, reg.issuer.issued[issued:]
        assert _sha(tmp_path / "host/images/python.squashfs") == _sha(built.out / "images/python.squashfs")
        if reg.ca is not None:  # the system CAs do not know the test's CA: said, with what to do
            no_ca = built.run("pull", ref, "--dest", str(tmp_path / "h2"), "--trust", str(keys["ours.pub"]),
                              DOCKER_CONFIG=str(docker))  # fmt: skip
            assert no_ca.returncode == 3 and "TLS with" in no_ca.stderr and "--ca FILE" in no_ca.stderr


def test_references_are_parsed_strictly() -> None:
    r = Reference.parse("ghcr.io/acme/vulcan-images@sha256:" + "a" * 64)
    assert (r.registry, r.repository, r.tag, r.digest) == ("ghcr.io", "acme/vulcan-images", None, "sha256:" + "a" * 64)
    assert Reference.parse("127.0.0.1:5000/x:python-1").tag == "python-1"
    for bad in ("vulcan-images", "docker.io/Acme/x", "ghcr.io/x@sha256:abc", "ghcr.io/x:"):
        with pytest.raises(RegistryError):
            Reference.parse(bad)


def test_a_registry_with_the_referrers_api_gets_no_tag_schema_index(
    built: World, keys: dict[str, Path], tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with running_registry(tmp_path_factory.mktemp("api")) as reg:
        proxy = ReferrersProxy(reg)
        try:
            out = tmp_path / "p.json"
            proc = built.run("publish", "--to", f"{proxy.host}/{REPO_NAME}", "--key", str(keys["ours"]),
                             "--digests", str(out), "--insecure")  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            tags = requests.get(f"{reg.base}/v2/{REPO_NAME}/tags/list", timeout=30).json()["tags"]
            assert not [t for t in tags if t.startswith("sha256-")], tags  # the API holds them: no fallback index
            digest = json.loads(out.read_text())["published"]["python"]["manifests"]["x86_64"]
            assert {r["artifactType"] for r in proxy.referrers[digest]} == {"application/vnd.in-toto+json",
                                                                            "application/spdx+json"}  # fmt: skip
            calls = proxy.api_calls
            ref = json.loads(out.read_text())["published"]["python"]["reference"]
            pulled = _pull(built, ref, tmp_path / "host", "--trust", str(keys["ours.pub"]), "--insecure")
            assert pulled.returncode == 0, pulled.stderr
            assert proxy.api_calls > calls  # the signature was found through the API
        finally:
            proxy.close()


def test_an_upload_interrupted_mid_blob_resumes_where_the_registry_stands(
    registry: RunningRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scripts.registry import client as client_mod
    from scripts.registry import oci
    from scripts.registry.transport import Response, TransportError

    monkeypatch.setattr(client_mod, "CHUNK", 1 << 20)
    data = os.urandom(5 << 20)
    f = tmp_path / "big.bin"
    f.write_bytes(data)
    blob = oci.Blob("application/octet-stream", oci.digest_of(data), len(data), path=str(f), title="big.bin")
    state = tmp_path / "state"
    first = client_mod.Registry(registry.host, insecure=True, state_dir=state)
    sent = {"n": 0}
    real = first.transport.request

    def cut_after_two_chunks(method: str, url: str, **kw: Any) -> Response:
        if method == "PATCH":
            sent["n"] += 1
            if sent["n"] == 3:
                raise TransportError("unreachable", "ConnectionResetError: the link went down")
        return real(method, url, **kw)

    monkeypatch.setattr(first.transport, "request", cut_after_two_chunks)
    with pytest.raises(RegistryError, match="not reachable"):
        first.push_blob("acme/resume", blob)
    assert list(state.rglob("*.upload.json"))  # where it stood is remembered
    again = client_mod.Registry(registry.host, insecure=True, state_dir=state)
    assert again.push_blob("acme/resume", blob) == 3 << 20  # only the last three chunks
    assert requests.get(f"{registry.base}/v2/acme/resume/blobs/{blob.digest}", timeout=30).content == data
    assert not list(state.rglob("*.upload.json"))


def test_files_pulled_unverified_are_not_taken_as_verified_by_a_later_pull(
    built: World, registry: RunningRegistry, published: dict[str, Any], keys: dict[str, Path], tmp_path: Path
) -> None:
    ref, dest = published["published"]["python"]["reference"], tmp_path / "host"
    assert _pull(built, ref, dest, "--no-verify", "--insecure").returncode == 0
    other = _pull(built, ref, dest, "--trust", str(keys["other.pub"]), "--insecure")
    assert other.returncode == 6 and "no valid signature" in other.stderr, other.stderr
    ours = _pull(built, ref, dest, "--trust", str(keys["ours.pub"]), "--insecure")
    assert ours.returncode == 0 and "up to date" not in ours.stderr and "signed by" in ours.stderr
    again = _pull(built, ref, dest, "--trust", str(keys["ours.pub"]), "--insecure")
    assert again.returncode == 0 and "up to date" in again.stderr


def test_a_second_repository_of_the_same_registry_mounts_the_blobs_instead_of_uploading(
    built: World, registry: RunningRegistry, published: dict[str, Any], keys: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "p.json"
    proc = built.run("publish", "--to", f"{registry.host}/acme/other-images", "--mount-from", REPO_NAME, "--key",
                     str(keys["ours"]), "--digests", str(out), "--insecure")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    assert "mounted from acme/vulcan-images" in proc.stderr
    # the images and host files were mounted; only what differs by repository (signatures name it) is sent
    assert doc["uploaded_bytes"] < 0.01 * doc["payload_bytes"], doc
    assert doc["published"]["python"]["digest"] == published["published"]["python"]["digest"]


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY",
                   "no_proxy")  # fmt: skip


def test_the_registry_client_goes_through_the_proxy_the_environment_names_but_not_for_no_proxy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scripts.registry import oci
    from scripts.registry.client import Registry

    data = os.urandom(300_000)
    blob = oci.Blob("application/octet-stream", oci.digest_of(data), len(data), data=data, title="small.bin")
    desc = {"digest": blob.digest, "size": blob.size}
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with running_registry(tmp_path / "tls", tls=True) as tls, running_registry(tmp_path / "plain") as plain, \
            running_proxy(tmp_path / "proxy") as proxy:  # fmt: skip
        assert tls.ca is not None
        # HTTPS: a CONNECT tunnel (the proxy's credentials from its URL), TLS to the registry inside it
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        assert Registry(tls.host, ca=tls.ca.cert).push_blob("acme/proxied", blob) == len(data)
        assert Registry(tls.host, ca=tls.ca.cert).small_blob("acme/proxied", desc, "the blob") == data
        tunnels = proxy.requests()
        assert tunnels and set(tunnels) == {f"CONNECT {tls.host}"}
        # without the proxy's credentials: its refusal, said
        monkeypatch.setenv("HTTPS_PROXY", proxy.url.replace(f"{PROXY_USER}:{PROXY_PASSWORD}@", ""))
        with pytest.raises(RegistryError, match="407 Proxy Authentication Required"):
            Registry(tls.host, ca=tls.ca.cert).has_blob("acme/proxied", blob.digest)
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        tunnels = proxy.requests()
        # plain HTTP: the request itself, in absolute form, to the proxy (reads: tinyproxy 1.11
        # now and then resets a relayed upload to docker-registry, which is not what this tests)
        Registry(plain.host, insecure=True).push_blob("acme/proxied", blob)
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        assert Registry(plain.host, insecure=True).small_blob("acme/proxied", desc, "the blob") == data
        assert proxy.requests()[len(tunnels) :] == [f"GET http://{plain.host}/v2/acme/proxied/blobs/{blob.digest}"]
        # NO_PROXY: straight to the registry; the proxy sees nothing more
        monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
        seen = len(proxy.requests())
        assert Registry(tls.host, ca=tls.ca.cert).has_blob("acme/proxied", blob.digest)
        assert Registry(plain.host, insecure=True).has_blob("acme/proxied", blob.digest)
        assert len(proxy.requests()) == seen
