"""Firecracker's API socket: a small HTTP/1.1 client over a Unix socket, and a VM configured through it.

Vulcan hosts (and snapshots) drive Firecracker this way rather than with ``--config-file``:
``PUT /boot-source``, ``/drives/<id>``, ``/machine-config``, ``/vsock``, then ``PUT /actions``
``{"action_type": "InstanceStart"}`` (src/firecracker/swagger/firecracker.yaml). The bodies are
the very sections of the config firecracker_config.py writes: one description of the VM, two
ways to give it. Firecracker answers 204 (or 200) on success, 4xx with ``{"fault_message": ...}``
otherwise; each request and its answer are logged under ``--debug``.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from .. import log
from ..errors import VulcanError
from . import connect_unix


class ApiError(VulcanError):
    """Firecracker refused an API request, or its socket did not answer."""

    exit_code = 8


def wait_for_socket(path: Path, timeout: float, alive: Any = None) -> None:
    """Until Firecracker listens on ``path`` (``alive()`` False: it exited first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise ApiError(f"Firecracker exited before it listened on {path}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                connect_unix(s, path)
                return
        except OSError:
            time.sleep(0.002)  # Firecracker listens within milliseconds: on a restore's clock
    raise ApiError(f"Firecracker did not listen on {path} within {timeout:.0f}s")


def request(sock: Path, method: str, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
    """One HTTP/1.1 request on the API socket; returns (status, decoded JSON body or None)."""
    data = b"" if body is None else json.dumps(body).encode()
    head = (f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n")  # fmt: skip
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        connect_unix(s, sock)
        s.sendall(head.encode() + data)
        raw = b""
        while b"\r\n\r\n" not in raw:
            chunk = s.recv(65536)
            if not chunk:
                break
            raw += chunk
        header, _, rest = raw.partition(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split()[1])
        except (IndexError, ValueError):
            raise ApiError(f"{method} {path}: not an HTTP answer from {sock}: {lines[0]!r}") from None
        length = next((int(v) for k, _, v in (x.partition(":") for x in lines[1:]) if k.lower() == "content-length"), 0)
        while len(rest) < length:
            chunk = s.recv(65536)
            if not chunk:
                break
            rest += chunk
    answer = json.loads(rest[:length]) if length else None
    log.debug(f"api {method} {path} {json.dumps(body) if body is not None else ''} -> {status} {answer or ''}")
    return status, answer


def put(sock: Path, path: str, body: Any, timeout: float = 30.0) -> None:
    _obeyed(sock, "PUT", path, body, timeout)


def patch(sock: Path, path: str, body: Any, timeout: float = 30.0) -> None:
    _obeyed(sock, "PATCH", path, body, timeout)


def _obeyed(sock: Path, method: str, path: str, body: Any, timeout: float) -> None:
    try:
        status, answer = request(sock, method, path, body, timeout)
    except OSError as exc:  # it died on the request, or never answered
        raise ApiError(f"{method} {path}: Firecracker did not answer on {sock}: {exc}") from None
    if status >= 300:
        fault = answer.get("fault_message") if isinstance(answer, dict) else answer
        raise ApiError(f"Firecracker refused {method} {path} (HTTP {status}): {fault}")


def configure_and_start(sock: Path, conf: dict[str, Any]) -> None:
    """The VM of a ``--config-file`` document, given through the API, then started."""
    put(sock, "/boot-source", conf["boot-source"])
    for drive in conf["drives"]:
        put(sock, f"/drives/{drive['drive_id']}", drive)
    put(sock, "/machine-config", conf["machine-config"])
    if "vsock" in conf:
        put(sock, "/vsock", conf["vsock"])
    put(sock, "/actions", {"action_type": "InstanceStart"})
