"""`nox -s snapshot`: a warm, ready VM per runtime and format, saved as a Firecracker Full snapshot.

Each image is booted with the pinned Firecracker and kernel through the API socket; once the
agent is ready the runtime's check runs once (its files are then in the guest's page cache),
the host's connection is closed (vsock must be idle at a snapshot), the VM is paused and
``PUT /snapshot/create`` writes ``images/snapshots/<runtime>.<format>/``: ``vmstate``,
``memory`` (the guest's RAM; a restore maps it MAP_PRIVATE, so every clone shares its page
cache until it writes) and ``snapshot.json``, which binds them to what they depend on (BINDING).
A writable image's snapshot also keeps its disk as the guest left it (``rootfs.ext4``): the
guest's memory describes that file system; a read-only image (squashfs) is used in place.

The VM is described with paths relative to Firecracker's working directory (``rootfs.<fmt>``,
``vsock.sock``): a snapshot records the paths it was made with, and a restore must find its
host resources "at the same relative paths" (Firecracker's docs/snapshotting/snapshot-support.md),
so each clone runs in a directory of its own with its own socket and its own writable layer.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .. import formats, kconfig, log, paths, settings, sparse, workspace
from ..arch import ARCHES, host_arch
from ..errors import UsageError, VulcanError
from ..hashing import sha256_file
from ..pins import Runtime
from ..pins import load as load_pins
from ..run import run_tool
from ..steps import prog
from . import AGENT_PORT, Disks, exit_status, kvm_problem, running
from .agent import AgentClient, runtime_check, vsock_connect
from .api import ApiError, configure_and_start, patch, put, wait_for_socket
from .firecracker import READY, STOPPED, why_not_ready
from .firecracker_config import config as firecracker_config

LAYOUT = 1  # of snapshot.json
STATE, MEMORY, MANIFEST = "vmstate", "memory", "snapshot.json"
VSOCK, API = "vsock.sock", "api.sock"  # relative to Firecracker's working directory
# What a snapshot depends on: each must be the same on the host that restores it, or the
# snapshot is stale (nox -s snapshot makes it again) or unusable here (boot --restore refuses).
BINDING = (
    "runtime", "format", "arch", "firecracker_version", "firecracker_sha256", "snapshot_version",
    "kernel_sha256", "image_sha256", "machine_config", "boot_args", "cpu_model", "cpu_flags", "ready",
)  # fmt: skip
# The test-only switch: a snapshot of a VM paused right after it started, before the guest is
# ready, for machines whose KVM never brings a guest to user space (the suite's). Its binding
# says ready: false; a restore of it resumes the VM but never hands it out as a sandbox.
TEST_ONLY_FLAG = "--test-only-before-ready"


class SnapshotError(VulcanError):
    """A snapshot could not be made, or does not belong to this host."""

    exit_code = 8


def root_name(fmt: str) -> str:
    return f"rootfs.{fmt}"


def host_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, list[str]]:
    """The host CPU's model and feature flags (the first processor's): Firecracker restores a
    snapshot only on a CPU like the one it was made on."""
    model, arm, flags = "", [], []
    try:
        text = cpuinfo.read_text()
    except OSError:
        return "unknown", []
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = (s.strip() for s in line.partition(":"))
        if key == "model name":
            model = value
        elif key in ("CPU implementer", "CPU architecture", "CPU variant", "CPU part", "CPU revision"):
            arm.append(f"{key.removeprefix('CPU ')}={value}")  # arm64 has no model name
        elif key in ("flags", "Features"):
            flags = sorted(value.split())
    return model or " ".join(arm) or "unknown", flags


def firecracker_identity(firecracker: Path) -> tuple[str, str]:
    """``("Firecracker v1.12.1", "v6.0.0")``: its version and the snapshot data format it writes."""

    def first_line(flag: str) -> str:
        proc = run_tool([firecracker, flag], check=False, quiet=True, timeout=30)
        lines = proc.stdout.decode(errors="replace").strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise SnapshotError(f"{firecracker} {flag} failed (exit {proc.returncode})",
                                hint="run 'nox -s download' for the pinned Firecracker")  # fmt: skip
        return lines[0].strip()

    return first_line("--version"), first_line("--snapshot-version")


def image_sha256(runtime: str, fmt: str, arch: str) -> str:
    """The image's sha256 as its manifest records it (verify checks the image against it)."""
    image = paths.image(runtime, fmt, arch)
    try:
        listed = json.loads(paths.manifest(runtime, arch).read_text()).get("images", [])
        digest = next((i["sha256"] for i in listed if i.get("format") == fmt), None)
    except (OSError, ValueError):
        digest = None
    return str(digest) if digest else sha256_file(image)


def vm_config(kernel: Path, fmt: str, read_only: bool) -> dict[str, Any]:
    """The snapshot's VM: the root drive and the vsock socket named relative to Firecracker's
    working directory; a read-only root with its overlay's upper layer in RAM (tmpfs), which
    is in the snapshot's memory: each clone gets a private copy-on-write of it."""
    overlay = Disks(Path(root_name(fmt)), True, fmt).kernel_args(with_root=False) if read_only else ""
    extra = f"vulcan.port={AGENT_PORT} {overlay}".strip()
    return firecracker_config(kernel, Path(root_name(fmt)), Path(VSOCK), extra_args=extra, read_only=read_only)


@functools.cache
def _host(firecracker: Path, kernel: Path, fingerprints: tuple[tuple[int, int, int], ...]) -> dict[str, Any]:
    """What every snapshot made here shares: Firecracker (two runs of it and its sha256), the
    kernel's sha256, the CPU. Once per process for the same files (``fingerprints``: inode,
    size, mtime of both), whatever the number of runtimes and formats a command goes through."""
    version, snapshot_version = firecracker_identity(firecracker)
    model, flags = host_cpu()
    return {"firecracker_version": version, "firecracker_sha256": sha256_file(firecracker),
            "snapshot_version": snapshot_version, "kernel_sha256": sha256_file(kernel), "cpu_model": model,
            "cpu_flags": flags}  # fmt: skip


def binding(runtime: str, fmt: str, arch: str, kernel: Path, ready: bool) -> dict[str, Any]:
    """What a snapshot of this image made here now would be bound to (BINDING's fields)."""
    firecracker = paths.vmm(arch, "firecracker")
    stats = tuple((st.st_ino, st.st_size, st.st_mtime_ns) for st in (os.stat(firecracker), os.stat(kernel)))
    host = _host(firecracker, kernel, stats)
    conf = vm_config(kernel, fmt, not formats.get(fmt).writable)
    b = {
        "runtime": runtime,
        "format": fmt,
        "arch": arch,
        **host,
        "image_sha256": image_sha256(runtime, fmt, arch),
        "machine_config": conf["machine-config"],
        "boot_args": conf["boot-source"]["boot_args"],
        "ready": ready,
    }
    b = {field: b[field] for field in BINDING}  # in BINDING's order, every field
    return b


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Each field of the binding that disagrees, said for a user."""
    out = []
    for field in BINDING:
        was, now = recorded.get(field), current[field]
        if was == now:
            continue
        if field == "cpu_flags" and isinstance(was, list):
            gone, new = sorted(set(was) - set(now)), sorted(set(now) - set(was))
            out.append(f"cpu_flags: this host lacks {gone or 'none'} and adds {new or 'none'}")
        else:
            out.append(f"{field}: the snapshot has {was!r}, this host {now!r}")
    return out


def disagreements(recorded: dict[str, Any], runtime: str, fmt: str, arch: str, kernel: Path) -> list[str]:
    """What a snapshot's recorded binding and this host's now disagree on, field by field (a
    test-only snapshot is compared as one: its ``ready`` is its own)."""
    return differences(recorded, binding(runtime, fmt, arch, kernel, bool(recorded.get("ready"))))


def load(directory: Path) -> dict[str, Any]:
    """A snapshot's snapshot.json, checked for shape; SnapshotError when absent or unreadable."""
    try:
        doc = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        raise SnapshotError(f"no snapshot in {directory}", hint="run 'nox -s snapshot' on this host first") from None
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"{directory / MANIFEST} is unreadable: {exc}",
                            hint="run 'nox -s snapshot' again") from None  # fmt: skip
    if not isinstance(doc, dict) or doc.get("layout") != LAYOUT or not isinstance(doc.get("binding"), dict):
        raise SnapshotError(f"{directory / MANIFEST} is not a snapshot of this tool (layout {LAYOUT})",
                            hint="run 'nox -s snapshot' again")  # fmt: skip
    return doc


def file_problems(directory: Path, doc: dict[str, Any]) -> dict[str, str]:
    """Each file snapshot.json records that is not there as recorded: name -> "missing", "a
    symbolic link" (it could lead anywhere) or "sha256 differs". Empty: all as recorded."""
    files = doc.get("files")
    found = {}
    for name, f in sorted(files.items()) if isinstance(files, dict) else []:
        p = directory / name
        if p.is_symlink():
            found[name] = "a symbolic link"
        elif not p.is_file():
            found[name] = "missing"
        elif not isinstance(f, dict) or sha256_file(p) != f.get("sha256"):
            found[name] = "sha256 differs"
    return found


def kernel_problems(kernel: Path, fmt: str) -> list[str]:
    """What the kernel lacks for snapshots of this format (CONFIG_ names)."""
    config = kconfig.read(kernel)
    if config is None:
        return []
    return kconfig.missing(config, [fmt], not formats.get(fmt).writable, snapshot=True)


def make(rt: Runtime, runtime: str, fmt: str, arch: str, kernel: Path, timeout: float, ready: bool) -> Path:
    """Make (or keep, when its binding is current) the snapshot of one image; its directory."""
    final = paths.snapshot(runtime, fmt, arch)
    want = binding(runtime, fmt, arch, kernel, ready)
    if (final / MANIFEST).is_file():
        try:
            doc = load(final)
            if doc["binding"] == want and all((final / name).is_file() for name in doc.get("files", {})):
                log.info(f"snapshot {runtime}.{fmt}: up to date ({paths.rel(final)})")
                return final
            log.info(f"snapshot {runtime}.{fmt}: stale: {'; '.join(differences(doc['binding'], want)) or 'files'}")
        except SnapshotError as exc:
            log.info(f"snapshot {runtime}.{fmt}: making it again: {exc.message}")
    image = paths.image(runtime, fmt, arch)
    read_only = not formats.get(fmt).writable
    conf = vm_config(kernel, fmt, read_only)
    final.parent.mkdir(parents=True, exist_ok=True)
    with workspace.scratch(final.parent, f"snapshot-{runtime}.{fmt}") as work:
        if read_only:
            os.symlink(image.resolve(), work / root_name(fmt))  # in place; the clones use it too
        else:
            sparse.sparse_copy(image, work / root_name(fmt))  # the guest writes: it stays with the snapshot
        console_log = paths.console_log(runtime, fmt, "firecracker-snapshot", arch)
        cmd = [str(paths.vmm(arch, "firecracker")), "--api-sock", API]
        log.info(f"snapshot {runtime}.{fmt}: {' '.join(cmd)} in {work} (console log {console_log})")
        start = time.monotonic()
        with running(cmd, console_log, cwd=work) as (proc, console):
            try:
                wait_for_socket(work / API, 30, alive=lambda: proc.poll() is None)
                configure_and_start(work / API, conf)
            except ApiError as exc:
                raise SnapshotError(f"snapshot {runtime}.{fmt}: {exc.message}",
                                    hint=f"console log: {console_log}") from None  # fmt: skip
            warm = "none: a test-only snapshot, taken before the guest was ready"
            if ready:
                line = console.wait_for((READY, *STOPPED), start + timeout)
                if line is None or READY not in line:
                    why, _ = why_not_ready(
                        line, exit_status(proc, console), console.tail, timeout, console, "VULCAN_SNAPSHOT_TIMEOUT"
                    )
                    raise SnapshotError(f"snapshot {runtime}.{fmt}: the VM never became ready: {why}",
                                        hint=f"console log: {console_log}")  # fmt: skip
                warm = _warm(rt, work / VSOCK)
            try:
                patch(work / API, "/vm", {"state": "Paused"})
                taken = time.monotonic()
                put(work / API, "/snapshot/create", {"snapshot_type": "Full", "snapshot_path": STATE,
                                                     "mem_file_path": MEMORY})  # fmt: skip
                took = time.monotonic() - taken
            except ApiError as exc:
                why = exc.message + (f" | {' | '.join(console.tail[-3:])}" if proc.poll() is not None else "")
                raise SnapshotError(f"snapshot {runtime}.{fmt}: {why}", hint=f"console log: {console_log}") from None
        for name in (API, VSOCK, *([root_name(fmt)] if read_only else [])):
            (work / name).unlink(missing_ok=True)
        kept = [STATE, MEMORY, *([] if read_only else [root_name(fmt)])]
        for name in kept:
            os.chmod(work / name, 0o644)  # a jailed clone (uid 65534) reads them through a hard link
        doc = {
            "layout": LAYOUT,
            "binding": want,
            "files": {n: {"sha256": sha256_file(work / n), "size": (work / n).stat().st_size} for n in kept},
            "warm": warm,
            "create_seconds": round(took, 3),
        }
        (work / MANIFEST).write_text(json.dumps(doc, indent=1) + "\n")
        os.chmod(work, 0o755)
        _replace(work, final)
    log.info(f"snapshot {runtime}.{fmt}: {paths.rel(final)} (memory {log.human(doc['files'][MEMORY]['size'])}, "
             f"created in {took * 1000:.0f} ms; warmed: {warm})")  # fmt: skip
    return final


def _warm(rt: Runtime, uds: Path) -> str:
    """Run the runtime's check once in the guest (its files come into the page cache), then
    close the connection: vsock must be idle when the snapshot is taken."""
    client = AgentClient(vsock_connect(str(uds), AGENT_PORT, timeout=30))
    try:
        return f"{' '.join(rt.check)}: {runtime_check(client, list(rt.check))[:80]}"
    finally:
        client.close()


def _replace(work: Path, final: Path) -> None:
    """``work`` becomes ``final``; an older snapshot there goes (renamed aside first, so no
    reader sees a half-replaced directory)."""
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{workspace.SCRATCH_PREFIX}old-", dir=final.parent))
        os.rename(final, old / final.name)
    os.rename(work, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str]) -> int:
    pins = load_pins()
    p = argparse.ArgumentParser(prog=prog("snapshot"), description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("runtimes", nargs="*", help="runtimes to snapshot (default: every runtime)")
    p.add_argument("--format", default=formats.SHARED, choices=formats.NAMES,
                   help=f"which image (default {formats.SHARED}: read-only, shared by every clone)")  # fmt: skip
    p.add_argument("--arch", default=host_arch(), choices=ARCHES)
    p.add_argument("--kernel", type=Path, help="guest kernel (default: bin/vmlinux)")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help=f"seconds for a VM to become ready (default VULCAN_SNAPSHOT_TIMEOUT or "
                   f"{settings.SNAPSHOT_TIMEOUT:g})")  # fmt: skip
    p.add_argument(TEST_ONLY_FLAG, dest="before_ready", action="store_true",
                   help="TESTS ONLY: snapshot the VM right after it starts, before the guest is ready (a KVM "
                   "that never brings a guest to user space); no sandbox is ever started from it")  # fmt: skip
    p.add_argument("--frozen", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.timeout is not None and not args.timeout > 0:
        raise UsageError(f"--timeout {args.timeout:g}: want more than 0 seconds")
    timeout = args.timeout or settings.snapshot_timeout()
    known = pins.alpine.runtimes
    for rt in args.runtimes:
        if rt not in known:
            raise UsageError(f"unknown runtime {rt!r}", hint=f"runtimes in pins.json: {', '.join(known)}")
    if args.arch != host_arch():
        raise SnapshotError(f"snapshots are made by running the VM: {args.arch} cannot run on {host_arch()}",
                            hint="make them on a host of that architecture")  # fmt: skip
    firecracker, kernel = paths.vmm(args.arch, "firecracker"), (args.kernel or paths.kernel(args.arch))
    for need, what in ((firecracker, "Firecracker"), (kernel, "the guest kernel")):
        if not need.is_file():
            raise SnapshotError(f"{what} ({need}) is missing", hint="run 'nox -s download'")
    no_kvm = kvm_problem()
    if no_kvm:
        raise SnapshotError(f"cannot run Firecracker: {no_kvm}", hint="make snapshots on a host with /dev/kvm")
    lacking = kernel_problems(kernel, args.format)
    if lacking:
        say = (f"kernel {kernel} lacks {', '.join(lacking)}: restored clones would share the kernel's random "
               "state (CONFIG_VMGENID reseeds it on restore)" if lacking == ["CONFIG_VMGENID"]
               else f"kernel {kernel} cannot boot {args.format} snapshots: it lacks {', '.join(lacking)}")  # fmt: skip
        if not args.before_ready or lacking != ["CONFIG_VMGENID"]:
            raise SnapshotError(say, hint="use a kernel built with them (Firecracker's CI kernels are)")
        log.warn(f"{say}; made anyway: {TEST_ONLY_FLAG}")
    chosen = args.runtimes or list(known)
    for runtime in chosen:
        if not paths.image(runtime, args.format, args.arch).is_file():
            raise SnapshotError(f"{paths.image(runtime, args.format, args.arch)} is missing",
                                hint=f"run 'nox -s rootfs-{runtime}' (with {args.format} in its formats)")  # fmt: skip
    for runtime in chosen:
        make(known[runtime], runtime, args.format, args.arch, kernel, timeout, ready=not args.before_ready)
    return 0
