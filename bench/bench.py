"""Benchmarks: how fast, how big, how close to the floor (``nox -s bench``; not a test).

A local mirror serves realistically sized synthetic runtimes (python-like ~3,000 files / 50 MB,
node-like ~6,000 / 100 MB, go-like ~12,000 / 200 MB, generated deterministically and cached in
bench/.cache) on top of the test base (real static busybox and musl from Debian). Each figure
is the median of several runs, next to its floor, measured in the same run:

1. no-op ``nox -s rootfs_all`` vs the same sessions doing nothing; requests made
2. warm rebuild of each image (image deleted, stream cached) vs ``mke2fs -d`` of the same tar
   alone, writing the image next to the output (the floor) and in RAM (what we do by default)
3. cold build of all three: bytes fetched / unique bytes needed; parallel vs serial fetch
   (over a simulated link: latency and per-connection bandwidth)
4. image size / content size, next to the seed's fixed 512 MiB
5. peak RSS of the build process (each image alone; all three assembled at once)
6. boot-to-smoke under QEMU (TCG) when a kernel is at hand
7. warm squashfs rebuild vs ``tar2sqfs`` alone (same options, same tar); sizes; bytes a
   sandbox start copies
8. the agent changed: ``guest`` then ``rootfs --all`` vs ``go build`` + ``mke2fs -d`` of the
   three final tars one after the other; where the time went (VULCAN_TIMING phases)
9. snapshot create and load + resume with the real Firecracker 1.12.1 of ../shared (median of
   10 single restores; 4 at once vs one alone; bytes copied)
10. publish and pull through a real registry (docker-registry): seconds, bytes on the wire, the
   second publish and pull, ours vs ``oras pull``; the pull again through a delay line of
   ``--latency-ms`` round trips (bench/delayline.py)
11. assembly from cached real packages (VULCAN_REASSEMBLE=1) vs real apk 2.14 ``--initdb add`` +
   ``mke2fs -d`` of the same packages (root only), one run of each in turn
12. the same on the synthetic runtimes
13. the cold build of all three vs downloading the same bytes (curl) + real apk + ``mke2fs -d``

Prints a table and writes bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import imagerepo  # noqa: E402
from tests.support.apkrepo import Entry, Pkg, publish  # noqa: E402
from tests.support.mirror import serve  # noqa: E402
from tests.support.world import BASE_PINS, SHARED, World  # noqa: E402

GENERATOR = 5  # bump when the synthetic packages change (5: directory entries and per-file checksums)
RUNTIMES = {  # name: (package, files, total bytes, check binary)
    "python": ("python3", 3_000, 50 << 20),
    "node": ("nodejs", 6_000, 100 << 20),
    "go": ("go", 12_000, 200 << 20),
}
WORDS = [
    "def",
    "return",
    "import",
    "class",
    "self",
    "value",
    "error",
    "result",
    "index",
    "buffer",
    "stream",
    "package",
    "module",
    "func",
    "const",
    "var",
    "if",
    "else",
    "for",
    "while",
    "range",
    "print",
    "format",
    "string",
    "bytes",
    "list",
    "dict",
    "map",
    "struct",
    "interface",
]


def synthetic_text(rng: random.Random, size: int) -> bytes:
    """Source-code-like text: compresses like real runtime files do (about 4-5x)."""
    out, n = [], 0
    while n < size:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + f" {rng.getrandbits(32):x}\n"
        out.append(line)
        n += len(line)
    return "".join(out).encode()[:size]


def runtime_packages(name: str, pkg: str, files: int, total: int, arch: str, parts: int = 4) -> list[Pkg]:
    """The runtime split into a main package and parts (as Alpine splits runtimes into -libs,
    -stdlib, ... subpackages), so a cold fetch has several files to download at once."""
    rng = random.Random(f"{GENERATOR}-{name}")
    sizes = [rng.lognormvariate(0, 1.2) for _ in range(files)]
    scale = total / sum(sizes)
    buckets: list[list[Entry]] = [[] for _ in range(parts)]
    for i, s in enumerate(sizes):
        path = f"usr/lib/{name}/m{i % 97:02d}/f{i}.src"  # ~100 files per directory
        buckets[i % parts].append(Entry(path, synthetic_text(rng, max(1, int(s * scale)))))
    binary = imagerepo.musl_python() or b'#!/bin/sh\necho "synthetic runtime"\n'
    command = {"python3": "python3", "nodejs": "node", "go": "go"}[pkg]
    version = {"python3": "3.14.7-r1", "nodejs": "24.18.1-r0", "go": "1.26.8-r0"}[pkg]
    musl = f"so:libc.musl-{arch}.so.1"
    subs = [Pkg(f"{pkg}-part{k}", version, arch, depends=[musl], entries=buckets[k]) for k in range(1, parts)]
    main = Pkg(pkg, version, arch, depends=[musl, *(p.name for p in subs)],
               entries=[*buckets[0], Entry(f"usr/bin/{command}", binary, 0o755)])  # fmt: skip
    return [main, *subs]


def as_abuild_writes(p: Pkg) -> Pkg:
    """The package as abuild writes it: every parent directory an entry of its own, every file
    with its APK-TOOLS.checksum.SHA1 (real apk refuses a data tar without its directories:
    "no dirent in archive"), so real apk installs the bench's packages too."""
    have = {e.path for e in p.entries}
    dirs = []
    for e in p.entries:
        parts = e.path.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in have:
                have.add(d)
                dirs.append(Entry(d, kind="dir", mode=0o755))
    files = [dataclasses.replace(e, checksum=e.kind in ("file", "symlink")) for e in p.entries]
    return dataclasses.replace(p, entries=sorted(dirs, key=lambda e: e.path) + files)


def cached_packages(arch: str) -> dict[str, list[Pkg]]:
    base = imagerepo.packages(arch)
    base["main"] = [p for p in base["main"] if p.name not in ("python3", "nodejs", "libffi")]
    base["community"] = []
    for name, (pkg, files, total) in RUNTIMES.items():
        (base["community"] if name == "go" else base["main"]).extend(runtime_packages(name, pkg, files, total, arch))
    return {repo: [as_abuild_writes(p) for p in pkgs] for repo, pkgs in base.items()}


class Apks:
    """Builds (once) and caches the synthetic .apk bytes on disk: generation is not measured."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache

    def publish(self, mirror: Any, arch: str) -> dict[str, int]:
        self.cache.mkdir(parents=True, exist_ok=True)
        self._persistent_key()
        stamp = self.cache / f"gen-{GENERATOR}-{arch}.json"
        if not stamp.exists():
            print("bench: generating synthetic packages (once; cached in bench/.cache) ...", flush=True)
            t = time.monotonic()
            published = publish(mirror, cached_packages(arch), arch)
            for name, data in published.items():
                (self.cache / name).write_bytes(data)
            stamp.write_text(json.dumps(sorted(mirror.files)))
            print(f"bench: generated in {time.monotonic() - t:.0f}s", flush=True)
        else:
            for path in json.loads(stamp.read_text()):
                name = path.rsplit("/", 1)[1]
                if name.endswith(".apk"):
                    mirror.files[path] = (self.cache / name).read_bytes()
            publish(mirror, {"main": [], "community": []}, arch)  # keys only
            # the signed indexes were generated with the packages: rebuild them from the .apk records
            self._reindex(mirror, arch)
        return {p: len(d) for p, d in mirror.files.items()}

    def _persistent_key(self) -> None:
        """The cached packages are signed: keep the signing key with them."""
        from cryptography.hazmat.primitives import serialization

        from tests.support import apkrepo

        pem = self.cache / "signing-key.pem"
        if pem.exists():
            key = serialization.load_pem_private_key(pem.read_bytes(), password=None)
        else:
            key = apkrepo.test_key()
            pem.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
        own = apkrepo.test_key
        apkrepo.test_key = lambda name=apkrepo.KEY_NAME: key if name == apkrepo.KEY_NAME else own(name)  # type: ignore[assignment,misc]

    def _reindex(self, mirror: Any, arch: str) -> None:
        from scripts.apk.package import verify_package
        from scripts.apk.trust import Keyring  # noqa: F401
        from tests.support.apkrepo import index as make_index

        for repo in ("main", "community"):
            records = []
            prefix = f"/dl-cdn.alpinelinux.org/alpine/v3.24/{repo}/{arch}/"
            for path in sorted(p for p in mirror.files if p.startswith(prefix) and p.endswith(".apk")):
                f = self.cache / path.rsplit("/", 1)[1]
                v = verify_package(f, None, _keyring(), f.name)
                info = v.pkginfo
                rec = [f"C:{v.checksum}", f"P:{info['pkgname'][0]}", f"V:{info['pkgver'][0]}", f"A:{arch}",
                       f"S:{f.stat().st_size}", f"I:{info['size'][0]}", f"L:{info['license'][0]}",
                       f"o:{info['origin'][0]}", f"t:{info['builddate'][0]}"]  # fmt: skip
                for key, letter in (("depend", "D"), ("provides", "p"), ("install_if", "i")):
                    if info.get(key):
                        rec.append(f"{letter}:{' '.join(info[key])}")
                if info.get("provider_priority"):
                    rec.append(f"k:{info['provider_priority'][0]}")
                records.append("\n".join(rec) + "\n")
            mirror.add(
                f"https://dl-cdn.alpinelinux.org/alpine/v3.24/{repo}/{arch}/APKINDEX.tar.gz", make_index(records)
            )


def _keyring() -> Any:
    from scripts.apk.trust import Keyring
    from tests.support.apkrepo import KEY_NAME, public_pem

    return Keyring.from_pems({KEY_NAME: public_pem()})


def timed(cmd: list[str], env: dict[str, str], cwd: Path = ROOT) -> tuple[float, subprocess.CompletedProcess[str]]:
    t = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return time.monotonic() - t, proc


def mke2fs_floor(tar: Path, manifest: dict[str, Any], work: Path, env: dict[str, str]) -> float:
    """mke2fs -d of the very tar, with the image's own size, inodes, UUID and hash seed, writing
    the image in ``work`` (the floor: on the output's file system; RAM_FLOOR: in /dev/shm)."""
    from scripts.formats.ext4 import MKE2FS_CONF

    img = work / "floor.ext4"
    img.unlink(missing_ok=True)
    with open(img, "wb") as f:
        f.truncate(manifest["size"])
    conf = work / "mke2fs.conf"
    conf.write_text(MKE2FS_CONF)
    fs = manifest["filesystem"]
    cmd = ["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-N", str(fs["inodes"]), "-U", fs["uuid"],
           "-E", f"hash_seed={fs['hash_seed']},root_owner=0:0,lazy_itable_init=0,lazy_journal_init=0",
           "-O", "^orphan_file,^metadata_csum_seed", "-d", str(tar), str(img), f"{manifest['size'] // 1024}k"]  # fmt: skip
    took = timed(cmd, {**env, "MKE2FS_CONFIG": str(conf), "SOURCE_DATE_EPOCH": "1700000000"})[0]
    img.unlink()
    return took


def cached_tar(cache: Path, tar_sha256: str) -> Path:
    """The build's own cached stream with this sha256 (the floors' input), found by its sidecar:
    no VULCAN_KEEP_TAR copy inside a timed build."""
    for side in (cache / "rootfs").glob("*/*.json"):
        if json.loads(side.read_text()).get("sha256") == tar_sha256:
            return side.with_suffix(".tar")
    raise SystemExit(f"bench: no cached stream with sha256 {tar_sha256}")


def final_tar(py: str, env: dict[str, str], out: Path, name: str, arch: str, work: Path) -> Path:
    """The stream an agent-change build wrote its image from (spliced in RAM, not cached): made
    again, untimed, in a throwaway output with VULCAN_KEEP_TAR, for the floor to read."""
    other, keep = work / "final-out", work / "final-tars"
    shutil.rmtree(other, ignore_errors=True)
    shutil.copytree(out / "bin", other / "bin")
    timed(
        [py, "-m", "scripts", "rootfs", "--runtime", name],
        {**env, "VULCAN_OUT": str(other), "VULCAN_KEEP_TAR": str(keep)},
    )
    return keep / f"{name}-{arch}.tar"


def ram_work() -> Path:
    """Where the RAM floors write (what our build does by default: VULCAN_RAM)."""
    return Path(tempfile.mkdtemp(prefix="vulcan-bench-", dir="/dev/shm"))


def phases(stderr: str) -> dict[str, float]:
    """The build's own account of where its time went (VULCAN_TIMING=json: one JSON line per
    build), summed over its images."""
    out: dict[str, float] = {}
    for line in stderr.splitlines():
        if line.startswith('{"timing"'):
            for key, secs in json.loads(line)["phases"].items():
                out[key] = out.get(key, 0.0) + float(secs)
    return out


def median_phases(runs: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in runs for k in r})
    return {k: median([r.get(k, 0.0) for r in runs]) for k in keys}


def median(xs: list[float]) -> float:
    return statistics.median(xs)


@dataclass
class Bench:
    """What every figure shares: the arguments, the world (mirror, pins, cache, outputs) and the
    environment its builds run in, the tools, and the results so far."""

    args: argparse.Namespace
    w: World
    mirror: Any
    env: dict[str, str]
    nox: str
    go: str
    arch: str
    work: Path
    ram: Path
    results: dict[str, Any]
    py: str = sys.executable
    first_bin: Path | None = None  # the agent the cached streams were assembled with
    wrapper: str = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )

    def build(self, *args: str, **env: str) -> tuple[float, subprocess.CompletedProcess[str]]:
        return timed([self.py, "-m", "scripts", *args], {**self.env, **env})

    def images(self) -> None:
        """The three ext4 images built (the agent first), whatever ran before: a figure that needs
        them calls this, so that each figure runs alone (``--only``) or after any other. The
        first agent built is kept: the cached streams hold it (the squashfs figure's world)."""
        if not (self.w.out / "bin/vulcan-guest").is_file():
            self.build("guest")
        if self.first_bin is None:
            self.first_bin = self.work / "first-bin"
            shutil.copytree(self.w.out / "bin", self.first_bin)
        if not all((self.w.out / "images" / f"{n}.ext4").is_file() for n in RUNTIMES):
            self.build("rootfs", "--all")

    def squashfs_world(self) -> dict[str, str]:
        """The environment of a world with the same pins making squashfs images (the squashfs
        figure measures it, the boot and snapshot figures boot it), made on first use with the
        agent the cached streams hold (a warm rebuild: an agent change's stream is spliced in
        RAM and not kept, so after one a rebuild splices again), its images built."""
        sq_dir = self.work / "sq"
        env = {"VULCAN_PINS": str(sq_dir / "pins.json"), "VULCAN_OUT": str(sq_dir / "out")}
        if sq_dir.is_dir():
            return env
        self.images()
        assert self.first_bin is not None
        sq_dir.mkdir()
        sq_pins = copy.deepcopy(self.w.pins)
        sq_pins["alpine"]["formats"] = ["squashfs"]
        (sq_dir / "pins.json").write_text(json.dumps(sq_pins))
        shutil.copy(self.w.tmp / "alpine.lock.json", sq_dir / "alpine.lock.json")
        shutil.copytree(self.first_bin, sq_dir / "out/bin")
        for name in RUNTIMES:
            self.build("rootfs", "--runtime", name, **env)  # stamp and stream in place
        return env

    def manifest(self, name: str, out: Path | None = None) -> dict[str, Any]:
        return dict(json.loads(((out or self.w.out) / "images" / f"{name}.manifest.json").read_text()))


def cold(b: Bench) -> dict[str, Any]:
    """3. cold build of all three, parallel vs serial fetch, over a simulated link."""
    w, mirror, args = b.w, b.mirror, b.args
    mirror.latency_s, mirror.rate = args.latency_ms / 1000, args.mbps * 1e6 / 8
    subprocess.run([b.py, "-m", "scripts", "guest"], env=b.env, cwd=ROOT, check=True, capture_output=True)
    runs: dict[str, list[float]] = {"parallel": [], "serial": []}
    fetched = needed = 0
    for run in range(args.runs):
        for mode, workers in (("parallel", "4"), ("serial", "1")):
            shutil.rmtree(w.cache / "apk", ignore_errors=True)
            shutil.rmtree(w.cache / "rootfs", ignore_errors=True)
            shutil.rmtree(w.out / "images", ignore_errors=True)
            (w.tmp / "alpine.lock.json").unlink(missing_ok=True)
            before = mirror.bytes_served
            n_before = len(mirror.requests)
            t, _ = b.build("rootfs", "--all", VULCAN_FETCH_WORKERS=workers)
            runs[mode].append(t)
            if run == 0 and mode == "parallel":
                fetched = mirror.bytes_served - before
                paths = {p for _, p, _ in mirror.requests[n_before:]}
                needed = sum(len(mirror.files[p]) for p in paths if p in mirror.files)
    mirror.latency_s = mirror.rate = 0.0
    return {
        "parallel_s": median(runs["parallel"]), "serial_s": median(runs["serial"]),
        "speedup": median(runs["serial"]) / median(runs["parallel"]),
        "bytes_fetched": fetched, "unique_bytes_needed": needed, "fetch_ratio": fetched / needed if needed else None,
        "link": f"{args.latency_ms:.0f} ms latency, {args.mbps:.0f} Mbit/s per connection",
    }  # fmt: skip


def noop(b: Bench) -> dict[str, Any]:
    """1. no-op, against the nox floor: the same sessions with the same requires= chain (guest,
    then rootfs_all; the rootfs-<rt> sessions defined, not run) and venv settings, each doing
    nothing, so the difference is exactly our part."""
    floor_dir = b.work / "nox-floor"
    floor_dir.mkdir()
    rootfs = [f"rootfs-{name}" for name in RUNTIMES]
    (floor_dir / "noxfile.py").write_text(
        'import nox\nnox.options.default_venv_backend = "uv|virtualenv"\nnox.options.reuse_existing_virtualenvs = True\n'
        "@nox.session\ndef guest(session):\n    pass\n"
        + "".join(f"@nox.session(name={n!r}, requires=['guest'])\ndef _{i}(session):\n    pass\n" for i, n in enumerate(rootfs))
        + "@nox.session(requires=['guest'])\ndef rootfs_all(session):\n    pass\n"
    )  # fmt: skip
    timed([b.nox, "-s", "rootfs_all"], b.env, cwd=floor_dir)  # create its venvs once
    timed([b.nox, "-s", "rootfs_all"], b.env)  # warm the session venvs
    ours, floor, reqs = [], [], []
    for _ in range(b.args.runs):
        floor.append(timed([b.nox, "-s", "rootfs_all"], b.env, cwd=floor_dir)[0])
        n = len(b.mirror.requests)
        ours.append(timed([b.nox, "-s", "rootfs_all"], b.env)[0])
        reqs.append(len(b.mirror.requests) - n)
    return {
        "rootfs_all_s": median(ours), "empty_sessions_s": median(floor), "sessions": 2,  # guest, rootfs_all
        "ours_s": median(ours) - median(floor), "requests": max(reqs),
    }  # fmt: skip


def warm(b: Bench) -> dict[str, Any]:
    """2. warm rebuild vs mke2fs of the same tar; 4. size; 5. memory (each image assembled from
    its packages alone, then all three at once in one process)."""
    w = b.w
    b.images()
    out: dict[str, Any] = {"runtimes": {}, "phases": {}}
    for name in RUNTIMES:
        builds, floors, ram_floors, runs = [], [], [], []
        for _ in range(b.args.runs):
            (w.out / "images" / f"{name}.ext4").unlink()
            t, proc = b.build("rootfs", "--runtime", name, VULCAN_TIMING="json")
            builds.append(t)
            runs.append(phases(proc.stderr))
            manifest = b.manifest(name)
            tar = cached_tar(w.cache, manifest["tar_sha256"])
            floors.append(mke2fs_floor(tar, manifest, b.work, b.env))
            ram_floors.append(mke2fs_floor(tar, manifest, b.ram, b.env))
        (w.out / "images" / f"{name}.ext4").unlink()
        _, proc = timed([b.py, "-c", b.wrapper, b.py, "-m", "scripts", "rootfs", "--runtime", name],
                        {**b.env, "VULCAN_REASSEMBLE": "1"})  # fmt: skip
        rss = int(proc.stdout.strip().splitlines()[-1]) / 1024
        content, size = manifest["filesystem"]["content_bytes"], manifest["size"]
        out["runtimes"][name] = {
            "build_s": median(builds), "mke2fs_floor_s": median(floors), "ratio": median(builds) / median(floors),
            "mke2fs_ram_floor_s": median(ram_floors), "ram_ratio": median(builds) / median(ram_floors),
            "image_mib": size / 2**20, "content_mib": content / 2**20, "size_ratio": size / content,
            "size_target_mib": (1.15 * content + (64 << 20)) / 2**20, "seed_fixed_mib": 512,
            "peak_rss_mib": rss, "files": sum(len(p["files"]) for p in manifest["packages"]),
        }  # fmt: skip
        out["phases"][name] = median_phases(runs)
    for name in RUNTIMES:
        (w.out / "images" / f"{name}.ext4").unlink()
    _, proc = timed([b.py, "-c", b.wrapper, b.py, "-m", "scripts", "rootfs", "--all"],
                    {**b.env, "VULCAN_REASSEMBLE": "1"})  # fmt: skip
    out["all_at_once_peak_rss_mib"] = int(proc.stdout.strip().splitlines()[-1]) / 1024
    return out


def agent_change(b: Bench) -> dict[str, Any]:
    """8. the agent changed (the developer loop): the agent rebuilt, then every image from the
    cached stream with the new agent spliced in; floor: go build + mke2fs -d of the final tars."""
    w, work, env = b.w, b.work, b.env
    b.images()  # (it keeps the agent the streams were assembled with: the squashfs figure's)
    agent_src = work / "agent-src"
    shutil.copytree(ROOT / "guest", agent_src)
    change = {"VULCAN_GUEST_SOURCE": str(agent_src), "VULCAN_TIMING": "json"}
    gobuild = [
        b.go,
        "build",
        "-trimpath",
        "-buildvcs=false",
        "-ldflags=-s -w -buildid=",
        "-o",
        str(work / "agent"),
        ".",
    ]
    # the floor's go build gets its own build cache, warmed like ours: with ours, it would find
    # the very package our guest step just compiled and only link (a floor no build can reach)
    go_env = {**env, "CGO_ENABLED": "0", "GOTOOLCHAIN": "local", "GOFLAGS": "", "GOCACHE": str(work / "gocache-floor")}
    timed(gobuild, go_env, cwd=agent_src)  # warm it (the standard library), as ours is

    def change_agent(tag: str) -> None:  # a change that stays in the binary
        (agent_src / "bench_change.go").write_text(
            f'package main\n\nimport "os"\n\nvar benchChange = "bench {tag}"\n\n'
            "func init() {\n\tif len(os.Args) > 1000 {\n\t\tprintln(benchChange)\n\t}\n}\n"
        )

    each: dict[str, Any] = {}
    for name in RUNTIMES:  # each size alone: the agent, then that one image
        ours, floors = [], []
        for run in range(b.args.runs):
            change_agent(f"{name} {run}")
            t_guest, _ = b.build("guest", **change)
            t_rootfs, proc = b.build("rootfs", "--runtime", name, **change)
            if "only the agent changed" not in proc.stderr:
                raise SystemExit(f"bench: the agent change did not splice:\n{proc.stderr}")
            ours.append(t_guest + t_rootfs)
            tar = final_tar(b.py, env, w.out, name, b.arch, work)
            floors.append(timed(gobuild, go_env, cwd=agent_src)[0] + mke2fs_floor(tar, b.manifest(name), work, env))
        each[name] = {"rebuild_s": median(ours), "floor_s": median(floors), "ratio": median(ours) / median(floors)}
    changed, floors, runs = [], [], []
    for run in range(b.args.runs):
        change_agent(f"all {run}")
        t_guest, _ = b.build("guest", **change)
        t_rootfs, proc = b.build("rootfs", "--all", **change)
        if '{"timing"' not in proc.stderr:
            raise SystemExit(f"bench: the agent change did not rebuild the images:\n{proc.stderr}")
        changed.append(t_guest + t_rootfs)
        runs.append({**phases(proc.stderr), "guest step (go build)": t_guest})
        floor = timed(gobuild, go_env, cwd=agent_src)[0]
        for name in RUNTIMES:
            floor += mke2fs_floor(final_tar(b.py, env, w.out, name, b.arch, work), b.manifest(name), work, env)
        floors.append(floor)
    return {
        "rebuild_s": median(changed), "floor_s": median(floors), "ratio": median(changed) / median(floors),
        "each": each, "phases": median_phases(runs),
    }  # fmt: skip


def squashfs(b: Bench) -> dict[str, Any]:
    """7. squashfs: the same stream (cached), tar2sqfs with our options vs tar2sqfs alone; sizes;
    bytes a sandbox start copies."""
    from scripts.formats import squashfs as writer

    w, work = b.w, b.work
    sq_env = b.squashfs_world()
    sq_out = Path(sq_env["VULCAN_OUT"])
    runtimes: dict[str, Any] = {}
    for name in RUNTIMES:
        builds, floors, ram_floors = [], [], []
        ext4 = b.manifest(name)
        for _ in range(b.args.runs):
            (sq_out / "images" / f"{name}.squashfs").unlink()
            builds.append(b.build("rootfs", "--runtime", name, **sq_env)[0])
            tar = cached_tar(w.cache, b.manifest(name, sq_out)["tar_sha256"])
            for where, into in ((work, floors), (b.ram, ram_floors)):
                start = time.perf_counter()
                with open(tar, "rb") as stdin:
                    subprocess.run(["tar2sqfs", *writer.options(1_700_000_000), str(where / "floor.sqfs")],
                                   stdin=stdin, check=True)  # fmt: skip
                into.append(time.perf_counter() - start)
                (where / "floor.sqfs").unlink()
        size = (sq_out / "images" / f"{name}.squashfs").stat().st_size
        ext4_image = w.out / "images" / f"{name}.ext4"
        runtimes[name] = {
            "build_s": median(builds), "tar2sqfs_floor_s": median(floors), "ratio": median(builds) / median(floors),
            "tar2sqfs_ram_floor_s": median(ram_floors), "ram_ratio": median(builds) / median(ram_floors),
            "squashfs_mib": size / 2**20, "content_ratio": size / ext4["filesystem"]["content_bytes"],
            "ext4_ratio": size / ext4["size"],
            "ext4_start_copies_mib": ext4_image.stat().st_blocks * 512 / 2**20, "squashfs_start_copies_mib": 0,
        }  # fmt: skip
    return {"level": writer.LEVEL, "block_size": writer.BLOCK_SIZE, "runtimes": runtimes}


def boot(b: Bench) -> dict[str, Any]:
    """6. boot-to-smoke under QEMU (TCG), python, both formats, when a test kernel is at hand."""
    kernel_xz = SHARED / "kernel/vmlinux.xz"
    if b.args.no_boot or not kernel_xz.is_file() or not shutil.which("qemu-system-x86_64") or b.arch != "x86_64":
        return {"skipped": "no test kernel / QEMU (or --no-boot)"}
    import lzma

    kernel = b.work / "vmlinux"
    kernel.write_bytes(lzma.decompress(kernel_xz.read_bytes()))
    boots: dict[str, float] = {}
    b.images()
    for fmt, fmt_env in (("ext4", {}), ("squashfs", b.squashfs_world())):
        times = []
        for _ in range(b.args.runs):
            _, proc = b.build("boot", "--vmm", "qemu", "--accel", "tcg", "--kernel", str(kernel), "--format", fmt,
                              "python", **fmt_env)  # fmt: skip
            line = next(x for x in proc.stderr.splitlines() if "boot-to-smoke" in x)
            times.append(float(line.split("boot-to-smoke ")[1].split("s")[0]))
        boots[fmt] = median(times)
    return {"qemu_tcg_boot_to_smoke_s": boots, "firecracker": "not measurable here (nested KVM)"}


# -- the printed table: one function per figure, in the order of FIGURES ------------------------

ROW = "{:<44} {:>10} {:>10} {:>7}  {}"


def _s(x: float) -> str:
    return f"{x:.2f}s"


def noop_rows(n: dict[str, Any]) -> list[str]:
    return [ROW.format("no-op rootfs_all vs the same sessions empty", _s(n["rootfs_all_s"]), _s(n["empty_sessions_s"]),
                       f"{n['rootfs_all_s'] / n['empty_sessions_s']:.1f}x",
                       f"ours <= 0.3 s: {n['ours_s']:.2f} s beyond nox ({n['sessions']} sessions); "
                       f"{n['requests']} requests")]  # fmt: skip


def warm_rows(r: dict[str, Any]) -> list[str]:
    rt = r["runtimes"]
    rows = [ROW.format(f"warm rebuild {n} vs mke2fs -d alone", _s(v["build_s"]), _s(v["mke2fs_floor_s"]),
                       f"{v['ratio']:.2f}x", f"<= 1.5x (mke2fs writing in RAM: {v['mke2fs_ram_floor_s']:.2f} s, "
                       f"{v['ram_ratio']:.2f}x)") for n, v in rt.items()]  # fmt: skip
    rows += [ROW.format(f"size {n} ({v['files']} files)", f"{v['image_mib']:.0f}Mi", f"{v['content_mib']:.0f}Mi",
                        f"{v['size_ratio']:.2f}x", f"<= {v['size_target_mib']:.0f} MiB (1.15x content + 64); "
                        "seed: 512 MiB") for n, v in rt.items()]  # fmt: skip
    rows += [ROW.format(f"peak RSS building {n}", f"{v['peak_rss_mib']:.0f}Mi", "", "", "<= 200 MiB")
             for n, v in rt.items()]  # fmt: skip
    rows.append(ROW.format("peak RSS, rootfs --all assembling all at once", f"{r['all_at_once_peak_rss_mib']:.0f}Mi",
                           "", "", "<= 200 MiB"))  # fmt: skip
    return rows


def cold_rows(c: dict[str, Any]) -> list[str]:
    return [
        ROW.format("cold build, all three (parallel fetch)", _s(c["parallel_s"]), _s(c["serial_s"]),
                   f"{c['speedup']:.2f}x", f"serial/parallel ({c['link']})"),
        ROW.format("bytes fetched / unique bytes needed", c["bytes_fetched"], c["unique_bytes_needed"],
                   f"{c['fetch_ratio']:.2f}", "1.00"),
    ]  # fmt: skip


def agent_change_rows(a: dict[str, Any]) -> list[str]:
    rows = [ROW.format(f"agent changed: agent + the {n} image", _s(v["rebuild_s"]), _s(v["floor_s"]),
                       f"{v['ratio']:.2f}x", "<= 2x (floor: go build + mke2fs -d of the final tar)")
            for n, v in a["each"].items()]  # fmt: skip
    rows.append(ROW.format("agent changed: agent + all three images", _s(a["rebuild_s"]), _s(a["floor_s"]),
                           f"{a['ratio']:.2f}x", "<= 2x (floor: go build + mke2fs -d of the three final tars)"))  # fmt: skip
    return rows


def squashfs_rows(q: dict[str, Any]) -> list[str]:
    rt = q["runtimes"]
    rows = [ROW.format(f"warm squashfs {n} vs tar2sqfs alone", _s(v["build_s"]), _s(v["tar2sqfs_floor_s"]),
                       f"{v['ratio']:.2f}x", f"<= 1.3x (zstd {q['level']}, {q['block_size'] // 1024} KiB blocks; "
                       f"tar2sqfs writing in RAM: {v['tar2sqfs_ram_floor_s']:.2f} s, {v['ram_ratio']:.2f}x)")
            for n, v in rt.items()]  # fmt: skip
    rows += [ROW.format(f"squashfs size {n} / content, / ext4", f"{v['squashfs_mib']:.0f}Mi", "",
                        f"{v['content_ratio']:.2f}x", f"<= 0.35x content; {v['ext4_ratio']:.2f}x the ext4 image")
             for n, v in rt.items()]  # fmt: skip
    rows += [ROW.format(f"bytes a sandbox start copies, {n}", f"{v['squashfs_start_copies_mib']:.0f}Mi",
                        f"{v['ext4_start_copies_mib']:.0f}Mi", "",
                        "squashfs (read-only, shared) vs ext4 (a copy per sandbox)") for n, v in rt.items()]  # fmt: skip
    return rows


def boot_rows(bt: dict[str, Any]) -> list[str]:
    rows = [ROW.format(f"QEMU (TCG) boot-to-smoke, python, {fmt}", _s(secs), "", "", "")
            for fmt, secs in bt.get("qemu_tcg_boot_to_smoke_s", {}).items()]  # fmt: skip
    return [*rows, "Firecracker boot-to-ready: the userspace tests' summary (this host's KVM emulates guest kernel "
            "code: not a goal figure) and CI's boot job (a normal KVM)"]  # fmt: skip


def snapshot_rows(sn: dict[str, Any]) -> list[str]:
    if "skipped" in sn:
        return [f"snapshot load: skipped ({sn['skipped']})"]
    worst = sn["four_worst_ratio"]
    return [
        ROW.format(f"snapshot create, {sn['memory_mib']:.0f} MiB VM (Firecracker's PUT)", _s(sn["create_s"]), "", "", ""),
        ROW.format(f"snapshot load + resume, median of {sn['loads']}", f"{sn['load_ms']:.1f} ms", "", "", ""),
        ROW.format("  the same, by Firecracker's own log", f"{sn['firecracker_load_ms']:.1f} ms", "", "", ""),
        ROW.format("  4 at once: the slowest vs one alone", f"{max(sn['four_at_once_load_ms']):.1f} ms",
                   f"{sn['load_ms']:.1f} ms", f"{worst:.2f}x", "<= 2x"),
        ROW.format("  bytes copied by all those restores", str(sn["copied_bytes"]), "", "", "0"),
        "restore-to-first-result: the userspace tests' summary (emulating KVM) and CI's boot job (a normal KVM)",
    ]  # fmt: skip


def snapshot(b: Bench) -> dict[str, Any]:
    """9. snapshot load with the real Firecracker 1.12.1 of ../shared: a test-only snapshot of the
    python squashfs image (this machine's KVM never brings a guest to user space), restored 10
    times one at a time and once 4 at a time: PUT /snapshot/load with resume, as we wait for it
    and by Firecracker's own log."""
    real = SHARED / "firecracker-v1.12.1/x86_64/firecracker"
    kernel_xz = SHARED / "kernel/vmlinux.xz"
    if b.args.no_boot or b.arch != "x86_64" or not real.is_file() or not kernel_xz.is_file():
        return {"skipped": "no real Firecracker / test kernel here (or --no-boot)"}
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return {"skipped": "/dev/kvm is not usable"}
    import lzma

    env = b.squashfs_world()
    bin_dir = Path(env["VULCAN_OUT"]) / "bin"
    shutil.copy(real, bin_dir / "firecracker")
    (bin_dir / "vmlinux").write_bytes(lzma.decompress(kernel_xz.read_bytes()))
    made, _ = b.build("snapshot", "--test-only-before-ready", "--kernel", str(bin_dir / "vmlinux"), "python", **env)
    doc = json.loads((Path(env["VULCAN_OUT"]) / "images/snapshots/python.squashfs/snapshot.json").read_text())

    def restores(count: int) -> list[dict[str, Any]]:
        report = b.work / "restore.json"
        report.unlink(missing_ok=True)
        # exit 1 by design: a test-only snapshot is never handed out as a sandbox; the report says the rest
        subprocess.run([b.py, "-m", "scripts", "boot", "--restore", "--no-cold", "--count", str(count), "--format",
                        "squashfs", "--report", str(report), "python"], env={**b.env, **env}, cwd=ROOT,
                       capture_output=True, check=False)  # fmt: skip
        clones: list[dict[str, Any]] = json.loads(report.read_text())[0]["clones"]
        return clones

    single = [c for _ in range(10) for c in restores(1)]
    four = restores(4)
    loads = [c["load_ms"] for c in single if c["load_ms"] is not None]
    own = [c["firecracker_load_ms"] for c in single if c["firecracker_load_ms"] is not None]
    four_loads = [c["load_ms"] for c in four if c["load_ms"] is not None]
    return {
        "firecracker": "v1.12.1 (../shared)", "memory_mib": doc["files"]["memory"]["size"] / 2**20,
        "create_s": doc["create_seconds"], "snapshot_session_s": made,
        "load_ms": median(loads) if loads else None, "firecracker_load_ms": median(own) if own else None,
        "loads": len(loads), "four_at_once_load_ms": four_loads,
        "four_worst_ratio": max(four_loads) / median(loads) if loads and four_loads else None,
        "copied_bytes": sum(c["copied_bytes"] for c in [*single, *four]),
    }  # fmt: skip


def _oras_and_zstd(host: str, manifests: list[str], into: Path) -> tuple[float, float] | None:
    """The floor of a pull: ``oras pull`` of the manifests one after the other (it downloads and
    checks digests), then ``zstd -d --sparse`` of each image (what a host boots); the seconds of
    the first, and of both. None without oras-py or zstd."""
    try:
        import oras.client
    except ImportError:
        return None
    if shutil.which("zstd") is None:
        return None
    client = oras.client.OrasClient(hostname=host, insecure=True)
    start = time.monotonic()
    for digest in manifests:
        client.pull(target=f"{host}/bench/vulcan-images@{digest}", outdir=str(into / digest[7:19]))
    pulled = time.monotonic() - start
    for image in into.glob("*/*.ext4"):
        subprocess.run(["zstd", "-d", "-q", "-f", "--sparse", str(image), "-o", f"{image}.img"], check=True)
    return pulled, time.monotonic() - start


def registry(b: Bench) -> dict[str, Any]:
    """10. publish and pull of the three ext4 images through a real registry (Debian's
    docker-registry on 127.0.0.1): seconds, blob bytes on the wire / compressed size, the second
    publish and pull; our pull of the three (one command: what a host runs) against ``oras pull``
    + ``zstd -d --sparse`` of the same manifests, in turn, medians."""
    if shutil.which("docker-registry") is None:
        return {"skipped": "docker-registry is not installed"}
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from tests.support.registry import running_registry

    key = ed25519.Ed25519PrivateKey.generate()
    pem, pub = b.work / "signing.pem", b.work / "signing.pub"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))  # fmt: skip
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    out: dict[str, Any] = {}
    b.images()
    with running_registry(b.work / "registry") as reg:
        target = ["--to", f"{reg.host}/bench/vulcan-images", "--key", str(pem), "--insecure"]
        for label in ("first", "second"):
            digests = b.work / f"published-{label}.json"
            secs, _ = b.build("publish", *target, "--digests", str(digests))
            doc = json.loads(digests.read_text())
            out[f"publish_{label}_s"], out[f"publish_{label}_uploaded"] = secs, doc["uploaded_bytes"]
        out["payload_bytes"] = doc["payload_bytes"]
        out["image_bytes"] = sum((b.w.out / "images" / f"{n}.ext4").stat().st_size for n in RUNTIMES)
        refs = [e["reference"] for name, e in doc["published"].items() if name in RUNTIMES]
        manifests = [doc["published"][name]["manifests"][b.arch] for name in RUNTIMES]
        pull = ["pull", *refs, "--trust", str(pub), "--insecure"]
        ours, floor, floor_oras = [], [], []
        last = b.work / f"pulled-{b.args.runs - 1}"  # stays for the second pull
        for run in range(b.args.runs):  # ours and the floor in turn, each into a directory of its own
            dest = b.work / f"pulled-{run}"
            # each starts with what the one before wrote removed and the removal written out
            # (os.sync), not with the file system still at it: that fell on whichever ran next
            os.sync()
            secs, proc = b.build(*pull, "--dest", str(dest))
            ours.append(secs)
            line = next(x for x in proc.stderr.splitlines() if "received" in x)
            received = _bytes(line.split("received ")[1].split(" in ")[0])
            if dest != last:
                shutil.rmtree(dest)
            os.sync()
            floor_run = _oras_and_zstd(reg.host, manifests, b.work / f"oras-{run}")
            if floor_run is not None:
                floor_oras.append(floor_run[0])
                floor.append(floor_run[1])
            shutil.rmtree(b.work / f"oras-{run}", ignore_errors=True)
        out["pull_first_s"], out["pull_first_received"] = median(ours), received
        out["oras_pull_s"] = median(floor_oras) if floor_oras else None
        out["oras_and_zstd_s"] = median(floor) if floor else None
        secs, proc = b.build(*pull, "--dest", str(last))
        out["pull_second_s"] = secs
        out["pull_second_received"] = 0 if all("up to date" in x for x in proc.stderr.splitlines() if "pull" in x) \
            else -1  # fmt: skip
        # the same through a link with round trips (a delay line in front of the registry): what a
        # host far from its registry waits for is the round trips before the bytes flow
        out["link_rtt_ms"] = b.args.latency_ms
        with _delay_line(reg.host, b.args.latency_ms / 2000) as far:
            far_pull = ["pull", *[r.replace(reg.host, far) for r in refs], "--trust", str(pub), "--insecure"]
            ours, floor = [], []
            for run in range(b.args.runs):
                os.sync()
                ours.append(b.build(*far_pull, "--dest", str(b.work / f"far-{run}"))[0])
                shutil.rmtree(b.work / f"far-{run}")
                os.sync()
                floor_run = _oras_and_zstd(far, manifests, b.work / f"far-oras-{run}")
                if floor_run is not None:
                    floor.append(floor_run[1])
                shutil.rmtree(b.work / f"far-oras-{run}", ignore_errors=True)
            out["pull_far_s"], out["oras_and_zstd_far_s"] = median(ours), median(floor) if floor else None
    return out


@contextlib.contextmanager
def _delay_line(host: str, one_way_s: float) -> Iterator[str]:
    """``host:port`` of a delay line (bench/delayline.py) in front of ``host``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    line = subprocess.Popen([sys.executable, str(ROOT / "bench/delayline.py"), str(port), host.rsplit(":", 1)[1],
                             str(one_way_s)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert line.stdout is not None and line.stdout.readline().strip() == "ready"
        yield f"127.0.0.1:{port}"
    finally:
        line.kill()
        line.wait()


# a world of real packages (62 with their dependencies, ~38 MiB, meta packages included)
# mke2fs as e2fsprogs is: without the CRC-32C instruction and the I/O cache (formats/ext4_preload.py)
PLAIN_MKE2FS = {"VULCAN_MKE2FS_CRC32C": "0"}
REAL_WORLD = ["alpine-base", "openssh", "openssl", "e2fsprogs", "chrony", "dhcpcd", "doas", "wpa_supplicant",
              "tzdata", "wget", "gnutls", "ncurses-terminfo-base", "sfdisk", "partx", "iw", "tiny-cloud-alpine",
              "ppp-daemon", "libseccomp", "yx", "usb-modeswitch"]  # fmt: skip


def _real_apk(b: Bench) -> Any:
    """The real apk 2.14 of ../shared, or why it cannot be the floor here (a string)."""
    from tests.support import realapk

    if not realapk.ISO_INDEX.is_file() or b.arch != "x86_64":
        return "the real v3.19.1 repository (../shared) is absent, or this is not x86_64"
    if os.geteuid() != 0:
        return "real apk writes owners: run the benchmark as root"
    try:
        return realapk.real_apk()
    except BaseException as exc:  # pytest's skip, outside pytest
        return f"real apk does not run here: {exc}"


def apk_assembly(b: Bench) -> dict[str, Any]:
    """11. assembly from cached packages (VULCAN_REASSEMBLE=1: every package decompressed, merged,
    configured, the tar and the ext4 image written) against what the seed's method does with the
    same packages: real apk-tools 2.14 ``--initdb --no-scripts add`` into a directory (as root:
    apk writes owners), then ``mke2fs -t ext4 -d DIR``; the real v3.19.1 repository of ../shared."""
    from tests.support import realapk
    from tests.support.apkrepo import CDN

    apk = _real_apk(b)
    if isinstance(apk, str):
        return {"skipped": apk}
    w = World(b.mirror, b.work / "real", copy.deepcopy(BASE_PINS), b.work / "gocache")
    w.tmp.mkdir(parents=True, exist_ok=True)
    for f in (realapk.ISO / "x86_64").iterdir():
        b.mirror.add(f"{CDN}/v3.19/main/x86_64/{f.name}", f.read_bytes())
    keys = w.pins["alpine"]["keys"]
    for name, entry in keys.items():
        b.mirror.add(entry["url"], (realapk.KEYS / name).read_bytes())
    base = ["alpine-baselayout", "alpine-keys", "busybox", "busybox-binsh", "musl"]
    w.pins["alpine"] = {"mirror": CDN, "branch": "v3.19", "repositories": ["main"], "keys": keys, "base": base,
                        "headroom_mib": 16, "runtimes": {"real": {"world": REAL_WORLD, "check": ["true"],
                                                                  "binary": "/bin/busybox"}}}  # fmt: skip
    w.write_pins()
    env = {**b.env, **{k: v for k, v in w.env().items() if k.startswith("VULCAN_")}, "VULCAN_GO": b.go}
    if b.first_bin is not None:
        shutil.copytree(b.first_bin, w.out / "bin", dirs_exist_ok=True)
    else:  # run on its own (--only): the agent is built here
        timed([b.py, "-m", "scripts", "guest"], env)
    timed([b.py, "-m", "scripts", "rootfs", "--runtime", "real"], env)  # fetch, verify and cache the packages
    image = w.out / "images/real.ext4"
    size_mib = image.stat().st_size >> 20
    ours, plain, phases_runs, theirs, apk_only = [], [], [], [], []
    for i in range(max(b.args.runs, 5)):  # ours, ours with plain mke2fs, theirs: each sees the machine as it is then
        image.unlink()
        secs, proc = timed([b.py, "-m", "scripts", "rootfs", "--runtime", "real"],
                           {**env, "VULCAN_REASSEMBLE": "1", "VULCAN_TIMING": "json"})  # fmt: skip
        ours.append(secs)
        phases_runs.append(phases(proc.stderr))
        image.unlink()
        secs, _ = timed([b.py, "-m", "scripts", "rootfs", "--runtime", "real"],
                        {**env, "VULCAN_REASSEMBLE": "1", **PLAIN_MKE2FS})  # fmt: skip
        plain.append(secs)
        # in RAM, as our build writes its image there (apk into a directory on this machine's disk
        # takes 2-3x as long: the strict floor is the RAM one)
        root = b.ram / f"apkroot{i}"
        (root / "etc/apk").mkdir(parents=True)
        (root / "etc/apk/repositories").write_text(f"{realapk.ISO}\n")
        img = b.ram / f"apk{i}.ext4"
        start = time.perf_counter()
        done = apk.run("--initdb", "--no-scripts", "add", *base, *REAL_WORLD, root=root)
        mid = time.perf_counter()
        subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(root), str(img), f"{size_mib}M"], check=True,
                       capture_output=True)  # fmt: skip
        end = time.perf_counter()
        if done.returncode != 0:
            return {"skipped": f"real apk failed: {done.stderr[-300:]}"}
        theirs.append(end - start)
        apk_only.append(mid - start)
        shutil.rmtree(root)
        img.unlink()
    startup, _ = timed([b.py, "-c", "import scripts.rootfs.build"], env)  # a process start, for the figure's note
    manifest = json.loads((w.out / "images/real.manifest.json").read_text())
    packages = len(manifest["packages"])
    ratios = sorted(a / t for a, t in zip(ours, theirs, strict=True))
    plain_ratios = sorted(a / t for a, t in zip(plain, theirs, strict=True))
    return {"packages": packages, "image_mib": size_mib, "ours_s": median(ours), "apk_mke2fs_s": median(theirs),
            "apk_s": median(apk_only), "ratio": median(ours) / median(theirs), "python_start_s": startup,
            "range": [min(ours), max(ours)], "ratio_range": [ratios[0], ratios[-1]],
            "crc32c_instruction": any((w.cache / "tools").glob("ext2fs-crc32c-*.so")),
            "plain_mke2fs_s": median(plain), "plain_ratio": median(plain) / median(theirs),
            "plain_ratio_range": [plain_ratios[0], plain_ratios[-1]],
            "phases": median_phases(phases_runs)}  # fmt: skip


def _apk_repos(b: Bench) -> tuple[Path, Path]:
    """The mirror's synthetic main and community repositories written out as directories, and
    a keys directory trusting the bench's key: what real apk reads offline."""
    from tests.support import apkrepo

    repos, keys = b.work / "apk-repos", b.work / "apk-keys"
    keys.mkdir(exist_ok=True)
    (keys / apkrepo.KEY_NAME).write_bytes(apkrepo.public_pem())
    for repo in ("main", "community"):
        prefix = f"/dl-cdn.alpinelinux.org/alpine/v3.24/{repo}/{b.arch}/"
        (repos / repo / b.arch).mkdir(parents=True, exist_ok=True)
        for path, data in b.mirror.files.items():
            if path.startswith(prefix):
                (repos / repo / b.arch / path.rsplit("/", 1)[1]).write_bytes(data)
    return repos, keys


def _apk_floor(b: Bench, apk: Any, name: str, repos: Path, keys: Path, size_mib: int) -> float | str:
    """Seconds of real apk ``--initdb --no-scripts add`` of the runtime's world + ``mke2fs -d``
    of that directory, both in RAM; or why apk refused it."""
    world = [*imagerepo.BASE, *imagerepo.RUNTIMES[name]["world"]]
    root = b.ram / f"apkrt-{name}"
    shutil.rmtree(root, ignore_errors=True)
    (root / "etc/apk").mkdir(parents=True)
    (root / "etc/apk/repositories").write_text(f"{repos / 'main'}\n{repos / 'community'}\n")
    img = b.ram / f"apkrt-{name}.ext4"
    start = time.perf_counter()
    proc = apk.run("--initdb", "--no-scripts", "add", *world, root=root, keys=str(keys))
    if proc.returncode != 0:
        return f"real apk refused the {name} world: {(proc.stdout + proc.stderr)[-400:]}"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(root), str(img), f"{size_mib}M"], check=True,
                   capture_output=True)  # fmt: skip
    secs = time.perf_counter() - start
    shutil.rmtree(root)
    img.unlink()
    return secs


def apk_runtimes(b: Bench) -> dict[str, Any]:
    """12. the same comparison on the synthetic runtimes (50-200 MB): ours assembling from cached
    packages (VULCAN_REASSEMBLE=1) against real apk 2.14 ``--initdb --no-scripts add`` of the same
    world from the same repositories (written out as directories, the bench's key trusted) +
    ``mke2fs -d DIR``, both in RAM, one run of each in turn."""
    apk = _real_apk(b)
    if isinstance(apk, str):
        return {"skipped": apk}
    repos, keys = _apk_repos(b)
    out: dict[str, Any] = {}
    b.build("guest")
    for name in RUNTIMES:
        b.build("rootfs", "--runtime", name)  # the packages cached
        ours, theirs = [], []
        for _ in range(b.args.runs):
            (b.w.out / "images" / f"{name}.ext4").unlink(missing_ok=True)
            secs, _ = b.build("rootfs", "--runtime", name, VULCAN_REASSEMBLE="1")
            ours.append(secs)
            floor = _apk_floor(b, apk, name, repos, keys, b.manifest(name)["size"] >> 20)
            if isinstance(floor, str):
                return {"skipped": floor}
            theirs.append(floor)
        out[name] = {"ours_s": median(ours), "apk_mke2fs_s": median(theirs), "ratio": median(ours) / median(theirs),
                     "content_mib": b.manifest(name)["filesystem"]["content_bytes"] >> 20}  # fmt: skip
    return out


def cold_floor(b: Bench) -> dict[str, Any]:
    """13. the cold build of all three (nothing cached, fetch included, over the simulated link
    of figure 3) against its floor: downloading the same bytes (every URL our build fetched,
    ``curl --parallel`` with as many connections as our fetch uses) + real apk ``--initdb add`` +
    ``mke2fs -d`` of each runtime from those packages, one after the other."""
    apk = _real_apk(b)
    if isinstance(apk, str):
        return {"skipped": apk}
    if shutil.which("curl") is None:
        return {"skipped": "curl is not installed (the download floor)"}
    repos, keys = _apk_repos(b)
    w, mirror, args = b.w, b.mirror, b.args
    b.build("guest")
    base_url = w.env()["VULCAN_MIRROR"]
    ours, downloads, floors = [], [], []
    fetched = 0
    for _ in range(args.runs):
        shutil.rmtree(w.cache / "apk", ignore_errors=True)
        shutil.rmtree(w.cache / "keys", ignore_errors=True)
        shutil.rmtree(w.cache / "rootfs", ignore_errors=True)
        shutil.rmtree(w.out / "images", ignore_errors=True)
        mirror.latency_s, mirror.rate = args.latency_ms / 1000, args.mbps * 1e6 / 8
        n_before, before = len(mirror.requests), mirror.bytes_served
        secs, proc = b.build("rootfs", "--all")
        if proc.returncode != 0:
            return {"skipped": f"our cold build failed: {proc.stderr[-300:]}"}
        ours.append(secs)
        fetched = mirror.bytes_served - before
        paths = sorted({p for _, p, _ in mirror.requests[n_before:] if p in mirror.files})
        dest = b.work / "curl"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()
        config = b.work / "curl.conf"
        config.write_text("".join(f'url = "{base_url}{p}"\noutput = "{dest}/{i}"\n' for i, p in enumerate(paths)))
        start = time.perf_counter()
        subprocess.run(["curl", "--silent", "--fail", "--parallel", "--parallel-max", "4", "--config", str(config)],
                       check=True, capture_output=True)  # fmt: skip
        downloads.append(time.perf_counter() - start)
        mirror.latency_s = mirror.rate = 0.0
        total = 0.0
        for name in RUNTIMES:
            floor = _apk_floor(b, apk, name, repos, keys, b.manifest(name)["size"] >> 20)
            if isinstance(floor, str):
                return {"skipped": floor}
            total += floor
        floors.append(total)
    mirror.latency_s = mirror.rate = 0.0
    floor_s = median(downloads) + median(floors)
    return {"ours_s": median(ours), "download_s": median(downloads), "assembly_floor_s": median(floors),
            "floor_s": floor_s, "ratio": median(ours) / floor_s, "bytes": fetched, "range": [min(ours), max(ours)],
            "link": f"{args.latency_ms:.0f} ms latency, {args.mbps:.0f} Mbit/s per connection"}  # fmt: skip


def cold_floor_rows(r: dict[str, Any]) -> list[str]:
    if "skipped" in r:
        return [f"cold build vs download + real apk: skipped ({r['skipped']})"]
    return [
        ROW.format("cold build, all three, vs its floor", _s(r["ours_s"]), _s(r["floor_s"]), f"{r['ratio']:.2f}x",
                   "<= 1.2x download + real apk + mke2fs -d"),
        f"  floor: curl --parallel of the same {r['bytes'] >> 20} MiB {_s(r['download_s'])} + real apk --initdb add + "
        f"mke2fs -d of the three {_s(r['assembly_floor_s'])} ({r['link']}); ours {r['range'][0]:.2f}-"
        f"{r['range'][1]:.2f} s",
    ]  # fmt: skip


def apk_runtimes_rows(r: dict[str, Any]) -> list[str]:
    if "skipped" in r:
        return [f"assembly of the runtimes vs real apk: skipped ({r['skipped']})"]
    return [
        ROW.format(f"  the same, synthetic {name} ({v['content_mib']} MiB)", _s(v["ours_s"]), _s(v["apk_mke2fs_s"]),
                   f"{v['ratio']:.2f}x", "<= 1.0x")
        for name, v in r.items()
    ]  # fmt: skip


def _bytes(said: str) -> int:
    """``63.0 MiB`` (log.human) back to bytes, near enough for a ratio."""
    number, unit = said.split()
    return int(float(number) * {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[unit])


def registry_rows(r: dict[str, Any]) -> list[str]:
    if "skipped" in r:
        return [f"publish/pull: skipped ({r['skipped']})"]
    mib = 2**20
    wire = r["publish_first_uploaded"] / r["payload_bytes"]
    oras = r.get("oras_pull_s")
    return [
        ROW.format("publish 3 ext4 images (signed), first", _s(r["publish_first_s"]), "", "", ""),
        ROW.format("  blob bytes on the wire / compressed size", f"{r['publish_first_uploaded'] / mib:.0f}Mi",
                   f"{r['payload_bytes'] / mib:.0f}Mi", f"{wire:.2f}", "<= 1.05"),
        ROW.format("  compressed / the images' apparent size", f"{r['payload_bytes'] / mib:.0f}Mi",
                   f"{r['image_bytes'] / mib:.0f}Mi", f"{r['payload_bytes'] / r['image_bytes']:.2f}", ""),
        ROW.format("publish again: bytes uploaded, seconds", str(r["publish_second_uploaded"]),
                   _s(r["publish_second_s"]), "", "0 B, <= 0.3 s"),
        *([ROW.format("pull the 3 runtimes (verified, written sparse)", _s(r["pull_first_s"]),
                      _s(r["oras_and_zstd_s"]), f"{r['pull_first_s'] / r['oras_and_zstd_s']:.2f}x",
                      "<= 1.2x oras pull + zstd -d --sparse")]
          if r.get("oras_and_zstd_s") else []),
        *([ROW.format("  vs oras pull alone (compressed, not usable yet)", _s(r["pull_first_s"]), _s(oras),
                      f"{r['pull_first_s'] / oras:.2f}x", "")] if oras else []),
        ROW.format("  bytes received / compressed size", f"{r['pull_first_received'] / mib:.0f}Mi",
                   f"{r['payload_bytes'] / mib:.0f}Mi", f"{r['pull_first_received'] / r['payload_bytes']:.2f}", ""),
        ROW.format("pull again: bytes received, seconds", str(r["pull_second_received"]),
                   _s(r["pull_second_s"]), "", "0 B, <= 0.3 s"),
        *([ROW.format(f"pull the 3 over a link of {r['link_rtt_ms']:.0f} ms round trips", _s(r["pull_far_s"]),
                      _s(r["oras_and_zstd_far_s"]), f"{r['pull_far_s'] / r['oras_and_zstd_far_s']:.2f}x",
                      "oras pull + zstd -d --sparse through the same delay line")]
          if r.get("oras_and_zstd_far_s") else []),
    ]  # fmt: skip


def apk_assembly_rows(r: dict[str, Any]) -> list[str]:
    if "skipped" in r:
        return [f"assembly vs real apk: skipped ({r['skipped']})"]
    return [
        ROW.format(f"assembly from cached packages ({r['packages']} real pkgs)", _s(r["ours_s"]),
                   _s(r["apk_mke2fs_s"]), f"{r['ratio']:.2f}x", "<= 1.0x real apk --initdb add + mke2fs -d"),
        f"  ours {r['range'][0]:.2f}-{r['range'][1]:.2f} s over the runs, each against the apk run beside it "
        f"{r['ratio_range'][0]:.2f}-{r['ratio_range'][1]:.2f}x (a Python start is {r['python_start_s']:.2f} s "
        f"of it); real apk alone {r['apk_s']:.2f} s; phases: "
        + ", ".join(f"{k} {v:.2f}" for k, v in r["phases"].items()),
        ROW.format("  the same, mke2fs without our helper", _s(r["plain_mke2fs_s"]),
                   _s(r["apk_mke2fs_s"]), f"{r['plain_ratio']:.2f}x",
                   f"(VULCAN_MKE2FS_CRC32C=0; each run: {r['plain_ratio_range'][0]:.2f}-"
                   f"{r['plain_ratio_range'][1]:.2f}x)"),
    ]  # fmt: skip


@dataclass(frozen=True)
class Figure:
    key: str  # its place in bench/results/latest.json
    measure: Callable[[Bench], dict[str, Any]]  # run in this table's order: later figures use earlier ones' state
    rows: Callable[[dict[str, Any]], list[str]]  # its lines of the printed table, in this order too


FIGURES = (
    Figure("cold", cold, cold_rows),
    Figure("noop", noop, noop_rows),
    Figure("warm", warm, warm_rows),
    Figure("agent_change", agent_change, agent_change_rows),
    Figure("squashfs", squashfs, squashfs_rows),
    Figure("boot", boot, boot_rows),
    Figure("snapshot", snapshot, snapshot_rows),
    Figure("registry", registry, registry_rows),
    Figure("apk_assembly", apk_assembly, apk_assembly_rows),
    Figure("apk_runtimes", apk_runtimes, apk_runtimes_rows),
    Figure("cold_floor", cold_floor, cold_floor_rows),
)


def report(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"machine: {m['cpus']} CPUs, {m['platform']}, Python {m['python']}, e2fsprogs {m['e2fsprogs']}; "
        f"medians of {r['runs']} runs",
        "",
        ROW.format("figure", "ours", "floor", "ratio", "target"),
    ]
    for f in FIGURES:
        lines += f.rows(r[f.key])
    lines += ["", "where the time goes (the build's own phases, VULCAN_TIMING=json; medians, seconds):"]
    for name, ph in r["warm"]["phases"].items():
        lines.append(f"  warm {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in ph.items()))
    lines.append(
        "  agent change, all three: " + ", ".join(f"{k} {v:.2f}" for k, v in r["agent_change"]["phases"].items())
    )
    return "\n".join(lines)


def setup(args: argparse.Namespace) -> Bench:
    """The mirror with the synthetic runtimes, the pins and the environment every build runs in."""
    nox = shutil.which("nox")
    go = shutil.which("go") or next(iter(sorted(Path("/usr/lib").glob("go-*/bin/go"))), None)
    if nox is None or go is None:
        raise SystemExit("bench: needs nox and a Go toolchain (see README set-up)")
    arch = "x86_64" if platform.machine() in ("x86_64", "amd64") else "aarch64"
    mirror, _server = serve()
    work = Path(tempfile.mkdtemp(prefix="vulcan-bench-"))
    w = World(mirror, work, copy.deepcopy(BASE_PINS), work / "gocache")
    Apks(ROOT / "bench/.cache").publish(mirror, arch)  # first: it fixes the signing key
    rts = {name: dict(imagerepo.RUNTIMES[name]) for name in RUNTIMES}
    w.pins["alpine"] = imagerepo.alpine_pins(rts, imagerepo.BASE, ["main", "community"])
    w.write_pins()
    env = {**w.env(), "VULCAN_GO": str(go), "CI": "1"}
    # Measure what a user's machine does: Python keeps compiled bytecode. (Some hosts, this
    # workplace's among them, set PYTHONDONTWRITEBYTECODE=1: ~30 ms of compiling per process.)
    dont_write_bytecode = env.pop("PYTHONDONTWRITEBYTECODE", None)
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "e2fsprogs": subprocess.run(["mke2fs", "-V"], capture_output=True, text=True).stderr.split()[1],
            "PYTHONDONTWRITEBYTECODE": f"{dont_write_bytecode} on this host, unset for the runs"
            if dont_write_bytecode
            else "unset",
        },
        "runs": args.runs,
    }
    return Bench(args, w, mirror, env, nox, str(go), arch, work, ram_work(), results)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    ap.add_argument("--runs", type=int, default=3, help="runs per figure (median; default 3)")
    ap.add_argument(
        "--latency-ms",
        type=float,
        default=30.0,
        help="simulated latency per request (cold builds; the registry's delay line: its round trip)",
    )
    ap.add_argument("--mbps", type=float, default=200.0, help="simulated bandwidth per connection, Mbit/s")
    ap.add_argument("--no-boot", action="store_true")
    ap.add_argument("--only-setup", action="store_true", help="build once, print the environment, keep it (profiling)")
    ap.add_argument(
        "--only", metavar="FIGURE", help="measure this figure alone (apk_assembly, apk_runtimes, cold_floor, ...)"
    )
    b = setup(ap.parse_args())
    try:  # the work directory and the RAM one (in /dev/shm: it would hold the RAM until a reboot) go
        return _measure(b)  # however the run ends, Ctrl-C of --only-setup included
    finally:
        shutil.rmtree(b.work, ignore_errors=True)
        shutil.rmtree(b.ram, ignore_errors=True)


def _measure(b: Bench) -> int:
    if b.args.only_setup:
        subprocess.run([b.py, "-m", "scripts", "guest"], env=b.env, cwd=ROOT, check=True, capture_output=True)
        b.build("rootfs", "--all")
        print("\n".join(f"export {k}={v}" for k, v in b.env.items() if k.startswith("VULCAN_")))
        print(f"# mirror stays up while this process runs; Ctrl-C to stop ({b.work})")
        time.sleep(3600)
        return 0
    if b.args.only:
        [f] = [f for f in FIGURES if f.key == b.args.only]
        print("\n".join(f.rows(f.measure(b))))
        return 0
    for f in FIGURES:
        b.results[f.key] = f.measure(b)
    out = ROOT / "bench/results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(b.results, indent=1) + "\n")
    print(report(b.results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
