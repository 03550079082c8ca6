"""A small Alpine-shaped world for image builds: a base set and three runtimes, with a real
static busybox (Debian's busybox-static, repackaged here) so the images really boot.

Install scripts of alpine-baselayout and busybox are the real ones, taken from the Alpine
packages in ../shared/testdata when it is there."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

from scripts.apk.package import verify_package
from scripts.apk.trust import Keyring
from tests.support.apkrepo import Entry, Pkg, alpine_pins, publish
from tests.support.world import SHARED, World

BUSYBOX = Path("/bin/busybox")
ARM64 = Path("/opt/vulcan-arm64")  # Debian's arm64 busybox-static and musl, unpacked by .ci/setup-debian
REAL_BASELAYOUT = SHARED / "chainguard-dev-apko/pkg/apk/apk/testdata/alpine-316/alpine-baselayout-3.2.0-r23.apk"
REAL_BUSYBOX = SHARED / "jdrouet-inapt/resources/busybox-1.37.0-r14.apk"
BASE = ["alpine-baselayout", "alpine-keys", "alpine-release", "busybox", "busybox-binsh", "musl",
        "ca-certificates-bundle"]  # fmt: skip
RUNTIMES = {
    "go": {"world": ["go~1.26"], "check": ["go", "version"], "binary": "/usr/bin/go", "headroom_mib": 24},
    "node": {"world": ["nodejs~24"], "check": ["node", "--version"], "binary": "/usr/bin/node"},
    "python": {
        "world": ["python3~3.14"],
        "check": ["python3", "--version"],
        "binary": "/usr/bin/python3",
        "program": ["python3", "-c", "print(6*7)"],
        "expect": "42",
    },
}


def static_busybox(arch: str = "x86_64") -> bytes | None:
    """Debian's busybox-static for ``arch``, if there (what the boot tests need)."""
    if arch == "aarch64":
        found = ARM64 / "bin/busybox"
        return found.read_bytes() if found.is_file() else None
    if not BUSYBOX.is_file():
        return None
    out = (
        subprocess.run(["file", "-b", str(BUSYBOX)], capture_output=True, text=True).stdout
        if shutil.which("file")
        else "statically linked"
    )
    return BUSYBOX.read_bytes() if "statically linked" in out else None


MUSL_LOADER = Path("/lib/ld-musl-x86_64.so.1")  # Debian's musl package


GO_PYTHON = """package main

import ("fmt"; "os")

func main() {
	if len(os.Args) > 2 && os.Args[1] == "-c" { fmt.Println("42"); return }
	fmt.Println("Python 3.14.7")
}
"""


@lru_cache(maxsize=2)
def musl_python(arch: str = "x86_64") -> bytes | None:
    """A real program standing in for python3: on x86_64 dynamically linked with Debian's
    musl-gcc (the image's own loader runs it, in verify and in the VM); on aarch64, where no
    musl cross-compiler is at hand, a static Go binary (verify runs it under qemu-user)."""
    if arch == "aarch64":
        return _go_binary(GO_PYTHON, "arm64")
    cc = shutil.which("musl-gcc")
    if cc is None or not MUSL_LOADER.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "python3.c"
        src.write_text(
            "#include <stdio.h>\n#include <string.h>\n"
            "int main(int argc, char **argv) {\n"
            '  if (argc > 2 && strcmp(argv[1], "-c") == 0) { puts("42"); return 0; }\n'
            '  puts("Python 3.14.7"); return 0; }\n'
        )
        subprocess.run([cc, "-O2", "-o", str(Path(tmp) / "python3"), str(src)], check=True)
        return (Path(tmp) / "python3").read_bytes()


def _real_scripts(apk: Path, fallback: dict[str, bytes]) -> dict[str, bytes]:
    if not apk.is_file():
        return fallback
    keys = SHARED / "csmith-apkutils/keys"
    ring = Keyring.from_pems({p.name: p.read_bytes() for p in keys.iterdir()})
    verified = verify_package(apk, None, ring, apk.name)
    return {k: v for k, v in verified.files.items() if k != ".PKGINFO"}


def _go_binary(source: str, goarch: str) -> bytes | None:
    from tests.support.toolchains import go_or_none

    go = go_or_none()
    if go is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "main.go").write_text(source)
        (Path(tmp) / "go.mod").write_text("module python\n\ngo 1.22\n")
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "GOCACHE": f"{tmp}/c", "GOPATH": f"{tmp}/p",
               "GOTOOLCHAIN": "local", "CGO_ENABLED": "0", "GOOS": "linux", "GOARCH": goarch}  # fmt: skip
        proc = subprocess.run([go, "build", "-trimpath", "-ldflags=-s -w", "-o", "python3", "."], cwd=tmp, env=env,
                              capture_output=True)  # fmt: skip
        return (Path(tmp) / "python3").read_bytes() if proc.returncode == 0 else None


def _musl_loader(arch: str) -> bytes:
    if arch == "x86_64" and MUSL_LOADER.exists():
        return MUSL_LOADER.read_bytes()
    arm = ARM64 / "lib/ld-musl-aarch64.so.1"
    if arch == "aarch64" and arm.exists():
        return arm.resolve().read_bytes()
    return b"\x7fELF musl stand-in"


def packages(arch: str = "x86_64") -> dict[str, list[Pkg]]:
    musl = f"so:libc.musl-{arch}.so.1"
    bb = static_busybox(arch) or b"\x7fELF not a real busybox"
    applets = (
        subprocess.run([str(BUSYBOX), "--list-full"], capture_output=True, text=True).stdout
        if BUSYBOX.is_file()
        else "bin/ls\nbin/cat\nsbin/init\nbin/mount\nusr/bin/env\n"
    )
    paths_d = "".join(f"/{line}\n" for line in sorted(applets.split()) if line and line != "bin/busybox")
    dirs = ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "usr/lib", "lib", "etc", "dev", "proc", "sys", "run",
            "var", "var/log", "home", "media", "mnt", "opt", "srv"]  # fmt: skip
    baselayout_data = Pkg(
        "alpine-baselayout-data",
        "3.7.0-r0",
        arch,
        entries=[
            *(Entry(d, kind="dir", mode=0o755) for d in dirs),
            Entry("tmp", kind="dir", mode=0o1777),
            Entry("root", kind="dir", mode=0o700),
            Entry("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/sbin/nologin\n"),
            Entry("etc/group", b"root:x:0:root\nusers:x:100:\nnogroup:x:65533:\nnobody:x:65534:\n"),
            Entry("etc/shadow", b"root:*::0:::::\nnobody:!::0:::::\n", 0o640),
            Entry("etc/hosts", b"127.0.0.1 localhost\n"),
            Entry("var/run", kind="symlink", mode=0o777, target="../run"),
        ],
        license="GPL-2.0-only",
    )
    baselayout = Pkg(
        "alpine-baselayout",
        "3.7.0-r0",
        arch,
        depends=["alpine-baselayout-data=3.7.0-r0", "/bin/sh"],
        scripts=_real_scripts(
            REAL_BASELAYOUT,
            {
                ".pre-install": b"#!/bin/sh\naddgroup -S -g 42 shadow 2>/dev/null\nexit 0\n",
                ".post-install": b"#!/bin/sh\nchown root:shadow /etc/shadow\nchmod 640 /etc/shadow\nexit 0\n",
            },
        ),
        license="GPL-2.0-only",
    )
    release = Pkg(
        "alpine-release",
        "3.24.0-r0",
        arch,
        entries=[
            Entry("etc/os-release", b'NAME="Alpine Linux"\nID=alpine\nVERSION_ID=3.24.0\n'),
            Entry("etc/alpine-release", b"3.24.0\n"),
        ],
    )
    keys = Pkg("alpine-keys", "2.6-r0", arch, entries=[Entry("usr/share/apk/keys/README", b"test keys\n")])
    busybox = Pkg(
        "busybox",
        "1.37.0-r31",
        arch,
        depends=[musl],
        provides=["cmd:busybox=1.37.0-r31"],
        entries=[
            Entry("bin/busybox", bb, 0o755),
            Entry("etc/busybox-paths.d/busybox", paths_d.encode()),
            Entry("etc/securetty", b"console\n"),
        ],
        scripts=_real_scripts(REAL_BUSYBOX, {".post-install": b"#!/bin/busybox sh\n/bin/busybox --install -s\n"}),
        license="GPL-2.0-only",
    )
    binsh = Pkg(
        "busybox-binsh",
        "1.37.0-r31",
        arch,
        depends=["busybox=1.37.0-r31"],
        provides=["/bin/sh", "cmd:sh=1.37.0-r31"],
        provider_priority=100,
        entries=[Entry("bin/sh", kind="symlink", mode=0o777, target="/bin/busybox")],
    )
    musl_pkg = Pkg(
        "musl",
        "1.2.6-r2",
        arch,
        provides=[f"{musl}=1"],
        entries=[Entry(f"lib/ld-musl-{arch}.so.1", _musl_loader(arch), 0o755),
                 Entry(f"lib/libc.musl-{arch}.so.1", kind="symlink", mode=0o777, target=f"ld-musl-{arch}.so.1")],
        license="MIT",
    )  # fmt: skip
    certs = Pkg(
        "ca-certificates-bundle",
        "20250911-r0",
        arch,
        entries=[Entry("etc/ssl/certs/ca-certificates.crt", b"-----BEGIN CERTIFICATE-----\ntest\n")],
        license="MPL-2.0 AND MIT",
    )
    python = Pkg(
        "python3",
        "3.14.7-r1",
        arch,
        depends=[musl, "libffi"],
        entries=[
            Entry("usr/bin/python3.14", musl_python(arch) or b'#!/bin/sh\necho "Python 3.14.7"\n', 0o755),
            Entry("usr/bin/python3", kind="hardlink", target="usr/bin/python3.14"),
            Entry("usr/bin/python", kind="symlink", mode=0o777, target="python3"),
            Entry("usr/lib/python3.14/os.py", b"# os\n" * 200, xattrs={"user.vulcan": "test"}),
            Entry("usr/lib/python3.14/site-packages/README.txt", b"site\n"),
        ],
        license="PSF-2.0",
    )
    libffi = Pkg("libffi", "3.5.2-r0", arch, depends=[musl], provides=["so:libffi.so.8=8.1.4"],
                 entries=[Entry("usr/lib/libffi.so.8.1.4", b"ffi" * 100, 0o755)])  # fmt: skip
    nodejs = Pkg(
        "nodejs",
        "24.18.1-r0",
        arch,
        depends=[musl, "ca-certificates-bundle"],
        entries=[Entry("usr/bin/node", b'#!/bin/sh\necho "v24.18.1"\n', 0o755)],
        license="MIT",
    )
    go = Pkg(
        "go",
        "1.26.8-r0",
        arch,
        depends=[musl],
        entries=[
            Entry("usr/lib/go/bin/go", b'#!/bin/sh\necho "go version go1.26.8 linux/amd64"\n', 0o755),
            Entry("usr/lib/go/src/fmt/print.go", b"package fmt\n" * 1000),
            Entry("usr/bin/go", kind="symlink", mode=0o777, target="../lib/go/bin/go"),
        ],
        license="BSD-3-Clause",
    )
    main = [baselayout_data, baselayout, release, keys, busybox, binsh, musl_pkg, certs, python, libffi, nodejs]
    return {"main": main, "community": [go]}


VSOCK_PROBE = r"""
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
struct vm_addr { unsigned short family, reserved; unsigned int port, cid; unsigned char flags, zero[3]; };
/* vsock-probe CID PORT: connect over AF_VSOCK (40), send the agent a ping, print what came back */
int main(int argc, char **argv) {
  if (argc != 3) { fputs("usage: vsock-probe CID PORT\n", stderr); return 2; }
  int s = socket(40, SOCK_STREAM, 0);
  if (s < 0) { printf("socket: %s\n", strerror(errno)); return 3; }
  struct vm_addr a = {0};
  a.family = 40; a.cid = (unsigned)strtoul(argv[1], 0, 10); a.port = (unsigned)strtoul(argv[2], 0, 10);
  if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) { printf("connect: %s\n", strerror(errno)); return 4; }
  const char *ping = "{\"op\":\"ping\"}\n";
  /* a peer that refuses may close before or after the ping is written: both are "no reply" */
  if (send(s, ping, strlen(ping), MSG_NOSIGNAL) < 0) {
    if (errno == EPIPE || errno == ECONNRESET) { printf("closed without a reply: %s\n", strerror(errno)); return 6; }
    printf("write: %s\n", strerror(errno)); return 5;
  }
  char buf[512];
  ssize_t n = read(s, buf, sizeof buf - 1);
  if (n <= 0) { printf("closed without a reply%s%s\n", n < 0 ? ": " : "", n < 0 ? strerror(errno) : ""); return 6; }
  buf[n] = 0;
  printf("reply: %s", buf);
  return 0;
}
"""


def vsock_probe() -> Pkg | None:
    """A package with /usr/bin/vsock-probe (static, musl-gcc): what a sandboxed program that
    tries to reach the agent from inside the guest does (x86_64 only)."""
    cc = shutil.which("musl-gcc")
    if cc is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "probe.c").write_text(VSOCK_PROBE)
        subprocess.run([cc, "-static", "-O2", "-o", f"{tmp}/vsock-probe", f"{tmp}/probe.c"], check=True)
        binary = (Path(tmp) / "vsock-probe").read_bytes()
    return Pkg("vsock-probe", "1.0-r0", "x86_64", entries=[Entry("usr/bin/vsock-probe", binary, 0o755)], license="MIT")


def setup(world: World, arch: str = "x86_64", runtimes: dict | None = None,  # type: ignore[type-arg]
          extra: list[Pkg] = ()) -> dict[str, bytes]:  # type: ignore[assignment]  # fmt: skip
    """``extra``: more packages in main (a runtime's world names them)."""
    world.pins["alpine"] = alpine_pins(runtimes or RUNTIMES, BASE, ["main", "community"])
    world.write_pins()
    repos = packages(arch)
    repos["main"] = [*repos["main"], *extra]
    return publish(world.mirror, repos, arch)
