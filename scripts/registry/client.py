"""A client of the OCI distribution API (distribution-spec v1.1), as much of it as publish and pull use.

- Auth as registries ask for it: anonymous first; on ``401`` the ``WWW-Authenticate`` challenge
  says ``Basic`` (credentials sent) or ``Bearer realm=...,service=...,scope=...`` (a token is
  fetched from the realm with the credentials, cached per scope: ghcr.io, Docker Hub,
  distribution's ``token`` auth). Credentials: ``VULCAN_REGISTRY_USER``/``VULCAN_REGISTRY_PASSWORD``
  or Docker's ``config.json`` (settings.registry_credentials).
- HTTPS with the system CAs or ``ca`` (a PEM file); plain HTTP only with ``insecure``.
- Blobs: HEAD before upload, cross-repository mount when asked, monolithic PUT for small ones,
  PATCH chunks for large ones; an upload interrupted mid-blob resumes where the registry says it
  stands (``GET`` of the upload's location: ``Range: 0-N``), its location kept in the cache.
- Manifests by tag or digest; referrers through the API, or None where the registry lacks it.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urljoin

import requests

from .. import atomic, log
from ..errors import VulcanError
from . import oci

CHUNK = 16 << 20  # bytes per PATCH of a large blob (and the largest monolithic PUT)
ACCEPT = ", ".join((oci.INDEX, oci.MANIFEST, "application/vnd.docker.distribution.manifest.list.v2+json",
                    "application/vnd.docker.distribution.manifest.v2+json"))  # fmt: skip
REFERENCE = re.compile(
    r"(?P<registry>[A-Za-z0-9.-]+(?::[0-9]+)?)/(?P<repository>[a-z0-9]+(?:[._/-][a-z0-9]+)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>sha256:[0-9a-f]{64}))?"
)


class RegistryError(VulcanError):
    """The registry refused a request, could not be reached, or answered what it must not."""


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
            raise RegistryError(f"{what} {text!r} is not REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST]",
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


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.partition(" ")
    return scheme.lower(), {k.lower(): v for k, v in re.findall(r'(\w+)="([^"]*)"', rest)}


class Registry:
    """One registry, as one user (or anonymously)."""

    def __init__(self, registry: str, *, credentials: tuple[str, str] | None = None, insecure: bool = False,
                 ca: Path | None = None, timeout: float = 60.0, state_dir: Path | None = None) -> None:  # fmt: skip
        self.name = registry
        self.base = f"{'http' if insecure else 'https'}://{registry}"
        self.credentials = credentials
        self.session = requests.Session()
        # given with every request: a session's own verify loses to REQUESTS_CA_BUNDLE (requests#3829)
        self.verify: str | bool = str(ca) if ca else True
        self.timeout = timeout
        self.tokens: dict[str, str] = {}
        self.basic = False  # the registry asked for Basic: send it from now on
        self.state_dir = state_dir  # where interrupted uploads are remembered
        self.sent = 0  # blob bytes uploaded
        self.received = 0  # blob and manifest bytes downloaded
        self.requests = 0

    # -- requests and auth -------------------------------------------------------------------

    def request(self, method: str, path: str, scope: str, *, ok: tuple[int, ...] = (200,),
                headers: dict[str, str] | None = None, data: Any = None, stream: bool = False,
                allow: tuple[int, ...] = ()) -> requests.Response:  # fmt: skip
        """``path`` (or an absolute URL the registry gave) with auth for ``scope``; a status
        outside ``ok`` + ``allow`` is a RegistryError in the registry's own words."""
        url = path if path.startswith(("http://", "https://")) else urljoin(self.base, path)
        for attempt in range(3):
            resp = self._send(method, url, scope, headers, data, stream)
            if resp.status_code == 401 and attempt < 2 and self._authenticate(resp, scope):
                if hasattr(data, "seek"):
                    data.seek(0)
                continue
            break
        if resp.status_code in ok or resp.status_code in allow:
            return resp
        raise self._refused(method, url, resp)

    def _send(self, method: str, url: str, scope: str, headers: dict[str, str] | None, data: Any,
              stream: bool) -> requests.Response:  # fmt: skip
        h = dict(headers or {})
        if scope in self.tokens:
            h["Authorization"] = f"Bearer {self.tokens[scope]}"
        auth = self.credentials if self.basic and scope not in self.tokens else None
        self.requests += 1
        try:
            return self.session.request(method, url, headers=h, data=data, stream=stream, timeout=self.timeout,
                                        auth=auth, allow_redirects=True, verify=self.verify)  # fmt: skip
        except requests.exceptions.SSLError as exc:
            raise RegistryError(f"TLS with {self.name} failed: {exc}",
                                hint="pass --ca FILE for a registry with a private CA (or --insecure for plain "
                                "HTTP on a trusted network)") from None  # fmt: skip
        except requests.exceptions.RequestException as exc:
            raise RegistryError(f"registry {self.name} is not reachable: {type(exc).__name__}: {exc}",
                                hint="is it up, and is the address right?") from None  # fmt: skip

    def _authenticate(self, resp: requests.Response, scope: str) -> bool:
        """Answer a 401's challenge; False when there is nothing more to try."""
        scheme, params = _challenge(resp.headers.get("WWW-Authenticate", ""))
        if scheme == "basic":
            if self.credentials is None or self.basic:
                return False
            self.basic = True
            return True
        if scheme != "bearer" or "realm" not in params:
            return False
        self.tokens.pop(scope, None)  # a token it refused may have expired: ask for a new one
        query: list[tuple[str, str]] = [("service", params["service"])] if "service" in params else []
        query += [("scope", s) for s in (params.get("scope") or scope).split(" ") if s]
        try:
            got = self.session.get(params["realm"] + "?" + urlencode(query), auth=self.credentials,
                                   timeout=self.timeout, verify=self.verify)  # fmt: skip
        except requests.exceptions.RequestException as exc:
            raise RegistryError(
                f"the token service of {self.name} ({params['realm']}) is not reachable: {exc}"
            ) from None
        if got.status_code in (401, 403):
            raise RegistryError(f"{self.name}'s token service refused "
                                f"{'the credentials' if self.credentials else 'an anonymous request'} "
                                f"(HTTP {got.status_code})", hint=_CREDENTIALS_HINT)  # fmt: skip
        try:
            body = got.json()
            token = body.get("token") or body.get("access_token")
        except ValueError:
            token = None
        if got.status_code != 200 or not token:
            raise RegistryError(f"{self.name}'s token service answered HTTP {got.status_code} without a token")
        self.tokens[scope] = str(token)
        return True

    def _refused(self, method: str, url: str, resp: requests.Response) -> RegistryError:
        try:
            errors = resp.json().get("errors") or []
            said = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors) or resp.text[:200]
        except ValueError:
            said = resp.text[:200].strip()
        where = url.removeprefix(self.base)
        if resp.status_code == 401:
            who = "the credentials were refused" if self.credentials else "it needs credentials"
            return RegistryError(f"{self.name}: {method} {where}: HTTP 401: {who} ({said})", hint=_CREDENTIALS_HINT)
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

    def _location(self, resp: requests.Response) -> str:
        loc = resp.headers.get("Location")
        if not loc:
            raise RegistryError(f"{self.name}: an upload answer without a Location header (HTTP {resp.status_code})")
        return urljoin(self.base, loc)

    @contextlib.contextmanager
    def blob(self, repo: str, digest: str, offset: int = 0) -> Iterator[requests.Response]:
        """A streamed GET of a blob from ``offset`` (HTTP Range: a resumed download)."""
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        r = self.request("GET", f"/v2/{repo}/blobs/{digest}", _scope(repo, "pull"), ok=(200, 206),
                         headers=headers, stream=True)  # fmt: skip
        try:
            yield r
        finally:
            r.close()

    # -- manifests ---------------------------------------------------------------------------

    def manifest(self, repo: str, ref: str) -> tuple[bytes, str, str]:
        """(bytes, media type, digest); a digest reference is checked against the bytes."""
        r = self.request("GET", f"/v2/{repo}/manifests/{ref}", _scope(repo, "pull"), headers={"Accept": ACCEPT},
                         allow=(404,))  # fmt: skip
        if r.status_code == 404:
            raise RegistryError(f"{self.name}/{repo}: no manifest {ref!r} (HTTP 404)",
                                hint="check the tag or digest: 'publish' prints and writes what it pushed")  # fmt: skip
        body = r.content
        self.received += len(body)
        digest = oci.digest_of(body)
        if ref.startswith("sha256:") and digest != ref:
            raise RegistryError(f"{self.name}/{repo}: the manifest served for {ref} has digest {digest}: refused")
        media = r.headers.get("Content-Type", "").split(";")[0].strip()
        try:
            media = json.loads(body).get("mediaType") or media
        except (ValueError, AttributeError):
            raise RegistryError(f"{self.name}/{repo}: manifest {ref} is not JSON") from None
        return body, media, digest

    def manifest_digest(self, repo: str, ref: str) -> str | None:
        """What ``ref`` (a tag) points at now, or None."""
        r = self.request("HEAD", f"/v2/{repo}/manifests/{ref}", _scope(repo, "pull"), headers={"Accept": ACCEPT},
                         allow=(404,))  # fmt: skip
        return r.headers.get("Docker-Content-Digest") if r.status_code == 200 else None

    def put_manifest(self, repo: str, ref: str, body: bytes, media_type: str) -> requests.Response:
        return self.request("PUT", f"/v2/{repo}/manifests/{ref}", _scope(repo, "pull,push"), ok=(201,), data=body,
                            headers={"Content-Type": media_type})  # fmt: skip

    def referrers_of(self, repo: str, digest: str) -> list[dict[str, Any]]:
        """The referrers of ``digest``: through the API, else the referrers tag schema's index."""
        found = self.referrers(repo, digest)
        if found is not None:
            return found
        try:
            return list(json.loads(self.manifest(repo, oci.referrers_tag(digest))[0]).get("manifests", []))
        except RegistryError:
            return []

    def referrers(self, repo: str, digest: str) -> list[dict[str, Any]] | None:
        """The referrers API's answer (an index's ``manifests``), or None where the registry
        does not have the API (404: then the referrers tag schema applies)."""
        r = self.request("GET", f"/v2/{repo}/referrers/{digest}", _scope(repo, "pull"), allow=(404,),
                         headers={"Accept": oci.INDEX})  # fmt: skip
        if r.status_code == 404 or oci.INDEX not in r.headers.get("Content-Type", ""):
            return None
        self.received += len(r.content)
        found: list[dict[str, Any]] = r.json().get("manifests", [])
        return found


def _scope(repo: str, actions: str) -> str:
    return f"repository:{repo}:{actions}"


def _with(url: str, **query: str) -> str:
    return url + ("&" if "?" in url else "?") + urlencode(query)


_CREDENTIALS_HINT = (
    "set VULCAN_REGISTRY_USER and VULCAN_REGISTRY_PASSWORD, or log in so that Docker's config.json "
    "(DOCKER_CONFIG, ~/.docker/config.json) has this registry under 'auths'"
)
