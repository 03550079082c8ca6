"""The host side of the agent protocol (guest/README.md), over TCP or Firecracker's vsock.

Firecracker exposes a guest's AF_VSOCK ports on a Unix socket (``vsock.uds_path``): the host
connects, writes ``CONNECT <port>\\n`` and reads ``OK <host port>\\n`` before the stream is
the guest's (firecracker docs/vsock.md, "Host-initiated connections")."""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import VulcanError
from . import connect_unix

T = TypeVar("T")


class AgentError(VulcanError):
    """The agent could not be reached or answered with an error."""

    exit_code = 8


class AgentUnreachable(AgentError):
    """No connection to the agent could be made."""


class AgentClosed(AgentError):
    """The agent's end of the connection closed before it answered."""


def vsock_connect(uds_path: str, port: int, timeout: float) -> socket.socket:
    """Connect through Firecracker's vsock Unix socket, retrying until the guest listens."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(max(0.5, deadline - time.monotonic()))
        try:
            connect_unix(sock, uds_path)
            sock.sendall(f"CONNECT {port}\n".encode())
            reply = _readline(sock, 64)
            if reply.startswith(b"OK "):
                return sock
            last = f"handshake answered {reply!r}"
        except OSError as exc:
            last = str(exc)
        sock.close()
        time.sleep(0.1)
    raise AgentUnreachable(f"cannot reach the agent on vsock port {port} via {uds_path}: {last}")


def settled(uds_path: str, port: int, timeout: float, opening: Callable[[AgentClient], T]) -> tuple[AgentClient, T]:
    """A connection to a restored clone's agent, and what ``opening`` (idempotent requests:
    a ping, the clock) got on it. The guest resets its vsock transport when it gets to the
    restore's reset event after the resume, closing every connection it has then; one the host
    made before that is closed under its first requests ("the agent closed the connection", seen
    on a loaded host with a slow guest). Such a connection is made again and ``opening`` sent
    again, until ``timeout``; a request after ``opening`` (a program) is never sent twice."""
    deadline = time.monotonic() + timeout
    while True:
        client = AgentClient(vsock_connect(uds_path, port, deadline - time.monotonic()),
                             timeout=max(1.0, deadline - time.monotonic()))  # fmt: skip
        try:
            return client, opening(client)
        except BaseException as exc:
            client.close()
            if not isinstance(exc, (AgentClosed, ConnectionError)) or time.monotonic() >= deadline:
                raise
        time.sleep(0.01)


def _readline(sock: socket.socket, limit: int) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        buf += chunk
        if len(buf) > limit:
            break
    return buf


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool
    truncated: bool
    duration_ms: int


class AgentClient:
    def __init__(self, sock: socket.socket, timeout: float = 120.0) -> None:
        sock.settimeout(timeout)
        self.sock = sock
        self.file = sock.makefile("rwb")

    def request(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.file.write(json.dumps(obj).encode() + b"\n")
        self.file.flush()
        line = self.file.readline()
        if not line:
            raise AgentClosed("the agent closed the connection")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise AgentError(f"the agent refused {obj.get('op')}: {reply.get('error')}")
        return reply

    def ping(self) -> dict[str, Any]:
        return self.request({"op": "ping"})

    def clock(self, unix_ns: int) -> int:
        """Set the guest's clock to the host's (a restored clone resumes with its snapshot's
        time); returns how far the guest's clock was off, in ms (negative: behind)."""
        return int(self.request({"op": "clock", "unix_ns": unix_ns})["offset_ms"])

    def exec(self, argv: list[str], timeout_ms: int = 60_000, user: str | None = None) -> ExecResult:
        req: dict[str, Any] = {"op": "exec", "argv": argv, "timeout_ms": timeout_ms}
        if user:
            req["user"] = user
        r = self.request(req)

        def decode(s: str) -> bytes:
            return base64.b64decode(s) if r.get("encoding") == "base64" else s.encode()

        return ExecResult(
            r["exit_code"], decode(r["stdout"]), decode(r["stderr"]), r["timed_out"], r["truncated"], r["duration_ms"]
        )

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def runtime_check(client: AgentClient, check: list[str]) -> str:
    """Ping the agent and run the image's runtime check; the first line it printed. A failing
    check is a VulcanError (BootFailed) with its exit code and the end of its stderr."""
    from . import BootFailed

    client.ping()
    result = client.exec(check)
    if result.exit_code != 0:
        raise BootFailed(f"{' '.join(check)} exited {result.exit_code}: {result.stderr[-300:]!r}")
    return (result.stdout or result.stderr).decode(errors="replace").strip().splitlines()[0]
