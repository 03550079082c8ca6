"""Whether another user could change what is at a path: the rule for code we load and bytes we trust.

A path is safe when every directory on its real path, from ``/``, and the path itself are owned
by this user or root and writable by nobody else (OpenSSH's StrictModes rule), with two
exceptions a demanding user expects: a sticky directory such as ``/tmp`` may be writable by
everyone, because others cannot rename or remove what is ours inside it (the next component must
then be ours or root's); and a directory writable by this user's private group (umask 002 on
systems with user private groups) counts as ours when nobody else is in that group.

Used for the CRC-32C helper mke2fs loads (formats/ext4_preload.py), the cache, the tools
directory and the output directories (``require_safe``): a cached stream another user could edit
would put their bytes into an image.
"""

from __future__ import annotations

import functools
import os
import stat
from pathlib import Path

from .errors import VulcanError


class UnsafePath(VulcanError):
    """A directory or file that another user could change is where we would load code or keep bytes."""

    exit_code = 6


def _nearest_existing(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


@functools.cache
def _group_is_private(gid: int) -> bool:
    """Nobody but this user is in ``gid`` (a user private group)."""
    import grp
    import pwd

    try:
        me = pwd.getpwuid(os.getuid()).pw_name
        members = set(grp.getgrgid(gid).gr_mem)
        others = {p.pw_name for p in pwd.getpwall() if p.pw_gid == gid} - {me}
    except (KeyError, OSError):
        return False
    return gid == os.getgid() and members <= {me} and not others


def problem(path: Path, sticky_ok: bool = False) -> str | None:
    """Why another user could change what is (or will be made) at ``path``; None when nobody but
    this user and root can. A path that does not exist yet is judged by its nearest existing
    parent: what this user creates there is theirs. ``sticky_ok``: ``path`` itself may be a
    sticky directory (/dev/shm), for a caller that only makes private directories inside it."""
    existing = _nearest_existing(path)
    made_here = existing != Path(os.path.abspath(path))  # this user will create the rest, inside it
    real = Path(os.path.realpath(existing))
    trusted = {0, os.getuid()}
    chain = [*reversed(real.parents), real]
    for i, p in enumerate(chain):
        try:
            st = os.lstat(p)
        except OSError as exc:
            return f"{p} cannot be examined: {exc.strerror or exc}"
        if st.st_uid not in trusted:
            return f"{p} is owned by uid {st.st_uid}, another user"
        others_write = st.st_mode & stat.S_IWOTH
        group_write = st.st_mode & stat.S_IWGRP and not (st.st_uid == os.getuid() and _group_is_private(st.st_gid))
        if not (others_write or group_write):
            continue
        last = i == len(chain) - 1 and not made_here and not sticky_ok
        if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX and not last:
            continue  # /tmp: what is ours inside stays ours; the next component is checked
        who = "every user" if others_write else f"group {st.st_gid}"
        return f"{p} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def require_safe(path: Path, what: str, setting: str | None, sticky_ok: bool = False) -> None:
    """Refuse to use ``path`` (``what``: "the cache", ...) when another user could change it."""
    why = problem(path, sticky_ok)
    if why is None:
        return
    move = f"or point {setting} at a directory of your own" if setting else "or use a directory of your own"
    raise UnsafePath(
        f"{what} {path} could be changed by another user: {why}",
        hint=f"remove the other users' write access (chmod go-w on that directory) {move}; bytes kept "
        "there go into images and hosts unchecked",
    )
