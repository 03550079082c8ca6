"""The real Alpine v3.19 world the ``alpine`` fixture builds (tests of images against real apk)."""

from __future__ import annotations

BRANCH = "v3.19"
BASE = ["alpine-baselayout", "alpine-keys", "alpine-release", "busybox", "busybox-binsh", "musl",
        "ca-certificates-bundle"]  # fmt: skip
RUNTIMES = {
    "apk": {"world": ["apk-tools"], "check": ["apk", "--version"], "binary": "/sbin/apk"},
    "openssl": {"world": ["openssl"], "check": ["openssl", "version"], "binary": "/usr/bin/openssl"},
    # meta packages (no files of their own but apk's .dummy) beside real ones: the tree comparison
    "meta": {"world": ["alpine-base", "libc-utils"], "check": ["apk", "--version"], "binary": "/sbin/apk"},
}
