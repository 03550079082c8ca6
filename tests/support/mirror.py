"""An upstream-shaped HTTP mirror on 127.0.0.1 that counts requests and misbehaves on demand.

Paths are served as ``/<upstream host>/<upstream path>``, which is what VULCAN_MIRROR expects.
Only where the bytes come from is faked; everything our code does with them is real.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


@dataclass
class Mirror:
    files: dict[str, bytes] = field(default_factory=dict)
    # per path, a queue of faults applied to the next requests: "500", "404", "drop", "wrong"
    faults: dict[str, list[str]] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # (method, path, Range)
    delay_s: float = 0.0  # pause mid-body (to make concurrent runs overlap)
    latency_s: float = 0.0  # before each response (a simulated link)
    rate: float = 0.0  # bytes/s per connection, 0 = unlimited (a simulated link)
    bytes_served: int = 0
    inflight: int = 0
    max_inflight: int = 0  # most requests served at the same time
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, upstream_url: str, data: bytes) -> None:
        parts = urlsplit(upstream_url)
        self.files[f"/{parts.netloc}{parts.path}"] = data

    def remove(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        self.files.pop(f"/{parts.netloc}{parts.path}", None)

    def fail(self, upstream_url: str, *faults: str) -> None:
        parts = urlsplit(upstream_url)
        self.faults.setdefault(f"/{parts.netloc}{parts.path}", []).extend(faults)

    def count(self, suffix: str = "") -> int:
        return sum(1 for _, path, _ in self.requests if path.endswith(suffix))


def _handler(mirror: Mirror) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # TCP_NODELAY, as web servers set on kept-alive connections: with Nagle's algorithm a
        # body written after its headers waits for the client's delayed ACK (40 ms a request)
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            try:
                self._get()
            finally:
                with mirror.lock:
                    mirror.inflight -= 1

        def _get(self) -> None:
            path = urlsplit(self.path).path
            rng = self.headers.get("Range")
            with mirror.lock:
                mirror.inflight += 1
                mirror.max_inflight = max(mirror.max_inflight, mirror.inflight)
                mirror.requests.append(("GET", path, rng))
                queue = mirror.faults.get(path) or []
                fault = queue.pop(0) if queue else None
            data = mirror.files.get(path)
            if fault == "500":
                return self._send(500, b"boom")
            if fault == "404" or data is None:
                return self._send(404, b"not found")
            if fault == "wrong":
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            start = 0
            status = 200
            if rng and rng.startswith("bytes=") and rng.endswith("-"):
                start = int(rng[6:-1])
                if start >= len(data):
                    return self._send(416, b"")
                status = 206
            body = data[start:]
            if mirror.latency_s:
                time.sleep(mirror.latency_s)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if fault == "drop":  # half the body, then the connection dies
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            with mirror.lock:
                mirror.bytes_served += len(body)
            if mirror.rate:
                step = 64 << 10
                for i in range(0, len(body), step):
                    self.wfile.write(body[i : i + step])
                    time.sleep(min(step, len(body) - i) / mirror.rate)
                return
            half = len(body) // 2
            self.wfile.write(body[:half])
            if mirror.delay_s:
                self.wfile.flush()
                time.sleep(mirror.delay_s)
            self.wfile.write(body[half:])

        def _send(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def serve() -> tuple[Mirror, ThreadingHTTPServer]:
    mirror = Mirror()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(mirror))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    mirror.url = f"http://127.0.0.1:{server.server_address[1]}"
    return mirror, server
