"""Booting an image with Firecracker, directly or through its jailer.

The config file, the serial console, the agent over vsock; with the jailer, as a production
host starts it (chroot, cgroup, an unprivileged uid/gid).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .. import log, paths, sparse, workspace
from ..pins import Runtime
from . import AGENT_PORT, BootFailed, BootResult, Console, Target, exit_status, prepare_disks, running
from .agent import AgentClient, runtime_check, vsock_connect
from .api import ApiError, configure_and_start, wait_for_socket
from .firecracker_config import config as firecracker_config

JAILER_ID = "vulcan-{runtime}"
JAILED_UID = JAILED_GID = 65534  # nobody: the VMM runs unprivileged inside its chroot


@dataclass(frozen=True)
class Jail:
    """Firecracker started the way a production host starts it: through the jailer, which
    chroots into ``<base>/firecracker/<id>/root``, makes /dev/kvm there, moves the process into
    its own cgroup and drops to an unprivileged uid/gid (firecracker docs/jailer.md). Every file
    the VM uses must be inside that root; paths in the config are then relative to it."""

    jailer: Path
    firecracker: Path
    base: Path
    id: str
    uid: int = JAILED_UID
    gid: int = JAILED_GID
    mem_mib: int = 256
    cgroups: bool = True  # a memory limit through cgroup v2 (only where the host has it)

    @property
    def root(self) -> Path:
        return self.base / self.firecracker.name / self.id / "root"

    def argv(self, firecracker_args: list[str]) -> list[str]:
        """The jailer's command line; ``firecracker_args`` (after ``--``) name paths inside the jail."""
        limit = ["--cgroup-version", "2", "--cgroup", f"memory.max={self.mem_mib << 20}"] if self.cgroups else []
        return [
            str(self.jailer), "--id", self.id, "--exec-file", str(self.firecracker),
            "--uid", str(self.uid), "--gid", str(self.gid), "--chroot-base-dir", str(self.base), *limit,
            "--", *firecracker_args,
        ]  # fmt: skip

    def place(self, src: Path, name: str, writable: bool) -> Path:
        """Put a file the VM needs into the jail and give the jailed user what it needs of it;
        returns its path inside the jail. ``src`` must be a regular file where it is (a symbolic
        link, say in images/snapshots/, is refused: it could lead to any file root can read). A
        hard link is the same inode as ``src``: it is used only where nothing of the file must
        change (read-only, and readable by everyone); else a copy (sparse) is made for the jailed
        user alone, never with a mode wider than the file's own. (A hard-linked then chmod-ed
        image changed the mode of the published image itself.)"""
        self.root.mkdir(parents=True, exist_ok=True)
        dest = self.root / name
        try:
            fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            why = "a symbolic link" if os.path.islink(src) else exc.strerror or str(exc)
            raise BootFailed(f"{src}: {why}: not placed in the jail",
                             hint="the VM's files must be regular files where they are") from None  # fmt: skip
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BootFailed(f"{src}: not a regular file: not placed in the jail")
            if not writable and st.st_mode & 0o004:
                with contextlib.suppress(OSError):  # another file system: copied below
                    os.link(src, dest, follow_symlinks=False)
                    linked = os.lstat(dest)
                    if (linked.st_dev, linked.st_ino) == (st.st_dev, st.st_ino):  # the file checked above
                        return Path("/") / name
                    dest.unlink()
            sparse.sparse_copy(Path(f"/proc/self/fd/{fd}"), dest)  # the file checked, whatever the name is now
            os.chown(dest, self.uid, self.gid)
            os.chmod(dest, 0o600 if writable else 0o400)  # the jailed user's alone
        finally:
            os.close(fd)
        return Path("/") / name


def cgroup_v2_problem(root: Path = Path("/sys/fs/cgroup")) -> str | None:
    """Why the jailer cannot put the VM in a cgroup v2 with a memory limit here, or None (the
    jailer panics with "Controller memory is unavailable" on a host without it)."""
    try:
        controllers = (root / "cgroup.controllers").read_text().split()
    except OSError:
        return f"{root} is not a cgroup v2 hierarchy (no cgroup.controllers)"
    if "memory" not in controllers:
        return f"the memory controller is not enabled in {root}"
    return None


READY = "vulcan-guest: ready"
# What Firecracker prints when it stops before the guest is ready (v1.12 and later): the host's
# KVM gave up on the guest (a nested, paravirtual KVM that runs only patched guests stops a
# normal kernel in its early boot), or Firecracker refused the VM it was given.
KVM_STOPPED = "KVM_EXIT_INTERNAL_ERROR"
REFUSED = "RunWithoutApiError error: "
STOPPED = (KVM_STOPPED, REFUSED, "Firecracker exiting with error")
NESTED_KVM = (
    "the guest kernel started, then this host's KVM stopped it (KVM_EXIT_INTERNAL_ERROR): a nested KVM that runs "
    "only patched guests; boot on a host with a normal /dev/kvm, or use --vmm qemu"
)


def why_not_ready(
    line: str | None,
    exited: int | None,
    tail: list[str],
    timeout: float,
    console: Console | None = None,
    setting: str = "VULCAN_BOOT_TIMEOUT",
) -> tuple[str, bool]:
    """What happened instead of ``vulcan-guest: ready``, said for a user; and whether it was
    this host's KVM (then another VMM on this host may still boot the image). With the
    ``console``: the guest's own reason to stop, and how far it got before a timeout (and
    which setting gives it longer)."""
    if line is not None and KVM_STOPPED in line:
        return NESTED_KVM, True
    refused = next((x for x in [line or "", *tail] if REFUSED in x), None)
    if refused is not None:  # Firecracker's own words: the config, a file it names, the kernel
        return f"Firecracker refused the VM: {refused.split(REFUSED, 1)[1].strip()}", False
    said = sorted(console.stopped_by_guest, key=lambda x: "Kernel panic" in x) if console else []
    if said:  # overlay-init's or the agent's own words first, then the kernel's panic
        return f"the guest stopped before its agent was ready: {said[0]}", False
    reached = f" ({console.progress()})" if console else ""
    if exited is not None:
        return (f"Firecracker exited with status {exited} before the guest was ready{reached}: "
                f"{' | '.join(tail[-5:])}"), False  # fmt: skip
    return (f"no '{READY}' within {timeout:g} s: the VM had reached {console.progress() if console else 'nothing'}; "
            f"a slow host (QEMU's TCG, a KVM that emulates guest kernel code) needs more: raise {setting} or "
            f"--timeout; last console lines: {tail[-5:]}"), False  # fmt: skip


def boot_firecracker(
    t: Target, rt: Runtime, kernel: Path, arch: str, timeout: float, jailed: bool = False, api: bool = False
) -> BootResult:
    """``api``: configure the VM through Firecracker's API socket (as Vulcan hosts and snapshots
    do) instead of ``--config-file``: the same description of the VM (firecracker_config.py)."""
    runtime = t.runtime
    firecracker = paths.vmm(arch, "firecracker")
    with workspace.scratch(Path(tempfile.gettempdir()), "fc") as scratch:
        disks = prepare_disks(t.image, t.fmt, t.read_only, t.overlay, scratch)
        extra = f"vulcan.port={AGENT_PORT} {disks.kernel_args(with_root=False)} {t.append}".strip()
        if not jailed:
            uds = scratch / "vsock.sock"
            cfg, sock = scratch / "vm.json", scratch / "api.sock"
            conf = firecracker_config(kernel, disks.root, uds, extra_args=extra, read_only=disks.read_only,
                                      scratch=disks.scratch)  # fmt: skip
            cfg.write_text(json.dumps(conf, indent=1))
            fc_args = ["--api-sock", str(sock)] if api else ["--no-api", "--config-file", str(cfg)]
            cmd = [str(firecracker), *fc_args]
        else:
            problem = cgroup_v2_problem()
            if problem is not None:
                log.warn(f"!!! boot {runtime}: jailed WITHOUT a memory limit: {problem} !!!")
            jail = Jail(paths.vmm(arch, "jailer"), firecracker, scratch / "jail", JAILER_ID.format(runtime=runtime),
                        cgroups=problem is None)  # fmt: skip
            root = jail.place(disks.root, f"rootfs.{t.fmt}", writable=not disks.read_only)
            upper = jail.place(disks.scratch, "upper.img", writable=True) if disks.scratch else None
            conf = firecracker_config(jail.place(kernel, "vmlinux", writable=False), root, Path("/vsock.sock"),
                                      extra_args=extra, read_only=disks.read_only, scratch=upper)  # fmt: skip
            (jail.root / "vm.json").write_text(json.dumps(conf, indent=1))
            os.chown(jail.root, jail.uid, jail.gid)  # Firecracker creates the vsock (and API) socket there
            uds, sock = jail.root / "vsock.sock", jail.root / "api.sock"
            cmd = jail.argv(["--api-sock", "/api.sock"] if api else ["--no-api", "--config-file", "/vm.json"])
        console_log = paths.console_log(runtime, t.fmt, "firecracker", arch)
        log.info(f"boot {runtime}: {' '.join(cmd)} (console log {console_log})")
        start = time.monotonic()
        with running(cmd, console_log, cwd=scratch) as (proc, console):
            if api:
                try:
                    wait_for_socket(sock, 30, alive=lambda: proc.poll() is None)
                    configure_and_start(sock, conf)
                except ApiError as exc:
                    why = exc.message + (f" | {' | '.join(console.tail[-3:])}" if proc.poll() is not None else "")
                    return BootResult(runtime, t.fmt, "firecracker", False, time.monotonic() - start, why, console_log)
            line = console.wait_for((READY, *STOPPED), start + timeout)
            ready = time.monotonic() - start
            if line is None or READY not in line:
                exited = exit_status(proc, console)
                why, host = why_not_ready(line, exited, console.tail, timeout, console)
                return BootResult(runtime, t.fmt, "firecracker", False, ready, why, console_log, stopped_by_host=host)
            client = AgentClient(vsock_connect(str(uds), AGENT_PORT, timeout=30))
            try:
                detail = runtime_check(client, list(rt.check))
                if rt.program:
                    prog = client.exec(list(rt.program), timeout_ms=120_000)
                    out = prog.stdout.decode(errors="replace").strip()
                    if prog.exit_code != 0 or (rt.expect and out != rt.expect):
                        raise BootFailed(f"program {list(rt.program)} gave exit {prog.exit_code}, output {out!r}")
                    detail += f"; program printed {out!r}"
            finally:
                client.close()
            return BootResult(runtime, t.fmt, "firecracker", True, ready, detail, console_log, disks.copied_bytes)
