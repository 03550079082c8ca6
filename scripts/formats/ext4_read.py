"""Reads ext4 images without mounting them, through debugfs: stat, cat and rdump.

verify.py and the tests use it (the ext4 record's reader); the writer is ext4.py.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import tempfile
from pathlib import Path

from ..run import minimal_env, run_tool
from . import Inode

_STAT_RE = re.compile(r"Type: (.+?)\s+Mode:\s+(\d+)")
_OWNER_RE = re.compile(r"User:\s+(\d+)\s+Group:\s+(\d+).*?Size: (\d+)")
_LINKS_RE = re.compile(r"Links: (\d+)")
_FAST_LINK_RE = re.compile(r'Fast link dest: "(.*)"')


def _quote(path: str) -> str:
    return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'


def stat_many(image: Path, paths: list[str]) -> dict[str, Inode | None]:
    """``stat`` every path in one debugfs process (None: not in the image)."""
    if not paths:
        return {}
    script = "".join(f"stat {_quote('/' + p.lstrip('/'))}\n" for p in paths).encode("utf-8", "surrogateescape")
    proc = run_tool(["debugfs", "-f", "-", str(image)], input=script, env=minimal_env(), quiet=True, merge_stderr=True)
    text = proc.stdout.decode("utf-8", "surrogateescape")
    blocks = text.split("\ndebugfs: stat ")[1:]
    out: dict[str, Inode | None] = {}
    for path, block in zip(paths, blocks, strict=False):
        m, o = _STAT_RE.search(block), _OWNER_RE.search(block)
        if not m or not o:
            out[path] = None
            continue
        links = _LINKS_RE.search(block)
        fast = _FAST_LINK_RE.search(block)
        out[path] = Inode(
            m.group(1).strip(),
            int(m.group(2), 8),
            int(o.group(1)),
            int(o.group(2)),
            int(o.group(3)),
            int(links.group(1)) if links else 0,
            fast.group(1) if fast else "",
        )
    for path in paths[len(blocks) :]:
        out[path] = None
    return out


def cat(image: Path, path: str) -> bytes:
    """A file's bytes (``debugfs cat``); slow symlink targets are read the same way."""
    proc = run_tool(
        ["debugfs", "-R", f"cat {_quote('/' + path.lstrip('/'))}", str(image)], env=minimal_env(), quiet=True
    )
    return proc.stdout


def digests(image: Path, paths: set[str]) -> dict[str, str]:
    """The image's directories that hold ``paths`` copied out (debugfs rdump) to a private
    temporary directory, and hashed there."""
    tops = sorted({p.split("/", 1)[0] for p in paths if "/" in p})
    out: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="vulcan-digests-") as tmp:
        root = Path(tmp)
        rdump(image, tops, root)
        for p in paths:
            f = root / p
            try:
                st = os.lstat(f)
                if not stat.S_ISREG(st.st_mode):
                    continue
                if not st.st_mode & stat.S_IRUSR:  # copied out as it is in the image (--x--x--x): ours to read
                    os.chmod(f, st.st_mode | stat.S_IRUSR)
                with open(f, "rb") as fh:
                    out[p] = hashlib.file_digest(fh, "sha256").hexdigest()
            except OSError:
                continue
    return out


def rdump(image: Path, dirs: list[str], root: Path) -> list[str]:
    """Copy each directory of ``dirs`` (with everything under it) out of the image to
    ``root/<dir>``; returns the ones that did not arrive (debugfs exits 0 even when a path is
    missing, so the result is judged by what arrived)."""
    missing = []
    for d in dict.fromkeys(p.strip("/") for p in dirs):
        dest = (root / d).parent
        dest.mkdir(parents=True, exist_ok=True)
        run_tool(["debugfs", "-R", f"rdump {_quote('/' + d)} {_quote(str(dest))}", str(image)], env=minimal_env(),
                 quiet=True)  # fmt: skip
        if not (root / d).exists():
            missing.append(d)
    return missing
