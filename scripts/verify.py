"""`nox -s verify`: is what is in bin/ and images/ exactly what the pins say?

Prints a table (artifact, check, result, detail) and exits non-zero if any check fails;
``--json`` for CI; ``--reproduce`` rebuilds the images in a scratch directory and compares.
Images are read without mounting: debugfs and e2fsck for ext4, sqfs2tar and rdsquashfs for squashfs."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import formats, kconfig, log, paths, settings, stamps
from .arch import ARCHES, host_arch
from .elf import check_static_binary, kernel_arch, read_elf
from .errors import BuildError, VulcanError
from .hashing import sha256_file
from .pins import Pins
from .pins import load as load_pins
from .rootfs import AGENT, OVERLAY_INIT
from .run import run_tool
from .steps import prog


@dataclass
class Row:
    artifact: str
    check: str
    result: str  # pass, FAIL, warn, skip, missing
    detail: str = ""


class Report:
    def __init__(self) -> None:
        self.rows: list[Row] = []

    def add(self, artifact: str, check: str, ok: bool | None, detail: str = "") -> bool:
        self.rows.append(Row(artifact, check, "pass" if ok else "skip" if ok is None else "FAIL", detail))
        return bool(ok)

    def same(self, artifact: str, check: str, actual: str, want: str | None) -> bool:
        """A sha256 comparison: the actual value, and the expected one when they differ."""
        return self.add(artifact, check, actual == want, actual if actual == want else f"{actual} != {want}")

    def warn(self, artifact: str, check: str, detail: str) -> None:
        """Worth a user's attention, not a failure."""
        self.rows.append(Row(artifact, check, "warn", detail))

    def missing(self, artifact: str, hint: str) -> None:
        self.rows.append(Row(artifact, "exists", "missing", hint))

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.result == "FAIL"]

    def table(self) -> str:
        widths = [max(len(getattr(r, f)) for r in [Row("artifact", "check", "result"), *self.rows])
                  for f in ("artifact", "check", "result")]  # fmt: skip
        lines = []
        for r in [Row("artifact", "check", "result", "detail"), *self.rows]:
            lines.append(
                f"{r.artifact:<{widths[0]}}  {r.check:<{widths[1]}}  {r.result:<{widths[2]}}  {r.detail}".rstrip()
            )
        return "\n".join(lines)


def recorded(f: Path, stamp: Path) -> tuple[str | None, str]:
    """The sha256 the step that wrote ``f`` recorded, or the pull that placed it (registry/pull.py);
    None, and why, when there is none worth comparing (a file a pull placed with --no-verify: no
    trusted key vouched for it)."""
    found = stamps.output_sha256(stamp, paths.rel(f))
    if found is not None:
        return found, ""
    placed = pulled(f)
    if placed is None or not isinstance(placed.get("sha256"), str):
        return None, "no record of it"
    if not placed.get("signed_by"):
        return None, UNVERIFIED
    return placed["sha256"], ""


UNVERIFIED = "placed by 'pull --no-verify': no trusted key vouched for it"


def pulled(f: Path) -> dict[str, Any] | None:
    """What the pull that placed ``f`` recorded of it (registry/pull.py), or None."""
    try:
        placed = json.loads(paths.stamp_path(f.parent, "pull").read_text())["outputs"][f.name]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None
    return placed if isinstance(placed, dict) else None


def same_as_recorded(rep: Report, f: Path, stamp: Path) -> None:
    want, why = recorded(f, stamp)
    actual = sha256_file(f)
    if want is None:
        rep.add(paths.rel(f), "sha256 = stamp", False, f"{actual}: {why}")
    else:
        rep.same(paths.rel(f), "sha256 = stamp", actual, want)


def check_vmm(rep: Report, pins: Pins, arch: str) -> None:
    b = paths.bin_dir(arch)
    stamp = paths.stamp_path(b, "download")
    for name in ("firecracker", "jailer"):
        f = paths.vmm(arch, name)
        if not f.is_file():
            rep.missing(paths.rel(f), "run 'nox -s download'")
            continue
        same_as_recorded(rep, f, stamp)
        try:
            machine = read_elf(f).machine
            rep.add(paths.rel(f), "ELF machine", machine == arch, machine)
        except BuildError as exc:
            rep.add(paths.rel(f), "ELF machine", False, exc.message)
        emulator = emulator_for(arch)
        if emulator is not None:
            try:
                proc = run_tool([*emulator, f, "--version"], check=False, quiet=True, timeout=60)
                out = (proc.stdout or proc.stderr).decode(errors="replace")
            except VulcanError as exc:
                proc, out = None, exc.message
            first = out.strip().splitlines()[:1]
            want = pins.firecracker.version
            ok = proc is not None and proc.returncode == 0 and bool(first) and want in first[0]
            rep.add(paths.rel(f), "--version", ok, " ".join(first))
        else:
            rep.add(
                paths.rel(f),
                "--version",
                None,
                f"cannot run {arch} binaries on {host_arch()}: install qemu-user-static",
            )
    k = paths.kernel(arch)
    if not k.is_file():
        rep.missing(paths.rel(k), "run 'nox -s download'")
    else:
        rep.same(paths.rel(k), "sha256 = pins", sha256_file(k), pins.kernel.sha256_for(arch))
        found = kernel_arch(k)
        kind = "ELF vmlinux" if arch == "x86_64" else "arm64 Image"
        rep.add(paths.rel(k), f"is an {kind}", found == arch, f"looks like {found or 'neither'}")
        check_kernel_config(rep, k, pins)


def check_kernel_config(rep: Report, kernel: Path, pins: Pins) -> None:
    """Can this kernel mount every image format the pins ask for (its embedded configuration)?"""
    formats = sorted({f for rt in pins.alpine.runtimes for f in pins.alpine.formats_of(rt)})
    config = kconfig.read(kernel)
    check = f"config can mount {', '.join(formats)}"
    if config is None:
        rep.add(paths.rel(kernel), check, None, "no embedded configuration (CONFIG_IKCONFIG): cannot tell")
        return
    lacking = kconfig.missing(config, formats)
    rep.add(paths.rel(kernel), check, not lacking, f"lacks {', '.join(lacking)}" if lacking else "all options built in")
    for risk in kconfig.risky(config):
        rep.warn(paths.rel(kernel), "config for sandboxes", risk)


def check_guest(rep: Report, arch: str) -> None:
    g = paths.agent(arch)
    if not g.is_file():
        rep.missing(paths.rel(g), "run 'nox -s guest'")
        return
    try:
        check_static_binary(g, arch)
        rep.add(paths.rel(g), f"static {arch} ELF", True)
    except BuildError as exc:
        rep.add(paths.rel(g), f"static {arch} ELF", False, exc.message)
    same_as_recorded(rep, g, paths.stamp_path(g.parent, "guest"))


def check_image(rep: Report, pins: Pins, runtime: str, fmt: str, arch: str) -> str | None:
    """Check one image; its sha256 if it passed the checks that make a rebuild worth comparing."""
    img, man = paths.image(runtime, fmt, arch), paths.manifest(runtime, arch)
    name = paths.rel(img)
    if not img.is_file():
        rep.missing(name, f"run 'nox -s rootfs-{runtime}'")
        return None
    try:
        manifest: dict[str, Any] = json.loads(man.read_text())
    except (OSError, ValueError) as exc:
        rep.add(name, "manifest", False, f"{paths.rel(man)}: {exc}")
        return None
    record = formats.get(fmt)
    # a manifest of one image (before formats) describes the default format
    listed = {i["format"]: i for i in manifest.get("images", [])} or {formats.DEFAULT[0]: manifest}
    actual = sha256_file(img)
    rep.add(name, "sha256 = manifest", actual == listed.get(fmt, {}).get("sha256"), actual)
    placed = pulled(img)
    if placed is not None:
        signer = placed.get("signed_by")
        rep.add(name, "pulled signed", bool(signer) and placed.get("sha256") == actual,
                UNVERIFIED if not signer else f"by {signer}" if placed.get("sha256") == actual
                else f"changed since the pull placed {placed.get('sha256')}")  # fmt: skip
    try:
        record.writer.check(img, deep=True)
        rep.add(name, record.check_name, True, "clean")
    except BuildError as exc:
        rep.add(name, record.check_name, False, exc.message.splitlines()[-1][:200])
        return None
    reader = record.reader
    guest = paths.agent(arch)
    template = isinstance(manifest.get("template"), dict)
    try:  # a template's paths may go through its symlinks (a merged /usr: sbin -> usr/sbin)
        agent_path = resolve_in_image(reader, img, AGENT) if template else AGENT
        runtime_bin = resolve_in_image(reader, img, manifest.get("binary", "").lstrip("/"))
    except VulcanError as exc:
        rep.add(name, "files readable", False, exc.message.splitlines()[0][:200])
        return None
    files = {p: size for pkg in manifest.get("packages", []) for p, size in pkg.get("files", {}).items()}
    wanted = sorted({agent_path, "work", "sbin/init", "etc/inittab", runtime_bin, *files})
    try:
        st = reader.stat_many(img, wanted)
    except VulcanError as exc:
        rep.add(name, "files readable", False, exc.message.splitlines()[0][:200])
        return None
    a = st.get(agent_path)
    if a is None or a.kind != "regular" or not a.mode & 0o111:
        rep.add(name, "agent present, executable", False, f"/{agent_path}: {a.kind if a else 'missing'}")
    else:
        inside = reader.cat(img, agent_path)
        same = guest.is_file() and inside == guest.read_bytes()
        detail = "byte-identical to bin/vulcan-guest" if same else "differs from bin/vulcan-guest"
        rep.add(name, "agent = bin/vulcan-guest", same, detail if guest.is_file() else "bin/vulcan-guest missing")
    w = st.get("work")
    rep.add(name, "/work is a directory", bool(w and w.kind == "directory"), f"uid {w.uid}" if w else "missing")
    if template:  # no init system: the agent is PID 1, and overlay-init of a read-only root
        ends = {p: resolve_in_image(reader, img, p) for p in ("sbin/init", OVERLAY_INIT)}
        wrong = [f"/{p} leads to /{e}" for p, e in ends.items() if e != agent_path]
        rep.add(name, "/sbin/init starts the agent", not wrong,
                "the agent is /sbin/init and overlay-init" if not wrong else "; ".join(wrong))  # fmt: skip
    else:
        init = st.get("sbin/init")
        inittab = reader.cat(img, "etc/inittab").decode(errors="replace") if st.get("etc/inittab") else ""
        starts = init is not None and f"/{AGENT}" in inittab and "respawn" in inittab
        why = (
            "busybox init, inittab respawns the agent"
            if starts
            else f"/sbin/init {'present' if init else 'missing'}; inittab {'lacks' if inittab else 'missing'} the agent"
        )
        rep.add(name, "/sbin/init starts the agent", starts, why)
    rb = st.get(runtime_bin)
    rep.add(name, "runtime binary present", rb is not None, f"/{runtime_bin}")
    bad = []
    for p, size in files.items():
        found = st.get(p)
        if found is None or found.size != size:
            bad.append(f"/{p} ({'missing' if found is None else f'{found.size} bytes, packaged {size}'})")
    rep.add(name, "package files intact", not bad, f"{len(files)} files" if not bad else f"{len(bad)} wrong: {bad[:5]}")
    if template:
        check_layer_contents(rep, img, reader, manifest, pins, runtime, arch)
    else:
        check_package_contents(rep, img, reader, manifest, pins, runtime, arch)
    check_runtime_runs(rep, img, reader, manifest, arch)
    return actual


def resolve_in_image(reader: Any, img: Path, path: str) -> str:
    """``path`` with every symlink on the way followed inside the image (as the guest's kernel
    would, absolute links from the image's root); the path itself when a part is missing."""
    done: list[str] = []
    todo = [p for p in path.split("/") if p]
    for _ in range(64):
        if not todo:
            return "/".join(done)
        part = todo.pop(0)
        if part in (".", ""):
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        here = "/".join([*done, part])
        st = reader.stat_many(img, [here]).get(here)
        if st is None or st.kind != "symlink":
            done.append(part)
            if st is None:
                return "/".join([*done, *todo])
            continue
        target = st.target or reader.cat(img, here).decode("utf-8", "surrogateescape")  # a slow ext4 link
        if target.startswith("/"):
            done = []
        todo = [p for p in target.split("/") if p] + todo
    return path  # a loop of links: what the checks then find missing


def check_layer_contents(rep: Report, img: Path, reader: Any, manifest: dict[str, Any], pins: Pins, runtime: str,
                         arch: str) -> None:  # fmt: skip
    """A template's every file its package database lists holds the bytes the image's layers
    give it: the layers are taken by digest (the cache, else the registry; checked as a build
    does), applied again and each file's sha256 compared. Nothing the build cached is believed."""
    from .template.assemble import flattened
    from .template.lock import locked

    name, check = paths.rel(img), "package files = layers"
    image = locked(pins, runtime, arch)
    if image is None:
        rep.add(name, check, None, f"no current lock entry for {runtime}/{arch} to fetch the layers by: nox -s lock")
        return
    if image.manifest != manifest["template"].get("manifest"):
        rep.add(name, check, False, "the image's manifest names another image than the lock: rebuild it")
        return
    files = {p for pkg in manifest.get("packages", []) for p in pkg.get("files", {})}
    try:
        with tempfile.TemporaryDirectory(prefix="vulcan-verify-") as tmp:
            want = flattened(image, Path(tmp), files)
    except VulcanError as exc:
        rep.add(name, check, None, f"the layers could not be fetched to compare: {exc.message[:160]}")
        return
    have = reader.digests(img, set(want))
    bad = [f"/{p}" for p, digest in sorted(want.items()) if have.get(p) != digest]
    detail = f"{len(want)} files, sha256 each"
    rep.add(name, check, not bad, detail if not bad else f"{len(bad)} differ from the layers: {bad[:5]}")


def check_package_contents(rep: Report, img: Path, reader: Any, manifest: dict[str, Any], pins: Pins, runtime: str,
                           arch: str) -> None:  # fmt: skip
    """Every file the manifest says a package installed holds that package's bytes, as the
    package itself has them: the locked packages are fetched (or taken from the cache) and
    verified against the lock and their signatures, as a build does, and each file's sha256 is
    compared. Nothing the build cached is believed: a cached stream another user edited fails here."""
    from .apk.lockfile import locked_entry
    from .apk.packages import fetch_all

    name, check = paths.rel(img), "package files = packages"
    closure = locked_entry(pins, runtime, arch)
    if closure is None:
        rep.add(name, check, None, f"no current lock entry for {runtime}/{arch} to fetch the packages by: nox -s lock")
        return
    rows = {p.get("name"): p for p in manifest.get("packages", []) if isinstance(p, dict)}
    if {(n, r.get("checksum")) for n, r in rows.items()} != {(p.name, p.checksum) for p in closure}:
        rep.add(name, check, False, "the image's manifest lists other packages than the lock: rebuild it")
        return
    try:
        verified = fetch_all(pins, closure, arch, runtime)
    except VulcanError as exc:
        rep.add(name, check, None, f"the packages could not be fetched to compare: {exc.message[:160]}")
        return
    want: dict[str, str] = {}
    unmatched = []
    for v, p in zip(verified, closure, strict=True):
        contents = package_digests(v.path, v.data_offset)
        for path in rows[p.name].get("files", {}):
            if path in contents:
                want[path] = contents[path]
            else:
                unmatched.append(path)  # written through a symlink of the tree: where it went is the tree's
    have = reader.digests(img, set(want))
    bad = [f"/{p}" for p, digest in sorted(want.items()) if have.get(p) != digest]
    detail = f"{len(want)} files, sha256 each" + (f" ({len(unmatched)} not compared)" if unmatched else "")
    rep.add(name, check, not bad, detail if not bad else f"{len(bad)} differ from their package: {bad[:5]}")


def package_digests(apk: Path, data_offset: int) -> dict[str, str]:
    """The sha256 (hex) of each regular file (and hard link) in a verified package's data tar."""
    out: dict[str, str] = {}
    with open(apk, "rb") as f:
        f.seek(data_offset)
        with gzip.GzipFile(fileobj=f) as gz, tarfile.open(fileobj=gz, mode="r|") as tar:
            for m in tar:
                path = "/".join(p for p in m.name.split("/") if p not in ("", "."))
                if m.isreg():
                    data = tar.extractfile(m)
                    out[path] = hashlib.file_digest(data, "sha256").hexdigest() if data else ""  # type: ignore[arg-type]
                elif m.islnk():
                    target = "/".join(p for p in m.linkname.split("/") if p not in ("", "."))
                    if target in out:
                        out[path] = out[target]
    return out


def check_runtime_runs(rep: Report, img: Path, reader: Any, manifest: dict[str, Any], arch: str) -> None:
    """Run the runtime check from the image's own files, through its musl loader (no root);
    another architecture's under qemu-user (Debian: qemu-user-static)."""
    name = paths.rel(img)
    emulator = emulator_for(arch)
    if emulator is None:
        rep.add(name, "runtime runs", None, f"cannot run {arch} code on {host_arch()}: install qemu-user-static")
        return
    with tempfile.TemporaryDirectory(prefix="vulcan-verify-") as tmp:
        root = Path(tmp)
        binary = manifest.get("binary", "").lstrip("/")
        dirs = ["lib", "usr/lib", Path(binary).parent.as_posix()]
        if isinstance(manifest.get("template"), dict):  # glibc's places too, through a merged /usr's links
            dirs = _linked_dirs(reader, img, root, [*dirs, "lib64", "usr/lib64"])
        missing = reader.rdump(img, dirs, root)
        if missing:
            rep.add(name, "runtime runs", False, f"/{missing[0]} could not be copied out of the image")
            return
        target = _resolve_in(root, binary)
        if target is None or not target.is_file():
            rep.add(name, "runtime runs", False, f"/{binary} could not be read from the image")
            return
        head = target.read_bytes()[:4]
        if head != b"\x7fELF":
            rep.add(name, "runtime runs", None, f"/{binary} is a script: it needs the image's whole root to run")
            return
        loaders = sorted((root / "lib").glob("ld-musl-*.so.1"))
        info = read_elf(target)
        argv = [str(target), *manifest.get("check", [])[1:]]
        own = _resolve_in(root, info.interpreter_path.lstrip("/")) if info.interpreter_path else None
        if info.interpreter and own is not None and "musl" not in own.name:  # glibc's ld.so (a template)
            triplet = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}[arch]
            libdirs = ("lib", "usr/lib", "lib64", "usr/lib64", f"lib/{triplet}", f"usr/lib/{triplet}")
            libpath = ":".join(str(root / d) for d in libdirs if (root / d).is_dir())
            argv = [str(own), "--library-path", libpath, *argv]
        elif info.interpreter:
            if not loaders:
                rep.add(name, "runtime runs", False, "dynamic binary but no /lib/ld-musl-*.so.1 in the image")
                return
            libpath = ":".join(str(root / d) for d in ("lib", "usr/lib"))
            argv = [str(loaders[0]), "--library-path", libpath, *argv]
        try:
            proc = run_tool([*emulator, *argv], check=False, quiet=True, timeout=120, cwd=tmp)
        except (OSError, VulcanError) as exc:
            rep.add(name, "runtime runs", False, f"{exc}")
            return
        out = (proc.stdout or proc.stderr).decode(errors="replace").strip().splitlines()[:1]
        how = f" (under {Path(emulator[0]).name})" if emulator else ""
        rep.add(name, "runtime runs", proc.returncode == 0,
                f"{' '.join(manifest.get('check', []))}: {' '.join(out)}{how}")  # fmt: skip


def _linked_dirs(reader: Any, img: Path, root: Path, dirs: list[str]) -> list[str]:
    """The directories to copy out for ``dirs``: each where its symlinks lead (those that
    exist), the links themselves made in ``root`` (lib -> usr/lib), as the image has them."""
    out = []
    for d in dict.fromkeys(dirs):
        real = resolve_in_image(reader, img, d)
        st = reader.stat_many(img, [real]).get(real)
        if st is None or st.kind != "directory":
            continue
        out.append(real)
        if real != d:
            link = root / d
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink() and not link.exists():
                link.symlink_to(os.path.relpath(root / real, link.parent))
    return out


QEMU_USER = {"x86_64": ("qemu-x86_64-static", "qemu-x86_64"), "aarch64": ("qemu-aarch64-static", "qemu-aarch64")}


def emulator_for(arch: str) -> list[str] | None:
    """[] for this host's code, [qemu-user] for another architecture's, None if it cannot run."""
    if arch == host_arch():
        return []
    found = next((shutil.which(q) for q in QEMU_USER[arch] if shutil.which(q)), None)
    return [found] if found else None


def _resolve_in(root: Path, rel: str, depth: int = 0) -> Path | None:
    p = root / rel
    if depth > 20:
        return None
    if p.is_symlink():
        target = os.readlink(p)
        nxt = (
            target.lstrip("/")
            if target.startswith("/")
            else os.path.normpath(os.path.join(os.path.dirname(rel), target))
        )
        return _resolve_in(root, nxt, depth + 1)
    return p if p.exists() else None


def check_reproduce(rep: Report, runtime: str, arch: str, published: dict[str, str]) -> None:
    """Rebuild the runtime's images once, in a scratch output directory, and compare each
    format's sha256 with the published one (``published``: format -> sha256)."""
    with tempfile.TemporaryDirectory(prefix="vulcan-reproduce-") as tmp:
        shutil.copytree(paths.bin_dir(arch), Path(tmp) / paths.bin_dir(arch).relative_to(paths.out_root()))
        env = settings.environ(VULCAN_OUT=tmp, VULCAN_REASSEMBLE="1")  # from the packages, not a cached stream
        proc = run_tool(
            [sys.executable, "-m", "scripts", "rootfs", "--runtime", runtime, "--arch", arch, "--frozen"],
            cwd=Path(__file__).resolve().parent.parent, env=env, check=False, quiet=True,
        )  # fmt: skip
        lines = proc.stderr.decode(errors="replace").strip().splitlines() or ["(no output)"]
        for fmt, digest in published.items():
            name = paths.rel(paths.images_dir(arch) / f"{runtime}.{fmt}")
            if proc.returncode != 0:
                rep.add(name, "--reproduce", False, lines[-1][:200])
                continue
            again = sha256_file(Path(tmp) / paths.images_dir(arch).relative_to(paths.out_root()) / f"{runtime}.{fmt}")
            detail = f"rebuilt {again}" + ("" if again == digest else f" != {digest}")
            rep.add(name, "--reproduce", again == digest, detail)


def check_snapshots(rep: Report, arch: str) -> None:
    """Each snapshot in images/snapshots/: its files as snapshot.json records them, its binding
    against this host (a new image, kernel or Firecracker makes it stale: the field is named),
    and a kernel that reseeds its RNG on restore."""
    from .vm import snapshot

    top = paths.images_dir(arch) / "snapshots"
    dirs = sorted(d for d in top.glob("*.*") if d.is_dir() and not d.name.startswith(".")) if top.is_dir() else []
    kernel = paths.kernel(arch)
    for d in dirs:
        name = paths.rel(d)
        try:
            doc = snapshot.load(d)
        except VulcanError as exc:
            rep.add(name, "snapshot.json", False, exc.message)
            continue
        b = doc["binding"]
        bad = [f"{n}: {why}" for n, why in snapshot.file_problems(d, doc).items()]
        rep.add(name, "files = snapshot.json", not bad, "; ".join(bad) or ", ".join(sorted(doc.get("files", {}))))
        runtime, fmt = str(b.get("runtime")), str(b.get("format"))
        if not kernel.is_file() or not paths.image(runtime, fmt, arch).is_file():
            rep.add(name, "binding = this host", False, f"{paths.rel(kernel)} or the {runtime}.{fmt} image is missing")
            continue
        try:
            wrong = snapshot.disagreements(b, runtime, fmt, arch, kernel)
        except VulcanError as exc:
            rep.add(name, "binding = this host", False, exc.message)
            continue
        rep.add(name, "binding = this host", not wrong,
                "stale: " + "; ".join(wrong) + " (nox -s snapshot makes it again)" if wrong
                else f"{b.get('firecracker_version')}, image and kernel as built, this CPU")  # fmt: skip
        if not b.get("ready"):
            rep.warn(name, "ready", f"a test-only snapshot ({snapshot.TEST_ONLY_FLAG}): no sandbox starts from it")
        lacking = snapshot.kernel_problems(kernel, fmt)
        if lacking:
            detail = f"{paths.rel(kernel)} lacks {', '.join(lacking)}: clones would share the kernel's random state"
            if b.get("ready"):
                rep.add(name, "kernel reseeds on restore", False, detail)
            else:
                rep.warn(name, "kernel reseeds on restore", detail)


def verify(pins: Pins, arch: str, reproduce: bool) -> Report:
    rep = Report()
    check_vmm(rep, pins, arch)
    check_guest(rep, arch)
    for runtime in pins.alpine.runtimes:
        published = {fmt: check_image(rep, pins, runtime, fmt, arch) for fmt in pins.alpine.formats_of(runtime)}
        checked = {fmt: digest for fmt, digest in published.items() if digest is not None}
        if reproduce and checked:  # one rebuild writes every format
            check_reproduce(rep, runtime, arch, checked)
    check_snapshots(rep, arch)
    return rep


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=prog("verify"), description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--arch", default=host_arch(), choices=ARCHES)
    p.add_argument("--json", action="store_true", help="print the rows as JSON (for CI)")
    p.add_argument("--reproduce", action="store_true", help="rebuild each image in a scratch directory and compare")
    p.add_argument("--frozen", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    rep = verify(load_pins(), args.arch, args.reproduce)
    present = [r for r in rep.rows if r.result != "missing"]
    if args.json:
        print(json.dumps({"ok": not rep.failed and bool(present), "rows": [asdict(r) for r in rep.rows]}, indent=1))
    else:
        print(rep.table())
        counts = {k: sum(1 for r in rep.rows if r.result == k) for k in ("pass", "warn", "skip", "missing", "FAIL")}
        log.info(", ".join(f"{n} {k.lower() if k != 'FAIL' else 'FAILED'}" for k, n in counts.items() if n))
    if not present:
        log.warn("nothing to verify: no artifacts found (run 'nox -s download' and 'nox -s rootfs_all')")
        return 1
    return 1 if rep.failed else 0
