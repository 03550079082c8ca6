"""What install scripts would have done, done without running them; and the Vulcan guest parts.

As apko does, apk's install scripts are replicated, not run; plus what makes an image a Vulcan
guest: accounts, the agent, /work and an init.

Every install script of every resolved package is looked at and recorded in the manifest as
``replicated`` (we do its effect here), ``not needed`` (no effect on a fresh image) or
``not supported`` (its effect is missing from the image; the manifest says so).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple

from . import AGENT, OVERLAY_INIT
from .tree import Tree

SANDBOX_UID = 1000
SHADOW_GID = 42  # alpine-baselayout .pre-install: addgroup -S -g 42 shadow
FIRST_SYSTEM_ID = 100  # busybox adduser/addgroup -S: first free id from 100

# Applets for busybox builds without /etc/busybox-paths.d/busybox (a fallback, as apko keeps).
FALLBACK_APPLETS = {
    "bin": "ash cat chgrp chmod chown cp date dd df dmesg echo false grep gunzip gzip hostname kill ln "
    "login ls mkdir mknod mktemp more mount mv netstat ping ps pwd rm rmdir sed sh sleep stat stty su "
    "sync tar touch true umount uname zcat",
    "sbin": "halt ifconfig init ip mdev modprobe poweroff reboot route sysctl syslogd",
    "usr/bin": "awk basename cut dirname du env find free head id install less md5sum nproc printf "
    "readlink realpath seq sha256sum sort tail tee test time top tr uniq unzip uptime vi wc wget which xargs yes",
    "usr/sbin": "addgroup adduser chroot crond delgroup deluser",
}

INITTAB = """\
# /etc/inittab written by vulcan-images: busybox init (PID 1) reaps zombies and respawns the agent.
::sysinit:/etc/vulcan/rc.init
::respawn:/usr/local/bin/vulcan-guest
::ctrlaltdel:/sbin/reboot
::shutdown:/bin/sync
"""

RC_INIT = """\
#!/bin/sh
# Early boot for a Vulcan guest (run once by busybox init before the agent starts).
[ -e /proc/self ] || mount -t proc -o nosuid,nodev,noexec proc /proc
mounted() { grep -q " $1 " /proc/mounts; }
mounted /sys || mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mounted /dev || mount -t devtmpfs -o mode=0755,nosuid devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mounted /dev/pts || mount -t devpts -o gid=5,mode=0620,nosuid,noexec devpts /dev/pts
mounted /dev/shm || mount -t tmpfs -o mode=1777,nosuid,nodev shm /dev/shm
mounted /tmp || mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mounted /run || mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
hostname -F /etc/hostname 2>/dev/null
ip link set lo up 2>/dev/null
exit 0
"""


# PID 1 on a read-only root (squashfs, or ext4 attached read-only). The same steps as
# firecracker-containerd's overlay-init: an overlay with the image as its lower layer and a
# throwaway upper layer, pivot_root into it, then the image's own /sbin/init as on ext4.
OVERLAY_INIT_SCRIPT = """\
#!/bin/sh
# Kernel command line: init=/etc/vulcan/overlay-init vulcan.overlay=tmpfs (upper layer in RAM,
# size vulcan.overlay_size=, default half the RAM) or vulcan.overlay=/dev/vdb (a scratch ext4
# drive the host made for this sandbox). Without vulcan.overlay: /sbin/init on the root as it is.
# Only these values are accepted: the command line is the host's, but nothing else from it
# reaches a mount: a drive is /dev/vdb../dev/vdz, a size is digits with an optional k, m, g
# or %. Anything else stops the boot with a console message.
fail() { echo "vulcan-overlay: fail $*" >/dev/console; exit 1; }
set -f  # the command line's words are not file name patterns
mount -t proc -o nosuid,nodev,noexec proc /proc || fail "cannot mount /proc"
mode="" size="50%"
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    vulcan.overlay=*) mode="${arg#*=}" ;;
    vulcan.overlay_size=*) size="${arg#*=}" ;;
  esac
done
umount /proc
case "$mode" in
  ""|tmpfs|/dev/vd[b-z]) ;;
  *) fail "vulcan.overlay=$mode: expected tmpfs or a drive /dev/vdb to /dev/vdz" ;;
esac
digits="${size%[kmg%]}"
case "$digits" in
  ""|*[!0-9]*) fail "vulcan.overlay_size=$size: expected digits with an optional k, m, g or %" ;;
esac
[ -n "$mode" ] || exec /sbin/init
if [ "$mode" = tmpfs ]; then
  mount -t tmpfs -o "size=$size,mode=0755" vulcan-rw /.vulcan/rw || fail "tmpfs upper layer"
else
  mount -t ext4 "$mode" /.vulcan/rw || fail "cannot mount $mode as the upper layer"
fi
mkdir -p /.vulcan/rw/upper /.vulcan/rw/work
mount -t overlay -o lowerdir=/,upperdir=/.vulcan/rw/upper,workdir=/.vulcan/rw/work vulcan-root /.vulcan/new \\
  || fail "overlay mount"
cd /.vulcan/new && pivot_root . .vulcan/ro || fail "pivot_root"
# The overlay holds its layers itself: detach the old root (and the upper layer's mount under
# it), so a sandbox sees neither the read-only image nor the upper layer's raw directories.
umount -l /.vulcan/ro || fail "cannot detach the read-only root from /.vulcan/ro"
exec /sbin/init
"""


class ScriptReport(NamedTuple):
    package: str
    script: str
    action: str  # replicated, not needed, not supported
    detail: str


# (package, script) -> (action, what we did about it)
KNOWN: dict[tuple[str, str], tuple[str, str]] = {
    ("alpine-baselayout", ".pre-install"): ("replicated", "group shadow (gid 42) added to /etc/group"),
    ("alpine-baselayout", ".post-install"): (
        "replicated",
        "/etc/shadow made root:shadow 0640; vserver rcL/rcK and color_prompt fix-ups not needed (no OpenRC, fresh)",
    ),
    ("busybox", ".post-install"): (
        "replicated",
        "applet symlinks from /etc/busybox-paths.d/busybox (busybox --install -s); klogd group and user added",
    ),
    ("busybox", ".trigger"): ("replicated", "busybox --install -s: the same applet symlinks"),
    ("ca-certificates", ".post-install"): ("not needed", "ca-certificates-bundle ships the generated bundle"),
    ("ca-certificates", ".trigger"): ("not needed", "ca-certificates-bundle ships the generated bundle"),
    ("alpine-keys", ".post-install"): ("not needed", "keys are files in the package"),
}


def review_scripts(scripts: Mapping[str, Sequence[str]]) -> list[ScriptReport]:
    """scripts: package name -> names of its control scripts (.pre-install, .trigger, ...)."""
    out = []
    for pkg in sorted(scripts):
        for script in sorted(scripts[pkg]):
            if (pkg, script) in KNOWN:
                action, detail = KNOWN[(pkg, script)]
            elif script.endswith(("-upgrade", "-deinstall")):
                action, detail = "not needed", "fresh image: nothing is upgraded or removed"
            else:
                action, detail = "not supported", "its effect is not in the image"
            out.append(ScriptReport(pkg, script, action, detail))
    return out


def busybox_links(tree: Tree) -> int:
    """Absolute symlinks to /bin/busybox for every applet path busybox lists."""
    if "bin/busybox" not in tree.nodes:
        return 0
    listing = tree.read("etc/busybox-paths.d/busybox")
    if listing is not None:
        paths = [line.strip().lstrip("/") for line in listing.decode().splitlines() if line.strip()]
    else:
        paths = [f"{d}/{a}" for d, names in FALLBACK_APPLETS.items() for a in names.split()]
    made = 0
    for path in paths:
        if path and path not in tree.nodes and path != "bin/busybox":
            tree.put_generated(path, "symlink", 0o777, linkname="/bin/busybox")
            made += 1
    return made


def _lines(tree: Tree, path: str) -> list[str]:
    data = tree.read(path)
    return data.decode().splitlines() if data else []


def _write(tree: Tree, path: str, lines: list[str], mode: int = 0o644, gid: int = 0) -> None:
    old = tree.nodes.get(path)
    mode = old.mode if old is not None and gid == 0 and mode == 0o644 else mode
    tree.put_generated(path, "file", mode, ("\n".join(lines) + "\n").encode(), gid=gid)


def _free_id(used: set[int]) -> int:
    n = FIRST_SYSTEM_ID
    while n in used:
        n += 1
    return n


def accounts(tree: Tree, has_busybox: bool) -> None:
    passwd, group, shadow = _lines(tree, "etc/passwd"), _lines(tree, "etc/group"), _lines(tree, "etc/shadow")
    names = {g.split(":")[0] for g in group}
    if "shadow" not in names:
        group.append(f"shadow:x:{SHADOW_GID}:")
    if has_busybox and "klogd" not in names:
        gid = _free_id({int(g.split(":")[2]) for g in group if g.count(":") >= 2 and g.split(":")[2].isdigit()})
        group.append(f"klogd:x:{gid}:")
        users = {int(p.split(":")[2]) for p in passwd if p.count(":") >= 3 and p.split(":")[2].isdigit()}
        if not any(p.startswith("klogd:") for p in passwd):
            passwd.append(f"klogd:x:{_free_id(users)}:{gid}:klogd:/dev/null:/sbin/nologin")
            shadow.append("klogd:!::0:::::")
    if not any(p.startswith("sandbox:") for p in passwd):
        passwd.append(f"sandbox:x:{SANDBOX_UID}:{SANDBOX_UID}:Vulcan sandbox:/work:/bin/sh")
        shadow.append("sandbox:!::0:::::")
    if "sandbox" not in names:
        group.append(f"sandbox:x:{SANDBOX_UID}:")
    if not any(s.startswith("root:") for s in shadow):
        shadow.insert(0, "root:*::0:::::")
    _write(tree, "etc/passwd", passwd)
    _write(tree, "etc/group", group)
    _write(tree, "etc/shadow", shadow, mode=0o640, gid=SHADOW_GID)


def vulcan(tree: Tree, runtime_check: Sequence[str], runtime: str, guest: bytes) -> None:
    """The agent, /work, the runtime check, busybox init and the nodes early boot needs."""
    tree.put_generated(AGENT, "file", 0o755, guest)
    tree.put_generated("work", "dir", 0o755, uid=SANDBOX_UID, gid=SANDBOX_UID)
    tree.put_generated("etc/vulcan/check.json", "file", 0o644, (json.dumps(list(runtime_check)) + "\n").encode())
    tree.put_generated("etc/vulcan/runtime", "file", 0o644, f"{runtime}\n".encode())
    tree.put_generated("etc/vulcan/rc.init", "file", 0o755, RC_INIT.encode())
    tree.put_generated(OVERLAY_INIT, "file", 0o755, OVERLAY_INIT_SCRIPT.encode())
    for d in (".vulcan", ".vulcan/rw", ".vulcan/new", ".vulcan/ro"):  # mount points a read-only root needs
        tree.put_generated(d, "dir", 0o755)
    tree.put_generated("etc/inittab", "file", 0o644, INITTAB.encode())
    tree.put_generated("etc/hostname", "file", 0o644, b"vulcan\n")
    for d in ("proc", "sys", "dev", "tmp", "run"):
        if d not in tree.nodes:
            tree.put_generated(d, "dir", 0o1777 if d == "tmp" else 0o755)
    # for kernels that do not mount devtmpfs before init
    tree.put_generated("dev/console", "char", 0o600, devmajor=5, devminor=1)
    tree.put_generated("dev/null", "char", 0o666, devmajor=1, devminor=3)


class InstalledPackage(NamedTuple):
    """What lib/apk/db/installed says of one package."""

    checksum: str
    pkginfo: Mapping[str, Sequence[str]]
    repo: str
    size: int  # of the .apk file: the index's S:, which apk also writes as S:
    arch: str  # the index's A: (apk writes it; .PKGINFO may say noarch where the index says x86_64)
    scripts: Mapping[str, bytes] = MappingProxyType({})  # ".post-install": its text (control tar)
    tag: str = ""  # its repository's tag: apk writes s:TAG (a name@tag world entry, or what it brought in)


DEFAULT_FILE_ACL = (0, 0, 0o644)
DEFAULT_DIR_ACL = (0, 0, 0o755)


def _acl(letter: str, acl: tuple[int, int, int]) -> str:
    return f"{letter}:{acl[0]}:{acl[1]}:{acl[2]:o}"


def installed_record(tree: Tree, pkg: InstalledPackage) -> tuple[list[str], list[str], list[str]]:
    """One package's lines, field for field as apk-tools 2.14 writes them (src/package.c
    apk_pkg_write_index_header, src/database.c apk_db_write_fdb): the header C P V A S I T U L o
    m t c k, then D p i; its r q; each directory once (F, M) with its files (R, a, Z)."""
    info = pkg.pkginfo
    name = info["pkgname"][0]

    def one(key: str) -> str:
        return info.get(key, [""])[0]

    out = [f"C:{pkg.checksum}", f"P:{name}", f"V:{one('pkgver')}"]
    if pkg.arch or one("arch"):
        out.append(f"A:{pkg.arch or one('arch')}")
    out += [f"S:{pkg.size}", f"I:{one('size') or 0}", f"T:{one('pkgdesc')}", f"U:{one('url')}", f"L:{one('license')}"]
    for key, letter in (("origin", "o"), ("maintainer", "m"), ("builddate", "t"), ("commit", "c")):
        if one(key):
            out.append(f"{letter}:{one(key)}")
    if one("provider_priority") not in ("", "0"):
        out.append(f"k:{one('provider_priority')}")
    for key, letter in (("depend", "D"), ("provides", "p"), ("install_if", "i")):
        if info.get(key):
            out.append(f"{letter}:{' '.join(info[key])}")
    replaces = [f"r:{' '.join(info['replaces'])}"] if info.get("replaces") else []
    if one("replaces_priority") not in ("", "0"):
        replaces.append(f"q:{one('replaces_priority')}")
    if pkg.tag:  # buffered with r: and q: (apk_db_write_fdb)
        replaces.append(f"s:{pkg.tag}")
    header, out = out, []
    for d in tree.records.get(name, {}).values():
        out.append(f"F:{d.path}")
        if d.acl is not None and d.acl != DEFAULT_DIR_ACL:
            out.append(_acl("M", d.acl))
        for base, acl, sha1 in d.files:
            path = f"{d.path}/{base}" if d.path else base
            node = tree.nodes.get(path)
            if node is None or node.pkg != name:
                continue  # another package took it over (replaces)
            out.append(f"R:{base}")
            if acl != DEFAULT_FILE_ACL:
                out.append(_acl("a", acl))
            if sha1:
                out.append(f"Z:Q1{base64.b64encode(bytes.fromhex(sha1)).decode()}")
    return header, replaces, out


def apk_database(
    tree: Tree,
    installed: Sequence[InstalledPackage],
    world: Sequence[str],
    repositories: Sequence[str],
    keys: Mapping[str, bytes],
    arch: str,
    epoch: int = 0,
) -> None:
    """lib/apk/db/installed, etc/apk/world, repositories, arch and keys: apk in the guest then
    knows what is installed. Records are sorted by package name, as apk writes them
    (apk_db_sorted_installed_packages)."""
    out: list[str] = []
    pending: list[str] = []
    for pkg in sorted(installed, key=lambda p: p.pkginfo["pkgname"][0]):
        header, replaces, dirs = installed_record(tree, pkg)
        # apk 2.14 buffers a record's r:/q: lines and writes them out with its first directory
        # (apk_db_write_fdb): a package that owns no directory (a meta package) passes them to
        # the next record that does, after that record's header; the last ones are never
        # written. The same bytes as apk, and apk reads them back the same way.
        pending += replaces
        out += header
        if dirs:
            out += [*pending, *dirs]
            pending = []
        out.append("")
    tree.put_generated("lib/apk/db/installed", "file", 0o644, ("\n".join(out) + "\n").encode())
    # sorted, as apk writes its world (apk_deps_write of the sorted world, src/database.c)
    ordered = sorted(world, key=lambda dep: re.split(r"[@~<>=]", dep.lstrip("!"), maxsplit=1)[0])
    tree.put_generated("etc/apk/world", "file", 0o644, ("\n".join(ordered) + "\n").encode())
    tree.put_generated("etc/apk/repositories", "file", 0o644, ("\n".join(repositories) + "\n").encode())
    tree.put_generated("etc/apk/arch", "file", 0o644, f"{arch}\n".encode())
    for name, pem in sorted(keys.items()):
        if f"etc/apk/keys/{name}" not in tree.nodes:  # alpine-keys may already link it
            tree.put_generated(f"etc/apk/keys/{name}", "file", 0o644, pem)
    initdb(tree, installed, epoch)


# apk's script types, in the order it stores them (apk-tools src/package.c apk_script_types)
SCRIPT_ORDER = (".pre-install", ".post-install", ".pre-deinstall", ".post-deinstall", ".pre-upgrade",
                ".post-upgrade", ".trigger")  # fmt: skip


def _octal(value: int, width: int, nul: bool) -> bytes:
    digits = width - 1 if nul else width
    return f"{value:0{digits}o}".encode()[-digits:] + (b"\0" if nul else b"")


def _apk_tar_entry(name: str, data: bytes, mtime: int) -> bytes:
    """One member as apk-tools 2.14 writes its scripts database (src/io_archive.c
    apk_tar_write_entry): a GNU-magic header, size and mtime in 12 octal digits without a NUL,
    mode/uid/gid in 7 with one, owner root; the data padded to 512 bytes."""
    h = bytearray(512)
    h[0:100] = name.encode()[:99].ljust(100, b"\0")
    h[100:108], h[108:116], h[116:124] = _octal(0o755, 8, True), _octal(0, 8, True), _octal(0, 8, True)
    h[124:136], h[136:148] = _octal(len(data), 12, False), _octal(mtime, 12, False)
    h[148:156] = b" " * 8
    h[156:157] = b"0"
    h[257:265] = b"ustar  \0"
    h[265:269], h[297:301] = b"root", b"root"
    h[148:155] = _octal(sum(h), 7, True)  # six digits and a NUL; the eighth byte stays a space
    return bytes(h) + data + bytes(-len(data) % 512)


def initdb(tree: Tree, installed: Sequence[InstalledPackage], epoch: int) -> None:
    """What ``apk --initdb add`` leaves that no package ships (apk-tools 2.14 src/database.c
    apk_db_create, apk_db_write_config): ``lib/apk/db/lock`` (0600, empty),
    ``lib/apk/db/triggers`` (each package with triggers: its checksum and trigger paths, in
    install order), ``lib/apk/db/scripts.tar`` (every package's scripts, named
    ``NAME-VERSION.CHECKSUM.TYPE``, 0755, in install order: apk in the guest runs them on an
    upgrade or removal), ``var/cache/apk``; and ``proc`` as 0555. Members' times are the
    image's timestamp (apk writes SOURCE_DATE_EPOCH, else the time of the install): the same
    inputs, the same bytes, byte for byte what apk writes with that SOURCE_DATE_EPOCH."""
    tree.put_generated("lib/apk/db/lock", "file", 0o600, b"")
    lines = [f"{p.checksum} {' '.join(p.pkginfo['triggers'])}" for p in installed if p.pkginfo.get("triggers")]
    tree.put_generated("lib/apk/db/triggers", "file", 0o644, "".join(f"{line}\n" for line in lines).encode())
    members = []
    for p in installed:
        name, version = p.pkginfo["pkgname"][0], p.pkginfo["pkgver"][0]
        members += [_apk_tar_entry(f"{name}-{version}.{p.checksum}.{kind[1:]}", p.scripts[kind], epoch)
                    for kind in SCRIPT_ORDER if kind in p.scripts]  # fmt: skip
    scripts_tar = b"".join(members) + bytes(1024)  # end of archive: two empty headers, no record padding
    tree.put_generated("lib/apk/db/scripts.tar", "file", 0o644, scripts_tar)
    if "var/cache/apk" not in tree.nodes:
        tree.put_generated("var/cache/apk", "dir", 0o755)
    proc = tree.nodes.get("proc")
    if proc is not None and proc.kind == "dir":
        proc.mode = 0o555  # apk --initdb makes it before any package: a package's proc/ keeps that mode
