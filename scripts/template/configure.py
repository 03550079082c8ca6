"""Vulcan's part of a template: what turns an OCI image's root into a Vulcan guest.

The agent, the sandbox user (uid 1000, added to the image's passwd, group and shadow), /work,
the runtime check, the image config's ``Env`` and ``WorkingDir`` for what the agent runs
(``/etc/vulcan/env.json``), and an init that needs nothing from the image: ``/sbin/init`` and
``/etc/vulcan/overlay-init`` are the agent itself (as PID 1 it mounts what programs expect,
reaps zombies and restarts the agent; as overlay-init it builds the read-only root's overlay),
so an image without a shell, busybox or an init system boots.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..rootfs import AGENT, OVERLAY_INIT
from ..rootfs.configure import SANDBOX_UID
from ..rootfs.tree import Tree
from .source import TemplateError

ENV_FILE = "etc/vulcan/env.json"


def _place(tree: Tree, path: str) -> str:
    """Where ``path`` is in the image: through its symlinks (a merged /usr: sbin -> usr/sbin)."""
    return tree.resolve_parent(path, "vulcan")


def _lines(tree: Tree, path: str) -> list[str]:
    data = tree.read(path)
    return data.decode("utf-8", "surrogateescape").splitlines() if data else []


def _rewrite(tree: Tree, path: str, lines: list[str], mode: int, gid: int = 0) -> None:
    """Write a file, keeping the image's own mode and owner when it had one."""
    old = tree.nodes.get(path)
    if old is not None and old.kind == "file":
        mode, uid, gid = old.mode, old.uid, old.gid
    else:
        uid = 0
    text = "\n".join(lines) + "\n"
    tree.put_generated(path, "file", mode, text.encode("utf-8", "surrogateescape"), uid=uid, gid=gid)


def _ids(lines: list[str]) -> dict[int, str]:
    out = {}
    for line in lines:
        f = line.split(":")
        if len(f) >= 3 and f[2].isdigit():
            out[int(f[2])] = f[0]
    return out


def accounts(tree: Tree, reference: str) -> None:
    """The sandbox user and group (uid and gid 1000, home /work), unless the image has them:
    refused when another name has that uid or gid (the agent runs sandboxed programs as 1000)."""
    passwd, group = _lines(tree, "etc/passwd"), _lines(tree, "etc/group")
    if not passwd:
        raise TemplateError(
            f"{reference}: the image has no /etc/passwd",
            hint="a template needs an image with a root user (any distribution's base image)",
        )
    for lines, what, file in ((passwd, "uid", "/etc/passwd"), (group, "gid", "/etc/group")):
        taken = _ids(lines).get(SANDBOX_UID)
        if taken not in (None, "sandbox"):
            raise TemplateError(
                f"{reference}: {what} {SANDBOX_UID} is {taken!r} in the image's {file}; the agent runs sandboxed "
                f"programs as {what} {SANDBOX_UID} ('sandbox')",
                hint=f"use an image without a {what} {SANDBOX_UID} (or one that names it 'sandbox')",
            )
    names = {line.split(":")[0] for line in passwd}
    if "sandbox" not in names:
        shell = next((s for s in ("bin/sh", "bin/bash") if _place(tree, s) in tree.nodes), None)
        passwd.append(f"sandbox:x:{SANDBOX_UID}:{SANDBOX_UID}:Vulcan sandbox:/work:{'/' + shell if shell else '/'}")
        _rewrite(tree, "etc/passwd", passwd, 0o644)
        shadow = _lines(tree, "etc/shadow")
        if shadow or "etc/shadow" in tree.nodes:
            shadow.append("sandbox:!::0:::::")
            _rewrite(tree, "etc/shadow", shadow, 0o640)
    if "sandbox" not in {line.split(":")[0] for line in group}:
        group.append(f"sandbox:x:{SANDBOX_UID}:")
        _rewrite(tree, "etc/group", group, 0o644)
        gshadow = _lines(tree, "etc/gshadow")
        if gshadow:
            gshadow.append("sandbox:!::")
            _rewrite(tree, "etc/gshadow", gshadow, 0o640)


def environment(config: Mapping[str, Any]) -> dict[str, Any]:
    """The image config's ``Env`` and ``WorkingDir``, as the agent reads them."""
    env: dict[str, str] = {}
    for item in config.get("Env") or []:
        if isinstance(item, str) and "=" in item:
            key, value = item.split("=", 1)
            if key:
                env[key] = value
    doc: dict[str, Any] = {"env": env}
    cwd = config.get("WorkingDir")
    if isinstance(cwd, str) and cwd.startswith("/") and cwd.strip("/"):  # "/" is no choice: /work stays
        doc["cwd"] = cwd
    return doc


def vulcan(
    tree: Tree, runtime_check: Sequence[str], runtime: str, guest: bytes, config: Mapping[str, Any], reference: str
) -> None:
    accounts(tree, reference)
    agent = _place(tree, AGENT)
    tree.put_generated(agent, "file", 0o755, guest)
    tree.put_generated("work", "dir", 0o755, uid=SANDBOX_UID, gid=SANDBOX_UID)
    etc = _place(tree, "etc/vulcan/x")[:-2]
    tree.put_generated(f"{etc}/check.json", "file", 0o644, (json.dumps(list(runtime_check)) + "\n").encode())
    tree.put_generated(f"{etc}/runtime", "file", 0o644, f"{runtime}\n".encode())
    env = json.dumps(environment(config), sort_keys=True, indent=1) + "\n"
    tree.put_generated(f"{etc}/env.json", "file", 0o644, env.encode())
    # the agent is PID 1 (no init in most images) and overlay-init (no shell or mount needed)
    tree.put_generated(_place(tree, "sbin/init"), "symlink", 0o777, linkname=f"/{AGENT}")
    tree.put_generated(_place(tree, OVERLAY_INIT), "symlink", 0o777, linkname=f"/{AGENT}")
    for d in (".vulcan", ".vulcan/rw", ".vulcan/new", ".vulcan/ro"):  # mount points a read-only root needs
        tree.put_generated(d, "dir", 0o755)
    tree.put_generated(_place(tree, "etc/hostname"), "file", 0o644, b"vulcan\n")
    for d in ("proc", "sys", "dev", "tmp", "run"):
        if d not in tree.nodes:
            tree.put_generated(d, "dir", 0o1777 if d == "tmp" else 0o755)
    tree.put_generated("dev/console", "char", 0o600, devmajor=5, devminor=1)
    tree.put_generated("dev/null", "char", 0o666, devmajor=1, devminor=3)
