"""A client of the OCI distribution API (distribution-spec v1.1), as much of it as publish and pull use.

- Auth as registries ask for it: anonymous first; on ``401`` the ``WWW-Authenticate`` challenge
  says ``Basic`` (credentials sent) or ``Bearer realm=...,service=...,scope=...`` (a token is
  fetched from the realm with the credentials, cached per scope: ghcr.io, Docker Hub,
  distribution's ``token`` auth). Credentials: ``VULCAN_REGISTRY_USER``/``VULCAN_REGISTRY_PASSWORD``
  or Docker's ``config.json`` (auth.py).
- HTTPS with the system CAs or ``ca`` (a PEM file); plain HTTP only with ``insecure``.
- Credentials (Basic, or a Bearer token) go only to the registry's own host and port, with the
  scheme it was given: an upload ``Location`` on another host, port or scheme gets none, and one
  that would go from HTTPS to plain HTTP is refused. A token service (``realm``) gets the
  credentials over HTTPS wherever the registry names it (Docker Hub's is auth.docker.io); over
  plain HTTP only when it is the very host given with ``insecure``; otherwise it is refused.
- Nothing is read unbounded: a manifest or referrers list of more than ``MAX_DOCUMENT`` bytes, a
  blob longer than its descriptor says, are refused as they arrive. Every read waits at most
  ``timeout`` seconds, and all of a command's requests together end by its ``deadline``
  (``VULCAN_REGISTRY_TIMEOUT``, ``VULCAN_REGISTRY_DEADLINE``): a registry that trickles a byte
  at a time is cut off.
- Blobs: HEAD before upload, cross-repository mount when asked, monolithic PUT for small ones,
  PATCH chunks for large ones; an upload interrupted mid-blob resumes where the registry says it
  stands (``GET`` of the upload's location: ``Range: 0-N``), its location kept in the cache.
- Manifests by tag or digest; referrers through the API, or None where the registry lacks it.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urljoin

from .. import atomic, log
from ..background import Task
from ..errors import VulcanError
from . import oci
from .auth import CREDENTIALS_HINT, challenge, origin
from .transport import Response, Transport, TransportError

CHUNK = 16 << 20  # bytes per PATCH of a large blob (and the largest monolithic PUT)
# The largest manifest, index or referrers list read (distribution and most registries refuse a
# manifest over 4 MiB); a token answer is far smaller, and so bounded the same way.
MAX_DOCUMENT = 4 << 20
ACCEPT = ", ".join((oci.INDEX, oci.MANIFEST, "application/vnd.docker.distribution.manifest.list.v2+json",
                    "application/vnd.docker.distribution.manifest.v2+json"))  # fmt: skip
REFERENCE = re.compile(
    r"(?P<registry>[A-Za-z0-9.-]+(?::[0-9]+)?)/(?P<repository>[a-z0-9]+(?:[._/-][a-z0-9]+)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?"
)


class RegistryError(VulcanError):
    """The registry refused a request, could not be reached, or answered what it must not."""

    exit_code = 3


class BadReference(RegistryError):
    """A reference or repository name that is not one: the input, not the registry."""

    exit_code = 4


class Refused(RegistryError):
    """The registry served bytes other than the digest asked for: refused, nothing kept."""

    exit_code = 6


@dataclass(frozen=True)
class Reference:
    """``REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST]``; the registry part is always given (a
    host name with a dot or a port, or ``localhost``): no implicit Docker Hub."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str, what: str = "reference") -> Reference:
        m = REFERENCE.fullmatch(text.strip())
        if m is None or not ("." in m["registry"] or ":" in m["registry"] or m["registry"] == "localhost"):
            raise BadReference(f"{what} {text!r} is not REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST]",
                                hint="e.g. ghcr.io/acme/vulcan-images@sha256:<64 hex>; the registry host "
                                "is required")  # fmt: skip
        return cls(m["registry"], m["repository"], m["tag"], m["digest"])

    @property
    def ref(self) -> str:
        """What a manifest request names: the digest when there is one, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}" + (f":{self.tag}" if self.tag else "") + (
            f"@{self.digest}" if self.digest else "")  # fmt: skip


def parse_json(body: bytes, what: str) -> dict[str, Any]:
    """A JSON object from a registry, or a RegistryError that says what it was (never a
    traceback: a document nested thousands deep exhausts Python's recursion)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise RegistryError(
            f"{what} is not JSON a registry would serve: {str(exc)[:100] or type(exc).__name__}"
        ) from None
    if not isinstance(doc, dict):
        raise RegistryError(f"{what} is JSON but not an object")
    return doc


class Auth:
    """What a registry asked of one user: Basic from now on, or a token per scope. Shared by the
    clients of a command that talk to one registry at once (a pull's blobs, each on a connection
    of its own), so that the registry is asked, and a token fetched, once, not once per
    connection: each new one sends what works from its first request."""

    __slots__ = ("basic", "lock", "tokens")

    def __init__(self) -> None:
        self.tokens: dict[str, str] = {}
        self.basic = False  # the registry asked for Basic: send it from now on
        self.lock = threading.Lock()  # one token request at a time: the others wait and use it


class Registry:
    """One registry, as one user (or anonymously)."""

    def __init__(self, registry: str, *, credentials: tuple[str, str] | None = None, insecure: bool = False,
                 ca: Path | None = None, timeout: float = 60.0, deadline: float = 3600.0,
                 state_dir: Path | None = None, auth: Auth | None = None,
                 transport: Transport | None = None) -> None:  # fmt: skip
        self.name = registry
        self.base = f"{'http' if insecure else 'https'}://{registry}"
        self.origin = origin(self.base)
        self.credentials = credentials
        self.deadline = time.monotonic() + deadline
        self.deadline_seconds = deadline
        self.transport = transport or Transport(ca)  # (a pull's clients of one registry share one)
        self.timeout = timeout
        self.auth = auth or Auth()
        self.state_dir = state_dir  # where interrupted uploads are remembered
        self.sent = 0  # blob bytes uploaded
        self.received = 0  # blob and manifest bytes downloaded
        self.requests = 0

    # -- requests and auth -------------------------------------------------------------------

    def request(self, method: str, path: str, scope: str, *, ok: tuple[int, ...] = (200,),
                headers: dict[str, str] | None = None, data: bytes | None = None, stream: bool = False,
                allow: tuple[int, ...] = ()) -> Response:  # fmt: skip
        """``path`` (or an absolute URL the registry gave) with auth for ``scope``; a status
        outside ``ok`` + ``allow`` is a RegistryError in the registry's own words."""
        url = path if path.startswith(("http://", "https://")) else urljoin(self.base, path)
        for attempt in range(3):
            sent = (self.auth.basic, self.auth.tokens.get(scope))  # what this request carries
            resp = self._send(method, url, scope, headers, data, stream)
            if resp.status_code == 401 and attempt < 2 and self._authenticate(resp, scope, *sent):
                resp.close()
                continue
            break
        if resp.status_code in ok or resp.status_code in allow:
            return resp
        raise self._refused(method, url, resp)

    def _send(self, method: str, url: str, scope: str, headers: dict[str, str] | None, data: bytes | None,
              stream: bool) -> Response:  # fmt: skip
        h = dict(headers or {})
        target = origin(url)
        ours = target == self.origin  # credentials and tokens go to the registry's own origin only
        if target[0] == "http" and self.origin[0] == "https":
            raise RegistryError(f"{self.name} sent this client to {url.split('?')[0]}, plain HTTP: refused",
                                hint="a registry over HTTPS must keep its uploads and downloads on HTTPS")  # fmt: skip
        token = self.auth.tokens.get(scope)
        if ours and token is not None:
            h["Authorization"] = f"Bearer {token}"
        auth = self.credentials if ours and self.auth.basic and token is None else None
        self.requests += 1
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise self._late(f"{method} {url.removeprefix(self.base)}")
        try:
            # the transport sends Authorization (and Basic credentials) to this URL's origin only,
            # not to where it redirects elsewhere
            return self.transport.request(method, url, headers=h, body=data, stream=stream, auth=auth,
                                          timeout=min(self.timeout, remaining))  # fmt: skip
        except TransportError as exc:
            raise self._unanswered(method, exc) from None

    def _unanswered(self, method: str, exc: TransportError) -> RegistryError:
        if exc.kind == "tls":
            return RegistryError(f"TLS with {self.name} failed: {exc}",
                                 hint="pass --ca FILE for a registry with a private CA (or --insecure for plain "
                                 "HTTP on a trusted network)")  # fmt: skip
        if exc.kind == "timeout":
            return RegistryError(f"registry {self.name} did not answer {method} within {self.timeout:g} s",
                                 hint="is it up? VULCAN_REGISTRY_TIMEOUT allows a slower registry more")  # fmt: skip
        return RegistryError(f"registry {self.name} is not reachable: {exc}",
                             hint="is it up, and is the address right?")  # fmt: skip

    def _late(self, what: str) -> RegistryError:
        return RegistryError(f"{self.name}: {what}: not done within the deadline of {self.deadline_seconds:g} s",
                             hint="a registry or link that slow is cut off; VULCAN_REGISTRY_DEADLINE gives it "
                             "longer")  # fmt: skip

    def chunks(self, resp: Response, limit: int, what: str) -> Iterator[bytes]:
        """The body of a streamed answer as it arrives, refused past ``limit`` bytes or the deadline
        (each read returns what one receive brought: a trickle cannot hold a read past either)."""
        got = 0
        while True:
            if time.monotonic() > self.deadline:
                raise self._late(what)
            try:
                chunk = resp.read1(1 << 20)
            except TransportError as exc:  # a timeout, a reset socket, a broken chunked encoding
                raise RegistryError(f"{self.name}: {what}: the transfer failed: {exc}",
                                    hint="is the registry up? VULCAN_REGISTRY_TIMEOUT allows a slower one more"
                                    ) from None  # fmt: skip
            if not chunk:
                return
            got += len(chunk)
            if got > limit:
                raise RegistryError(f"{self.name}: {what}: more than {limit:,} bytes: refused")
            yield chunk

    def read_bounded(self, resp: Response, limit: int, what: str) -> bytes:
        declared = resp.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            resp.close()
            raise RegistryError(f"{self.name}: {what} is {int(declared):,} bytes, more than {limit:,}: refused")
        try:
            return b"".join(self.chunks(resp, limit, what))
        finally:
            resp.close()

    def _authenticate(self, resp: Response, scope: str, sent_basic: bool, sent_token: str | None) -> bool:
        """Answer a 401's challenge to a request that carried ``sent_basic``/``sent_token``;
        False when there is nothing more to try."""
        scheme, params = challenge(resp.headers.get("WWW-Authenticate", ""))
        if scheme == "basic":
            if self.credentials is None or sent_basic:
                return False
            self.auth.basic = True
            return True
        if scheme != "bearer" or "realm" not in params:
            return False
        with self.auth.lock:
            if self.auth.tokens.get(scope) not in (None, sent_token):
                return True  # another connection fetched a new one meanwhile
            self.auth.tokens.pop(scope, None)  # a token it refused may have expired: ask for a new one
            return self._fetch_token(scope, params)

    def _fetch_token(self, scope: str, params: dict[str, str]) -> bool:
        realm = params["realm"]
        scheme = origin(realm)[0]
        if scheme != "https" and not (scheme == "http" and origin(realm) == self.origin):
            raise RegistryError(f"{self.name} names a token service at {realm}: not HTTPS, nor this registry's own "
                                "host given with --insecure: refused (the credentials would travel readable)",
                                hint="the registry's token service must use HTTPS")  # fmt: skip
        query: list[tuple[str, str]] = [("service", params["service"])] if "service" in params else []
        query += [("scope", s) for s in (params.get("scope") or scope).split(" ") if s]
        try:
            got = self.transport.request("GET", realm + "?" + urlencode(query), auth=self.credentials, stream=True,
                                         timeout=self.timeout, redirects=False)  # fmt: skip
        except TransportError as exc:
            raise RegistryError(f"the token service of {self.name} ({realm}) is not reachable: {exc}") from None
        text = self.read_bounded(got, MAX_DOCUMENT, f"the token service's answer ({realm})")
        if got.status_code in (401, 403):
            raise RegistryError(f"{self.name}'s token service refused "
                                f"{'the credentials' if self.credentials else 'an anonymous request'} "
                                f"(HTTP {got.status_code})", hint=CREDENTIALS_HINT)  # fmt: skip
        try:
            body = parse_json(text, "the token service's answer")
            token = body.get("token") or body.get("access_token")
        except RegistryError:
            token = None
        if got.status_code != 200 or not token:
            raise RegistryError(f"{self.name}'s token service answered HTTP {got.status_code} without a token")
        self.auth.tokens[scope] = str(token)
        return True

    def _refused(self, method: str, url: str, resp: Response) -> RegistryError:
        try:
            text = self.read_bounded(resp, 64 << 10, "an error answer")
        except RegistryError:
            text = b""
        try:
            errors = parse_json(text, "an error answer").get("errors") or []
            said = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, dict))
        except RegistryError:
            said = ""
        said = said or text[:200].decode(errors="replace").strip() or "no explanation given"
        where = url.removeprefix(self.base)
        if resp.status_code == 401:
            who = "the credentials were refused" if self.credentials else "it needs credentials"
            return RegistryError(f"{self.name}: {method} {where}: HTTP 401: {who} ({said})", hint=CREDENTIALS_HINT)
        if resp.status_code == 403:
            return RegistryError(f"{self.name}: {method} {where}: HTTP 403: not allowed for this user ({said})")
        return RegistryError(f"{self.name}: {method} {where}: HTTP {resp.status_code}: {said}")

    # -- blobs -------------------------------------------------------------------------------

    def has_blob(self, repo: str, digest: str) -> bool:
        r = self.request("HEAD", f"/v2/{repo}/blobs/{digest}", _scope(repo, "pull"), allow=(404,))
        return r.status_code == 200

    def mount(self, repo: str, digest: str, source: str) -> bool:
        """Cross-repository mount (same registry): True when the registry linked the blob."""
        scope = f"{_scope(repo, 'pull,push')} {_scope(source, 'pull')}"
        r = self.request("POST", f"/v2/{repo}/blobs/uploads/?" + urlencode({"mount": digest, "from": source}),
                         scope, ok=(201, 202))  # fmt: skip
        if r.status_code == 202:  # not mounted: an upload session was opened instead; leave it
            with contextlib.suppress(RegistryError):
                self.request("DELETE", self._location(r), scope, ok=(204, 404), allow=(400, 405))
        return r.status_code == 201

    def push_blob(self, repo: str, blob: oci.Blob) -> int:
        """Upload ``blob`` unless the registry has it; the bytes sent."""
        if self.has_blob(repo, blob.digest):
            return 0
        scope = _scope(repo, "pull,push")
        if blob.size <= CHUNK:
            data = blob.data if blob.data is not None else Path(blob.path or "").read_bytes()
            if oci.digest_of(data) != blob.digest:
                raise RegistryError(f"{blob.title or blob.path}: changed while it was being published")
            loc = self._location(self.request("POST", f"/v2/{repo}/blobs/uploads/", scope, ok=(202,)))
            self.request("PUT", _with(loc, digest=blob.digest), scope, ok=(201,), data=data,
                         headers={"Content-Type": "application/octet-stream"})  # fmt: skip
            self.sent += blob.size
            return blob.size
        assert blob.path is not None
        return self._push_chunked(repo, blob, scope)

    def _push_chunked(self, repo: str, blob: oci.Blob, scope: str) -> int:
        assert blob.path is not None
        state = self._upload_state(repo, blob.digest)
        loc, offset = None, 0
        if state is not None and state.is_file():
            with contextlib.suppress(ValueError, OSError, RegistryError):
                loc = json.loads(state.read_text())["location"]
                r = self.request("GET", loc, scope, ok=(204,), allow=(404, 400))
                if r.status_code == 204 and re.fullmatch(r"0-\d+", r.headers.get("Range", "")):
                    offset = int(r.headers["Range"].split("-")[1]) + 1
                    log.info(f"{blob.title or blob.digest}: resuming an interrupted upload at {offset:,} bytes")
                else:
                    loc, offset = None, 0
        if loc is None:
            loc = self._location(self.request("POST", f"/v2/{repo}/blobs/uploads/", scope, ok=(202,)))
        sent = 0
        with open(blob.path, "rb") as f:
            f.seek(offset)
            while offset < blob.size:
                chunk = f.read(CHUNK)
                end = offset + len(chunk) - 1
                r = self.request("PATCH", loc, scope, ok=(202,), data=chunk, headers={
                    "Content-Type": "application/octet-stream", "Content-Range": f"{offset}-{end}",
                    "Content-Length": str(len(chunk))})  # fmt: skip
                loc = self._location(r)
                offset, sent = end + 1, sent + len(chunk)
                self.sent += len(chunk)
                if state is not None:
                    atomic.write_text(state, json.dumps({"location": loc}))
        self.request("PUT", _with(loc, digest=blob.digest), scope, ok=(201,), data=b"",
                     headers={"Content-Type": "application/octet-stream"})  # fmt: skip
        if state is not None:
            state.unlink(missing_ok=True)
        return sent

    def _upload_state(self, repo: str, digest: str) -> Path | None:
        if self.state_dir is None:
            return None
        d = self.state_dir / self.name.replace(":", "_") / repo.replace("/", "_")
        d.mkdir(parents=True, exist_ok=True)
        return d / f"{digest.replace(':', '-')}.upload.json"

    def _location(self, resp: Response) -> str:
        loc = resp.headers.get("Location")
        if not loc:
            raise RegistryError(f"{self.name}: an upload answer without a Location header (HTTP {resp.status_code})")
        return urljoin(self.base, loc)

    @contextlib.contextmanager
    def blob(self, repo: str, digest: str, offset: int = 0) -> Iterator[Response]:
        """A streamed GET of a blob from ``offset`` (HTTP Range: a resumed download)."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        r = self.request("GET", f"/v2/{repo}/blobs/{digest}", _scope(repo, "pull"), ok=(200, 206),
                         headers=headers, stream=True)  # fmt: skip
        try:
            yield r
        finally:
            r.close()

    def small_blob(self, repo: str, desc: dict[str, Any], what: str, limit: int = 16 << 20) -> bytes:
        """A small blob (a signature, an SBOM) in memory: read no further than its descriptor's
        size (at most ``limit``), then checked against its digest."""
        if not oci.sized(desc):
            raise RegistryError(f"{what}: a descriptor without a sha256 digest and a size: refused")
        digest, size = desc["digest"], desc["size"]
        if size > limit:
            raise RegistryError(f"{what}: blob {digest} is {size:,} bytes, more than {limit:,}: refused")
        with self.blob(repo, digest) as resp:
            data = b"".join(self.chunks(resp, size, f"{what} ({digest})"))
        self.received += len(data)
        if len(data) != size or oci.digest_of(data) != digest:
            raise Refused(f"{what}: blob {digest} served with another digest or size: refused")
        return data

    # -- manifests ---------------------------------------------------------------------------

    def manifest(self, repo: str, ref: str) -> tuple[bytes, str, str]:
        """(bytes, media type, digest); a digest reference is checked against the bytes."""
        r = self.request("GET", f"/v2/{repo}/manifests/{ref}", _scope(repo, "pull"), headers={"Accept": ACCEPT},
                         allow=(404,), stream=True)  # fmt: skip
        if r.status_code == 404:
            r.close()
            raise RegistryError(f"{self.name}/{repo}: no manifest {ref!r} (HTTP 404)",
                                hint="check the tag or digest: 'publish' prints and writes what it pushed")  # fmt: skip
        body = self.read_bounded(r, MAX_DOCUMENT, f"manifest {ref}")
        self.received += len(body)
        digest = oci.digest_of(body)
        if ref.startswith("sha256:") and digest != ref:
            raise Refused(f"{self.name}/{repo}: the manifest served for {ref} has digest {digest}: refused")
        media = r.headers.get("Content-Type", "").split(";")[0].strip()
        media = parse_json(body, f"{self.name}/{repo}: manifest {ref}").get("mediaType") or media
        return body, str(media), digest

    def manifest_digest(self, repo: str, ref: str) -> str | None:
        """What ``ref`` (a tag) points at now, or None."""
        r = self.request("HEAD", f"/v2/{repo}/manifests/{ref}", _scope(repo, "pull"), headers={"Accept": ACCEPT},
                         allow=(404,))  # fmt: skip
        return r.headers.get("Docker-Content-Digest") if r.status_code == 200 else None

    def put_manifest(self, repo: str, ref: str, body: bytes, media_type: str) -> Response:
        return self.request("PUT", f"/v2/{repo}/manifests/{ref}", _scope(repo, "pull,push"), ok=(201,), data=body,
                            headers={"Content-Type": media_type})  # fmt: skip

    def warm(self, count: int) -> None:
        """``count`` connections opened now, in the background, for requests made at once later."""
        self.transport.warm(self.base, count, self.timeout)

    def referrers_of(self, repo: str, digest: str) -> list[dict[str, Any]]:
        """The referrers of ``digest``: through the API, else the referrers tag schema's index.
        Both are asked at once: a registry without the API (distribution 2.8, and others) then
        answers in one round trip, not two."""
        tagged = Task(self.manifest, repo, oci.referrers_tag(digest))
        try:
            found = self.referrers(repo, digest)
        finally:
            error = tagged.exception()
        if found is not None:
            return found
        if isinstance(error, RegistryError):
            if "HTTP 404" not in error.message:
                log.warn(f"the referrers of {digest} could not be read: {error.message}")
            return []
        body = tagged.result()[0]
        return _entries(parse_json(body, f"{self.name}/{repo}: the referrers index of {digest}"))

    def referrers(self, repo: str, digest: str) -> list[dict[str, Any]] | None:
        """The referrers API's answer (an index's ``manifests``), or None where the registry
        does not have the API (404: then the referrers tag schema applies)."""
        r = self.request("GET", f"/v2/{repo}/referrers/{digest}", _scope(repo, "pull"), allow=(404,),
                         headers={"Accept": oci.INDEX}, stream=True)  # fmt: skip
        if r.status_code == 404 or oci.INDEX not in r.headers.get("Content-Type", ""):
            r.close()
            return None
        body = self.read_bounded(r, MAX_DOCUMENT, f"the referrers of {digest}")
        self.received += len(body)
        return _entries(parse_json(body, f"{self.name}/{repo}: the referrers of {digest}"))


def _entries(index: dict[str, Any]) -> list[dict[str, Any]]:
    """An index's descriptors; entries that are not JSON objects are left out (with a warning)."""
    entries = index.get("manifests")
    if not isinstance(entries, list):
        return []
    kept = [e for e in entries if isinstance(e, dict) and isinstance(e.get("digest"), str)]
    if len(kept) != len(entries):
        log.warn(f"{len(entries) - len(kept)} entries of a referrers list are not descriptors: ignored")
    return kept


def _scope(repo: str, actions: str) -> str:
    return f"repository:{repo}:{actions}"


def _with(url: str, **query: str) -> str:
    return url + ("&" if "?" in url else "?") + urlencode(query)
