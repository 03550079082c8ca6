"""OCI images for the template tests: the real Debian image of ../shared, and small ones made here
from real Alpine v3.19.1 packages, written as an OCI image layout and put in the real
docker-registry by skopeo (which also converts them to Docker's media types when asked)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.world import SHARED

DEBIAN = SHARED / "oci-debian-bookworm"
DEBIAN_MANIFEST = "sha256:1c07cf684d2ff3f4c7e09e7040d5e8447c1da19ecdc02895133e4b0699b36b5e"
ALPINE_ISO = SHARED / "alpine-v3.19.1-iso" / "x86_64"
EPOCH = 1733443200  # 2024-12-06, the config's created
GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
TAR = "application/vnd.oci.image.layer.v1.tar"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def require_skopeo() -> str:
    found = shutil.which("skopeo")
    if found is None:
        pytest.skip("skopeo is not installed (Debian: skopeo; .ci/setup-debian installs it)")
    return found


def require_debian() -> Path:
    if not (DEBIAN / "index.json").is_file():
        pytest.skip(f"{DEBIAN} is absent: the real Debian OCI image the template tests build from")
    return DEBIAN


def copy_to(registry_host: str, layout: str, dest: str, *args: str) -> None:
    """``skopeo copy oci:LAYOUT docker://REGISTRY/DEST`` (plain HTTP: the test registry)."""
    proc = subprocess.run(
        [
            require_skopeo(),
            "copy",
            "-q",
            "--dest-tls-verify=false",
            *args,
            f"oci:{layout}",
            f"docker://{registry_host}/{dest}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr


def entry(name: str, data: bytes | None = None, *, kind: bytes = tarfile.REGTYPE, mode: int = 0o644,
          link: str = "", uid: int = 0, gid: int = 0, pax: dict[str, str] | None = None,
          dev: tuple[int, int] = (0, 0)) -> tuple[tarfile.TarInfo, bytes | None]:  # fmt: skip
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, gid, EPOCH
    info.linkname = link
    info.devmajor, info.devminor = dev
    if pax:
        info.pax_headers = dict(pax)
    if data is not None:
        info.size = len(data)
    return info, data


def layer_tar(entries: Iterable[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def compress(tar: bytes, media: str) -> bytes:
    if media == GZ:
        return gzip.compress(tar, mtime=0)
    if media == ZSTD:
        import zstandard

        return zstandard.ZstdCompressor(level=3).compress(tar)
    return tar


def apk_layer(names: list[str]) -> bytes:
    """The files of real Alpine v3.19.1 packages as one layer's tar (their data, no metadata)."""
    out: list[tuple[tarfile.TarInfo, bytes | None]] = []
    for name in names:
        [apk] = sorted(ALPINE_ISO.glob(f"{name}-[0-9]*.apk"))
        with tarfile.open(apk, "r:gz") as t:  # the signature, control and data gzip members, read as one tar
            for m in t:
                if m.name.split("/", 1)[0].startswith("."):
                    continue
                m.pax_headers = {k: v for k, v in m.pax_headers.items() if not k.startswith("APK-TOOLS.")}
                f = t.extractfile(m) if m.isreg() else None
                out.append((m, f.read() if f else None))
    return layer_tar(out)


def require_alpine_packages() -> None:
    if not ALPINE_ISO.is_dir():
        pytest.skip(f"{ALPINE_ISO} is absent: the real Alpine packages small test images are made of")


@dataclass
class Image:
    """One image of an OCI layout: layers (tar bytes, media type), a config."""

    layers: list[tuple[bytes, str]]
    arch: str = "amd64"
    env: list[str] = field(
        default_factory=lambda: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    )
    workdir: str = ""


def _blob(root: Path, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = root / "blobs" / "sha256" / digest[7:]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def write_layout(root: Path, images: list[Image], tag: str = "t") -> dict[str, str]:
    """An OCI image layout at ``root``: one image, or an index of several (one per arch).
    Returns {arch: manifest digest}."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    manifests = []
    out = {}
    for im in images:
        descs, diff_ids = [], []
        for tar, media in im.layers:
            blob = compress(tar, media)
            descs.append({"mediaType": media, "digest": _blob(root, blob), "size": len(blob)})
            diff_ids.append("sha256:" + hashlib.sha256(tar).hexdigest())
        config = {"created": "2024-12-06T00:00:00Z", "architecture": im.arch, "os": "linux",
                  "config": {"Env": im.env, **({"WorkingDir": im.workdir} if im.workdir else {})},
                  "rootfs": {"type": "layers", "diff_ids": diff_ids}}  # fmt: skip
        cbytes = json.dumps(config).encode()
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": _blob(root, cbytes),
                               "size": len(cbytes)}, "layers": descs}  # fmt: skip
        mbytes = json.dumps(manifest).encode()
        digest = _blob(root, mbytes)
        out[im.arch] = digest
        manifests.append({"mediaType": manifest["mediaType"], "digest": digest, "size": len(mbytes),
                          "platform": {"architecture": im.arch, "os": "linux"}})  # fmt: skip
    if len(images) == 1:
        manifests[0]["annotations"] = {"org.opencontainers.image.ref.name": tag}
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests}
    else:  # the layout's index names the image index (what skopeo copy --all pushes as one)
        inner = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests}
        ibytes = json.dumps(inner).encode()
        out["index"] = _blob(root, ibytes)
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                 "manifests": [{"mediaType": inner["mediaType"], "digest": out["index"], "size": len(ibytes),
                                "annotations": {"org.opencontainers.image.ref.name": tag}}]}  # fmt: skip
    (root / "index.json").write_text(json.dumps(index))
    return out
