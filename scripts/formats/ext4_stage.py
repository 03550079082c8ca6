"""The staging-directory fallback of ext4.py, run as root or under fakeroot.

``python -m scripts.formats.ext4_stage TAR DIR -- mke2fs ARGS``: extract our own, already validated
tar stream into DIR keeping owners, modes, devices and xattrs, then run mke2fs on it. Only
used with e2fsprogs < 1.47.1, which cannot read tar.
"""

from __future__ import annotations

import os
import subprocess
import sys

from .. import log
from ..run import which


def stage(tar_path: str, dest: str, mke2fs: list[str]) -> int:
    """Inside root/fakeroot: extract our (already validated) stream, then run mke2fs."""
    import tarfile  # the fallback path only

    root = os.path.realpath(dest)
    with tarfile.open(tar_path, "r:") as tar:
        for member in tar:
            parent = os.path.realpath(os.path.join(root, os.path.dirname(member.name)))
            if parent != root and not parent.startswith(root + os.sep):
                raise SystemExit(f"refusing {member.name}: outside the staging directory")
            # our own, already validated stream (filter= exists from Python 3.11.4 on)
            extra = {"filter": "fully_trusted"} if hasattr(tarfile, "data_filter") else {}
            tar.extract(member, root, numeric_owner=True, **extra)  # type: ignore[arg-type]
            for key, value in member.pax_headers.items():
                if key.startswith("SCHILY.xattr."):
                    try:
                        os.setxattr(
                            os.path.join(root, member.name),
                            key[len("SCHILY.xattr.") :],
                            value.encode("utf-8", "surrogateescape"),
                            follow_symlinks=False,
                        )
                    except OSError as exc:
                        log.warn(f"{member.name}: cannot set xattr {key}: {exc}")
    return subprocess.call([which(mke2fs[0]), *mke2fs[1:]])


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[3] == "--":
        sys.exit(stage(sys.argv[1], sys.argv[2], sys.argv[4:]))
    sys.exit("usage: python -m scripts.formats.ext4_stage TAR DIR -- mke2fs ARGS")
