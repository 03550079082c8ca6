"""HTTP(S) for the registry client, on the standard library's ``http.client``.

What client.py asks of it, and no more: a request with headers and a body of bytes, Basic
credentials when it says so, redirects followed (at most 10; the ``Authorization`` header goes
with a redirect only to the origin the request was sent to, never elsewhere), a body read as it
arrives (``read1``) or whole, TLS checked against the system's CAs or a given CA file, every
connect and read bounded by a timeout, connections kept alive per origin (each used by one request
at a time), and ``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY``/``NO_PROXY`` as curl and pip read them (HTTPS
through a proxy's ``CONNECT`` tunnel). No ``.netrc``, no compressed answers: the bytes a digest
covers are the bytes on the wire.

It replaced ``requests``, whose imports alone took 45 ms of a pull's start (0.115 -> 0.070 s to
import the pull, medians of 15).
"""

from __future__ import annotations

import base64
import http.client
import os
import select
import socket
import ssl
import threading
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

from .auth import origin

REDIRECTS = 10
USER_AGENT = "vulcan-images"


class TransportError(Exception):
    """A request that got no answer: ``kind`` is ``tls``, ``timeout`` or ``unreachable``."""

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind


class Response:
    """An answer: its status, headers (case-insensitive ``get``) and body. ``read1`` returns what
    one receive brought (at most ``n`` bytes); b"" at the end."""

    def __init__(self, url: str, resp: http.client.HTTPResponse, release: Any) -> None:
        self.url = url
        self.status_code = resp.status
        self.headers = resp.headers
        self._resp: http.client.HTTPResponse | None = resp
        self._release = release  # called with True once the body was read to its end
        self._buffered: bytes | None = None
        self._at = 0

    def read1(self, n: int) -> bytes:
        if self._buffered is not None:
            chunk = self._buffered[self._at : self._at + n]
            self._at += len(chunk)
            return chunk
        if self._resp is None:
            return b""
        try:
            chunk = self._resp.read1(n)
        except (OSError, http.client.HTTPException) as exc:
            self._done(False)
            raise TransportError("unreachable", f"{type(exc).__name__}: {exc}") from None
        if not chunk:
            self._done(True)
        return chunk

    def buffer(self) -> None:
        """Read the whole body now (a small answer), freeing the connection for the next request."""
        chunks = []
        while chunk := self.read1(1 << 20):
            chunks.append(chunk)
        self._buffered, self._at = b"".join(chunks), 0

    def close(self) -> None:
        self._buffered = None
        # a body read to its end, or none at all (HEAD, 204): the connection can take another request
        self._done(self._resp is not None and (self._resp.isclosed() or self._resp.length == 0))

    def _done(self, whole: bool) -> None:
        if self._resp is not None:
            resp, self._resp = self._resp, None
            keep = whole and not resp.will_close
            resp.close()  # its file, not the connection's socket
            self._release(keep)


class Transport:
    """Connections to the origins one client talks to (thread-safe: a connection is used by one
    request at a time)."""

    def __init__(self, ca: Path | None = None) -> None:
        self.ca = ca
        self._context: ssl.SSLContext | None = None
        self._idle: dict[tuple[str, str, int], list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()

    def context(self) -> ssl.SSLContext:
        if self._context is None:
            self._context = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
        return self._context

    def request(self, method: str, url: str, *, headers: dict[str, str] | None = None, body: bytes | None = None,
                auth: tuple[str, str] | None = None, timeout: float = 60.0, redirects: bool = True,
                stream: bool = False) -> Response:  # fmt: skip
        """``method`` ``url``; ``auth`` (Basic) and an ``Authorization`` header go to ``url``'s
        origin only, not to where it redirects elsewhere."""
        first = origin(url)
        h = {"User-Agent": USER_AGENT, **(headers or {})}
        if auth is not None:
            h["Authorization"] = _basic(*auth)
        for _ in range(REDIRECTS + 1):
            sent = {k: v for k, v in h.items() if origin(url) == first or k.lower() != "authorization"}
            resp = self._once(method, url, sent, body, timeout)
            location = resp.headers.get("Location")
            if not redirects or resp.status_code not in (301, 302, 303, 307, 308) or not location:
                if not stream:
                    resp.buffer()
                return resp
            resp.close()
            url = urljoin(url, location)
            if (resp.status_code == 303 and method != "HEAD") or (resp.status_code in (301, 302) and method == "POST"):
                method, body = "GET", None
                h = {k: v for k, v in h.items() if k.lower() not in ("content-type", "content-length")}
        raise TransportError("unreachable", f"more than {REDIRECTS} redirects from {url}")

    def _once(self, method: str, url: str, headers: dict[str, str], body: bytes | None, timeout: float) -> Response:
        parts = urlsplit(url)
        key, proxy = _route(url)
        target = url if proxy is not None and parts.scheme == "http" else (parts.path or "/") + (
            f"?{parts.query}" if parts.query else "")  # fmt: skip
        for attempt in (0, 1):
            conn, reused = self._connection(key, proxy, timeout)
            try:
                if proxy is not None and parts.scheme == "http" and proxy[1]:
                    headers = {**headers, "Proxy-Authorization": proxy[1]}
                conn.request(method, target, body=body, headers=headers)
                resp = conn.getresponse()
            except ssl.SSLError as exc:  # a certificate refused is one (SSLCertVerificationError)
                conn.close()
                raise TransportError("tls", str(exc)) from None
            except TimeoutError:
                conn.close()
                raise TransportError("timeout", f"no answer within {timeout:g} s") from None
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                conn.close()
                # the server closed a kept-alive connection as it was reused: a read asks again on
                # a new one (a write may have been taken before the close: said, not repeated)
                if reused and attempt == 0 and method in ("GET", "HEAD"):
                    continue
                raise TransportError("unreachable", f"{type(exc).__name__}: {exc}") from None
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise TransportError("unreachable", f"{type(exc).__name__}: {exc}") from None
            return Response(url, resp, lambda keep, c=conn: self._release(key, c, keep))
        raise AssertionError("unreachable")

    def warm(self, url: str, count: int, timeout: float) -> None:
        """Open ``count`` connections to ``url``'s origin, each on a thread of its own, and keep
        them idle: requests made at once later (a pull's documents, then its blobs) then start
        without a TCP and a TLS handshake each (a round trip or two on a real link). One that
        cannot be opened is left to the request that needs it to say so."""
        try:
            key, proxy = _route(url)
        except TransportError:
            return

        def one() -> None:
            try:
                conn = self._new(key, proxy, timeout)
            except TransportError:  # (a proxy URL it cannot use)
                return
            try:
                conn.connect()
            except (OSError, http.client.HTTPException):
                conn.close()
                return
            self._release(key, conn, True)

        for _ in range(count):
            threading.Thread(target=one, name="warm", daemon=True).start()

    def _connection(self, key: tuple[str, str, int], proxy: tuple[str, str] | None,
                    timeout: float) -> tuple[http.client.HTTPConnection, bool]:  # fmt: skip
        with self._lock:
            idle = self._idle.get(key, [])
            while idle:
                conn = idle.pop()
                if conn.sock is not None and not _dropped(conn.sock):
                    conn.sock.settimeout(timeout)
                    return conn, True
                conn.close()
        return self._new(key, proxy, timeout), False

    def _new(self, key: tuple[str, str, int], proxy: tuple[str, str] | None,
             timeout: float) -> http.client.HTTPConnection:  # fmt: skip
        scheme, host, port = key
        if proxy is None:
            if scheme == "https":
                return http.client.HTTPSConnection(host, port, timeout=timeout, context=self.context())
            return http.client.HTTPConnection(host, port, timeout=timeout)
        where = urlsplit(proxy[0])
        if where.scheme != "http" or not where.hostname:
            raise TransportError("unreachable", f"proxy {proxy[0]}: only an http:// proxy is supported")
        proxy_port = where.port or 80
        if scheme == "http":
            return http.client.HTTPConnection(where.hostname, proxy_port, timeout=timeout)
        conn = http.client.HTTPSConnection(where.hostname, proxy_port, timeout=timeout, context=self.context())
        conn.set_tunnel(host, port, headers={"Proxy-Authorization": proxy[1]} if proxy[1] else None)
        return conn

    def _release(self, key: tuple[str, str, int], conn: http.client.HTTPConnection, keep: bool) -> None:
        if not keep:
            conn.close()
            return
        with self._lock:
            self._idle.setdefault(key, []).append(conn)

    def close(self) -> None:
        with self._lock:
            for conns in self._idle.values():
                for conn in conns:
                    conn.close()
            self._idle.clear()


def _route(url: str) -> tuple[tuple[str, str, int], tuple[str, str] | None]:
    """(the origin a connection to ``url`` is kept under, the proxy it goes through or None);
    TransportError for a URL no request can be sent to."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TransportError("unreachable", f"not an http(s) URL: {url}")
    scheme, host, port = origin(url)
    if port is None or port < 0:
        raise TransportError("unreachable", f"a URL with a bad port: {url}")
    return (scheme, host, port), _proxy_for(parts.scheme, parts.hostname, port)


def _dropped(sock: socket.socket) -> bool:
    """A kept-alive connection the server closed (or that has bytes nobody asked for)."""
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


def _proxy_for(scheme: str, host: str, port: int) -> tuple[str, str] | None:
    """(the proxy's URL, its Proxy-Authorization header or "") for a request to ``host``, from
    the environment as curl and pip read it; None to go direct."""
    names = (f"{scheme}_proxy", "all_proxy")
    if not any(os.environ.get(n) or os.environ.get(n.upper()) for n in names):
        return None
    # the standard library's own reading of NO_PROXY (host names, domain suffixes, *, host:port)
    from urllib.request import proxy_bypass_environment  # type: ignore[attr-defined]

    if proxy_bypass_environment(f"{host}:{port}") or proxy_bypass_environment(host):
        return None
    url = next(v for n in names for v in (os.environ.get(n), os.environ.get(n.upper())) if v)
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    header = ""
    if parts.username is not None:
        header = _basic(unquote(parts.username), unquote(parts.password or ""))
    return url, header


def _basic(user: str, password: str) -> str:
    """An Authorization (or Proxy-Authorization) header's value for Basic credentials."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
