"""A real OCI registry for the tests: Debian's ``docker-registry`` (distribution 2.8), started by
the test on 127.0.0.1 with a port and storage of its own; plain, with htpasswd Basic auth, with
TLS from a CA the test makes, or with distribution's ``token`` auth and a small token issuer
here (JWTs signed with a key whose certificate the registry trusts, which it really verifies)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

USER, PASSWORD = "vulcan", "s3cret-pass"


def require_registry() -> str:
    found = shutil.which("docker-registry") or shutil.which("registry")
    if found is None:
        pytest.skip("docker-registry is not installed (Debian: docker-registry; .ci/setup-debian installs it)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Ca:
    """A CA made for one test run, and a server certificate for 127.0.0.1 signed by it."""

    dir: Path
    cert: Path = field(init=False)
    server_cert: Path = field(init=False)
    server_key: Path = field(init=False)

    def __post_init__(self) -> None:
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.dir.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vulcan test CA")])
        ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
              .not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .sign(ca_key, hashes.SHA256()))  # fmt: skip
        key = ec.generate_private_key(ec.SECP256R1())
        server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
        cert = (x509.CertificateBuilder().subject_name(server_name).issuer_name(ca_name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                            x509.DNSName("localhost")]), critical=False)
                .sign(ca_key, hashes.SHA256()))  # fmt: skip
        self.cert, self.server_cert, self.server_key = (
            self.dir / "ca.pem",
            self.dir / "server.pem",
            self.dir / "server.key",
        )
        self.cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        self.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.server_key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))  # fmt: skip


class TokenIssuer:
    """distribution's token auth: checks Basic credentials and grants the asked scopes in an
    ES256 JWT whose x5c header carries the certificate the registry's rootcertbundle trusts."""

    def __init__(self, workdir: Path, ca: Ca | None = None) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vulcan test token issuer")])
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
                     .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
                     .not_valid_after(now + datetime.timedelta(days=1)).sign(self.key, hashes.SHA256()))  # fmt: skip
        self.bundle = workdir / "token-issuer.pem"
        self.bundle.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        self.der = base64.b64encode(self.cert.public_bytes(serialization.Encoding.DER)).decode()
        self.issued: list[list[str]] = []  # the scopes of each token
        self.refused = 0
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                q = parse_qs(urlsplit(self.path).query)
                given = self.headers.get("Authorization", "")
                want = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                if given != want:
                    issuer.refused += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                scopes = [s for v in q.get("scope", []) for s in v.split(" ")]
                issuer.issued.append(scopes)
                body = json.dumps({"token": issuer.token(q.get("service", [""])[0], scopes)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if ca is not None:  # a token service on another host gets credentials only over HTTPS
            import ssl

            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(ca.server_cert, ca.server_key)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"{'https' if ca else 'http'}://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def token(self, service: str, scopes: list[str]) -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        now = int(time.time())
        access = []
        for s in scopes:
            kind, _, rest = s.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        header = {"alg": "ES256", "typ": "JWT", "x5c": [self.der]}
        claims = {"iss": "vulcan-test-issuer", "sub": USER, "aud": service, "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": str(uuid.uuid4()), "access": access}  # fmt: skip
        signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class RunningRegistry:
    host: str  # 127.0.0.1:PORT
    storage: Path
    ca: Ca | None
    auth: str  # none, htpasswd, token
    issuer: TokenIssuer | None
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def base(self) -> str:
        return f"{'https' if self.ca else 'http'}://{self.host}"

    def flags(self) -> list[str]:
        """What publish and pull need to reach it."""
        return ["--ca", str(self.ca.cert)] if self.ca else ["--insecure"]

    def stored_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.storage.rglob("data") if p.is_file())


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """A server the test started: asked to stop, killed if it has not within 10 s."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@contextmanager
def running_registry(workdir: Path, auth: str = "none", tls: bool = False) -> Iterator[RunningRegistry]:
    binary = require_registry()
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ca = Ca(workdir / "tls") if tls else None
    issuer = TokenIssuer(workdir, ca) if auth == "token" else None
    config = [
        "version: 0.1", "log:", "  level: warn", "  accesslog:", "    disabled: true", "storage:", "  filesystem:",
        f"    rootdirectory: {workdir / 'storage'}", "  delete:", "    enabled: true", "http:",
        f"  addr: 127.0.0.1:{port}", "  secret: vulcan-tests-only",
    ]  # fmt: skip
    if ca:
        config += ["  tls:", f"    certificate: {ca.server_cert}", f"    key: {ca.server_key}"]
    if auth == "htpasswd":
        htpasswd = workdir / "htpasswd"
        subprocess.run(["htpasswd", "-Bbc", str(htpasswd), USER, PASSWORD], check=True, capture_output=True)
        config += ["auth:", "  htpasswd:", "    realm: vulcan-test", f"    path: {htpasswd}"]
    elif issuer is not None:
        config += ["auth:", "  token:", f"    realm: {issuer.url}", "    service: vulcan-test-registry",
                   "    issuer: vulcan-test-issuer", f"    rootcertbundle: {issuer.bundle}"]  # fmt: skip
    (workdir / "config.yml").write_text("\n".join(config) + "\n")
    log = workdir / "registry.log"
    with open(log, "wb") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen([binary, "serve", str(workdir / "config.yml")], stdout=out, stderr=subprocess.STDOUT)
    reg = RunningRegistry(f"127.0.0.1:{port}", workdir / "storage", ca, auth, issuer, proc, log)
    deadline = time.monotonic() + 30
    while True:
        try:
            requests.get(reg.base + "/v2/", timeout=5, verify=str(ca.cert) if ca else True)
            break
        except requests.exceptions.RequestException:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"docker-registry did not start: {log.read_text()[-2000:]}") from None
            time.sleep(0.05)
    try:
        yield reg
    finally:
        _stop(proc)
        if issuer is not None:
            issuer.close()


PROXY_USER, PROXY_PASSWORD = "fleet", "proxy-pass"


@dataclass
class RunningProxy:
    """Debian's tinyproxy on 127.0.0.1, asking for Basic credentials (in ``url``)."""

    url: str  # http://USER:PASSWORD@127.0.0.1:PORT
    log: Path

    def requests(self) -> list[str]:
        """The request lines it took, in order: ``CONNECT host:port`` for a tunnel, ``GET
        http://...`` for a plain HTTP request it relayed."""
        return re.findall(r"Request \(file descriptor \d+\): (.+?) HTTP/1\.[01]", self.log.read_text())


@contextmanager
def running_proxy(workdir: Path) -> Iterator[RunningProxy]:
    binary = shutil.which("tinyproxy")
    if binary is None:
        pytest.skip("tinyproxy is not installed (Debian: tinyproxy; .ci/setup-debian installs it)")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = workdir / "tinyproxy.conf"
    conf.write_text(f"Port {port}\nListen 127.0.0.1\nTimeout 60\nMaxClients 50\nAllow 127.0.0.1\n"
                    f"LogLevel Connect\nBasicAuth {PROXY_USER} {PROXY_PASSWORD}\n")  # fmt: skip
    log = workdir / "tinyproxy.log"
    with open(log, "wb") as out:  # -d: in the foreground, its log on standard output
        proc = subprocess.Popen([binary, "-d", "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"tinyproxy did not start: {log.read_text()[-2000:]}") from None
            time.sleep(0.05)
    try:
        yield RunningProxy(f"http://{PROXY_USER}:{PROXY_PASSWORD}@127.0.0.1:{port}", log)
    finally:
        _stop(proc)


class ReferrersProxy:
    """The real registry behind a proxy that adds the one thing distribution 2.8 lacks: the
    referrers API (distribution-spec v1.1: ``GET /v2/<name>/referrers/<digest>``, and
    ``OCI-Subject`` on the answer to a manifest PUT that has a subject). Every other request,
    and every byte, goes to and comes from the registry itself."""

    def __init__(self, upstream: RunningRegistry) -> None:
        self.upstream = upstream
        self.referrers: dict[str, list[dict[str, object]]] = {}
        self.api_calls = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # as web servers do (mirror.py says why)

            def log_message(self, *args: object) -> None:
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = urlsplit(self.path).path
                parts = path.split("/")
                if self.command == "GET" and "referrers" in parts:
                    proxy.api_calls += 1
                    digest = parts[-1]
                    doc = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                                      "manifests": proxy.referrers.get(digest, [])}).encode()  # fmt: skip
                    self.send_response(200)
                    self.send_header("Content-Type", "application/vnd.oci.image.index.v1+json")
                    self.send_header("Content-Length", str(len(doc)))
                    self.end_headers()
                    self.wfile.write(doc)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                r = requests.request(self.command, proxy.upstream.base + self.path, headers=headers, data=body,
                                     allow_redirects=False, timeout=60)  # fmt: skip
                extra = {}
                if self.command == "PUT" and "manifests" in parts and r.status_code == 201:
                    doc_in = json.loads(body)
                    if "subject" in doc_in:
                        entry = {"mediaType": doc_in["mediaType"], "size": len(body),
                                 "digest": "sha256:" + hashlib.sha256(body).hexdigest(),
                                 "artifactType": doc_in.get("artifactType")}  # fmt: skip
                        proxy.referrers.setdefault(doc_in["subject"]["digest"], []).append(entry)
                        extra["OCI-Subject"] = doc_in["subject"]["digest"]
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(k, v.replace(proxy.upstream.base, proxy.base))
                for k, v in extra.items():
                    self.send_header(k, v)
                content = b"" if self.command == "HEAD" else r.content
                self.send_header("Content-Length", str(len(content) if self.command != "HEAD" else
                                                       r.headers.get("Content-Length", "0")))  # fmt: skip
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_PUT = do_POST = do_PATCH = do_HEAD = do_DELETE = _relay

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.base = f"http://{self.host}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Seen:
    """One request a test server received."""

    method: str
    path: str
    headers: dict[str, str]


class Interposer:
    """A registry in front of the real one, as a malicious registry or a proxy on the path would
    be: it relays every request to ``upstream`` (the real docker-registry) and its answer back,
    except where ``answer`` (given the request) returns an answer of its own: (status, headers,
    body chunks, seconds to wait before each chunk); ``rewrite`` may change the headers of a
    relayed answer. It records every request. With ``ca``, it speaks TLS with a certificate of
    that CA; plain HTTP otherwise (a sniffer is an Interposer with no upstream)."""

    def __init__(self, upstream: RunningRegistry | None, ca: Ca | None = None) -> None:
        import ssl
        from collections.abc import Callable

        self.upstream = upstream
        self.seen: list[Seen] = []
        self.answer: Callable[[Seen], tuple[int, dict[str, str], list[bytes], float] | None] = lambda r: None
        self.rewrite: Callable[[Seen, dict[str, str]], dict[str, str]] = lambda r, h: h
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # as web servers do (mirror.py says why)

            def log_message(self, *args: object) -> None:
                pass

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                seen = Seen(self.command, self.path, dict(self.headers.items()))
                proxy.seen.append(seen)
                own = proxy.answer(seen)
                if own is None and proxy.upstream is None:
                    own = (500, {}, [b"a sniffer only"], 0.0)
                if own is not None:
                    status, headers, chunks, pause = own
                    self.send_response(status)
                    for k, v in headers.items():
                        if v:  # an empty Content-Length: none, the body ends when the connection does
                            self.send_header(k, v)
                    if "Content-Length" not in headers:
                        self.send_header("Content-Length", str(sum(len(c) for c in chunks)))
                    else:
                        self.close_connection = True
                    self.end_headers()
                    try:
                        for chunk in chunks:
                            if pause:
                                time.sleep(pause)
                            self.wfile.write(chunk)
                            self.wfile.flush()
                    except OSError:  # the client gave up: what the test wants to see
                        self.close_connection = True
                    return
                assert proxy.upstream is not None
                verify = str(proxy.upstream.ca.cert) if proxy.upstream.ca else True
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                r = requests.request(self.command, proxy.upstream.base + self.path, headers=headers, data=body,
                                     allow_redirects=False, timeout=60, verify=verify)  # fmt: skip
                out = {
                    k: v.replace(proxy.upstream.base, proxy.base)
                    for k, v in r.headers.items()
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding")
                }
                out = proxy.rewrite(seen, out)
                self.send_response(r.status_code)
                for k, v in out.items():
                    self.send_header(k, v)
                content = b"" if self.command == "HEAD" else r.content
                self.send_header("Content-Length", str(len(content)) if self.command != "HEAD" else
                                 r.headers.get("Content-Length", "0"))  # fmt: skip
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_PUT = do_POST = do_PATCH = do_HEAD = do_DELETE = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if ca is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(ca.server_cert, ca.server_key)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.base = f"{'https' if ca else 'http'}://{self.host}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def authorized(self) -> list[Seen]:
        """The requests that carried credentials or a token."""
        return [s for s in self.seen if any(k.lower() == "authorization" for k in s.headers)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
