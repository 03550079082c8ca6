"""pins.json: the single source of versions, URLs, checksums and trusted keys.

Loading validates everything and reports the file, the JSON path and the problem, e.g.
``pins.json: kernel.sha256.aarch64: expected 64 hex characters``. A pin without a checksum is
an error: nothing is ever trusted on first use.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from . import formats as image_formats
from . import names, settings
from .arch import ARCHES, GOARCH
from .errors import PinError
from .formats import DEFAULT as FORMATS_DEFAULT

SCHEMA_VERSION = 1
REPO_ROOT = settings.REPO_ROOT
MAX_HEADROOM_MIB = 1 << 16  # 64 GiB of free space in an image is a typo, not a wish
HEX64 = re.compile(r"^[0-9a-f]{64}$")
TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
WORLD_TAG = re.compile(r"^!?[^@<>=~]+@([^<>=~]*)")
UPDATE_HINT = "run 'nox -s update_pins' to fetch and pin it (nothing is trusted on first use)"
MAX_PINS_BYTES = 1 << 20  # a pins file is a few KiB; more is not a pins file (VULCAN_PINS=/dev/zero)


def pins_path() -> Path:
    """``$VULCAN_PINS`` or the repository's pins.json."""
    return settings.pins_path()


class Artifact(NamedTuple):
    """A versioned download with one sha256 per architecture (Firecracker, kernel, Go)."""

    name: str
    version: str
    url: str
    sha256: Mapping[str, str]

    def url_for(self, arch: str) -> str:
        # {arch} is the kernel's spelling (x86_64, aarch64), {goarch} Go's (amd64, arm64).
        return self.url.format(version=self.version, arch=arch, goarch=GOARCH[arch])

    def sha256_for(self, arch: str) -> str:
        return self.sha256[arch]

    def entry(self, arch: str) -> dict[str, str]:
        """The pin entry one build used (recorded in stamps)."""
        return {"version": self.version, "url": self.url_for(arch), "sha256": self.sha256_for(arch)}


class AlpineKey(NamedTuple):
    name: str
    url: str  # "" when the key is a local file
    sha256: str  # of the DER SubjectPublicKeyInfo, not of the file
    path: Path | None = None  # a local key file (a developer's abuild key), instead of a URL
    where: str = ""  # its JSON path in pins.json, for messages


class Repository(NamedTuple):
    """One APK repository an image takes packages from: Alpine's own (``alpine.repositories``,
    under the mirror and branch) or an extra one (``alpine.extra_repositories``, per runtime
    too), each with the keys that alone may sign its index, and an optional tag (apk's
    ``@tag URL`` line: ``name@tag`` in a world takes ``name`` from it)."""

    name: str  # the lock's ``repo``; a file name
    location: str  # the URL (https://..., without the arch) or the local path, as pins.json has it
    keys: tuple[AlpineKey, ...]
    tag: str = ""
    local: Path | None = None  # a local repository's directory (resolved against the pins file)
    where: str = ""  # its JSON path in pins.json
    supplier: str = "Alpine Linux"  # who supplies its packages (the SBOM's supplier)

    def arch_url(self, arch: str) -> str:
        """Where ``<arch>/APKINDEX.tar.gz`` and the packages are (a URL; for a local one, a path)."""
        if self.local is not None:
            return str(self.local / arch)
        return f"{self.location.rstrip('/')}/{arch}"

    @property
    def line(self) -> str:
        """Its line in /etc/apk/repositories."""
        return f"@{self.tag} {self.location}" if self.tag else self.location


class Runtime(NamedTuple):
    name: str
    world: tuple[str, ...]
    check: tuple[str, ...]  # argv run inside the image to prove the runtime works
    binary: str  # path of the runtime's main binary inside the image
    headroom_mib: int | None
    program: tuple[str, ...] = ()  # a program `nox -s boot` runs through the agent ...
    expect: str = ""  # ... and the output it must print
    formats: tuple[str, ...] | None = None  # image formats for this runtime (None: alpine.formats)
    extra_repositories: tuple[Repository, ...] = ()  # this runtime's own, after alpine's
    image: ImageSource | None = None  # a template: built from this OCI image instead of a world


class ImageSource(NamedTuple):
    """A runtime made from an OCI image (a template): ``REGISTRY/REPOSITORY[:TAG][@sha256:D]``.
    A build takes the digest of each architecture from the lock (``nox -s lock`` resolves a tag)."""

    reference: str


# REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST] (the registry client's own grammar; named here so
# that loading pins does not import the client)
IMAGE_REFERENCE = re.compile(
    r"[A-Za-z0-9.-]+(?::[0-9]+)?/[a-z0-9]+(?:[._/-][a-z0-9]+)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?"
)


class Alpine(NamedTuple):
    mirror: str
    branch: str
    repositories: tuple[str, ...]
    keys: tuple[AlpineKey, ...]
    base: tuple[str, ...]
    runtimes: Mapping[str, Runtime]
    headroom_mib: int
    formats: tuple[str, ...] = FORMATS_DEFAULT
    extra_repositories: tuple[Repository, ...] = ()  # for every runtime

    def formats_of(self, runtime: str) -> tuple[str, ...]:
        return self.runtimes[runtime].formats or self.formats

    def repositories_of(self, runtime: str) -> tuple[Repository, ...]:
        """Every repository of a runtime's image, in apk's order (its /etc/apk/repositories):
        Alpine's, then the extra ones for all runtimes, then the runtime's own."""
        return self.own_repositories() + self.extra_repositories + self.runtimes[runtime].extra_repositories

    def own_repositories(self) -> tuple[Repository, ...]:
        """Alpine's repositories (``alpine.repositories`` under the mirror and branch), signed by
        ``alpine.keys``."""
        return tuple(
            Repository(r, f"{self.mirror.rstrip('/')}/{self.branch}/{r}", self.keys, where=f"alpine.repositories[{i}]")
            for i, r in enumerate(self.repositories)
        )

    def keys_of(self, runtime: str) -> tuple[AlpineKey, ...]:
        """The keys an image trusts (its /etc/apk/keys): every key of its repositories, once."""
        seen: dict[str, AlpineKey] = {}
        for repo in self.repositories_of(runtime):
            for key in repo.keys:
                seen.setdefault(key.name, key)
        return tuple(seen[n] for n in sorted(seen))


class Guest(NamedTuple):
    """Where the agent's Go source is (``guest.source``, relative to the pins file's checkout)."""

    source: str
    package: str


class Pins(NamedTuple):
    path: Path
    raw: Mapping[str, Any]
    firecracker: Artifact
    kernel: Artifact
    go: Artifact | None
    guest: Guest
    alpine_pins: Alpine | None
    digest: str  # sha256 of the canonical JSON, for manifests

    @property
    def alpine(self) -> Alpine:
        if self.alpine_pins is None:
            raise PinError(f"{self.path.name}: alpine: missing", hint="see docs/pins.md")
        return self.alpine_pins


class _Checker:
    def __init__(self, path: Path) -> None:
        self.label = path.name
        self.base = path.resolve().parent  # relative local paths are taken from here

    def fail(self, where: str, problem: str, hint: str | None = None) -> PinError:
        return PinError(f"{self.label}: {where}: {problem}", hint=hint)

    def obj(self, parent: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
        if key not in parent:
            raise self.fail(where, "missing")
        value = parent[key]
        if not isinstance(value, dict):
            raise self.fail(where, f"expected an object, got {type(value).__name__}")
        return value

    def text(self, parent: Mapping[str, Any], key: str, where: str) -> str:
        if key not in parent:
            raise self.fail(where, "missing")
        value = parent[key]
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where, "expected a non-empty string")
        return value

    def name(self, value: object, where: str, what: str = "a name") -> str:
        """A value that becomes a file name: the one rule of scripts/names.py."""
        problem = names.problem(value)
        if problem is not None:
            raise self.fail(
                where,
                f"{value!r} is not a plain file name: {problem}",
                hint=f"{what} is used as a file name: no '/', not '.' or '..', printable, "
                f"at most {names.NAME_MAX} bytes",
            )
        return str(value)

    def hex64(self, parent: Mapping[str, Any], key: str, where: str) -> str:
        if key not in parent or parent[key] in ("", None):
            raise self.fail(where, "missing checksum", hint=UPDATE_HINT)
        value = parent[key]
        if not isinstance(value, str) or not HEX64.match(value):
            raise self.fail(where, "expected 64 hex characters (lower-case sha256)")
        return value

    def url(self, parent: Mapping[str, Any], key: str, where: str, allowed: set[str]) -> str:
        value = self.text(parent, key, where)
        if not value.startswith("https://"):
            raise self.fail(where, f"expected an https:// URL, got {value!r}")
        try:
            parsed = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(value) if f is not None]
        except ValueError as exc:
            raise self.fail(where, f"bad URL template: {exc}") from None
        for f, spec, conv in parsed:
            if spec or conv:  # "{version:>999999999}" would be a format spec: placeholders are names only
                raise self.fail(
                    where,
                    f"placeholder {{{f}{'!' + conv if conv else ''}{':' + spec if spec else ''}}} has a format spec",
                    hint="placeholders are plain names: {version}, {arch}, {goarch}",
                )
        fields = {f for f, _, _ in parsed}
        unknown = fields - allowed
        if unknown and not allowed:
            raise self.fail(
                where,
                f"unknown placeholder {{{sorted(unknown)[0]}}}: this URL takes no placeholders",
                hint="write it out in full (for alpine.mirror: the mirror's root; branch and repository are added)",
            )
        if unknown:
            raise self.fail(
                where,
                f"unknown placeholder {{{sorted(unknown)[0]}}}",
                hint=f"allowed: {', '.join('{' + a + '}' for a in sorted(allowed))}",
            )
        return value

    def artifact(self, raw: Mapping[str, Any], name: str) -> Artifact:
        sec = self.obj(raw, name, name)
        version = self.name(self.text(sec, "version", f"{name}.version"), f"{name}.version", "a version")
        url = self.url(sec, "url", f"{name}.url", {"version", "arch", "goarch"})
        sums = self.obj(sec, "sha256", f"{name}.sha256")
        for key in sums:
            if key not in ARCHES:
                raise self.fail(f"{name}.sha256.{key}", f"unknown architecture; use {', '.join(ARCHES)}")
        checked = {arch: self.hex64(sums, arch, f"{name}.sha256.{arch}") for arch in ARCHES}
        return Artifact(name, version, url, checked)

    def strings(self, parent: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
        value = parent.get(key)
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise self.fail(where, "expected a non-empty list of strings")
        return tuple(value)

    def count(self, parent: Mapping[str, Any], key: str, where: str, most: int | None = None) -> int:
        value = parent.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise self.fail(where, "expected a non-negative integer")
        if most is not None and value > most:
            raise self.fail(where, f"{value} is more than {most}", hint="headroom is free space in MiB, e.g. 64")
        return value

    def formats(self, parent: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
        value = self.strings(parent, key, where)
        for name in value:
            if name not in image_formats.FORMATS:
                known = ", ".join(image_formats.FORMATS)
                raise self.fail(where, f"unknown image format {name!r}", hint=f"formats: {known}")
        if len(set(value)) != len(value):
            raise self.fail(where, "a format is listed twice")
        return value

    def guest(self, raw: Mapping[str, Any]) -> Guest:
        if "guest" not in raw:
            return Guest("guest", ".")
        sec = self.obj(raw, "guest", "guest")
        for key in sec:
            if key not in ("source", "package"):
                raise self.fail(f"guest.{key}", "unknown key; guest takes source and package")
        source = self.text(sec, "source", "guest.source") if "source" in sec else "guest"
        package = self.text(sec, "package", "guest.package") if "package" in sec else "."
        return Guest(source, package)

    def alpine(self, raw: Mapping[str, Any]) -> Alpine:
        sec = self.obj(raw, "alpine", "alpine")
        mirror = self.url(sec, "mirror", "alpine.mirror", set())
        branch = self.name(self.text(sec, "branch", "alpine.branch"), "alpine.branch", "the branch")
        repos = self.strings(sec, "repositories", "alpine.repositories")
        for i, repo in enumerate(repos):
            self.name(repo, f"alpine.repositories[{i}]", "a repository name")
        keys = self.keys(sec, "alpine.keys", local=False)
        taken: dict[str, str] = {r: f"alpine.repositories[{i}]" for i, r in enumerate(repos)}
        tags: dict[str, str] = {}
        key_fps: dict[str, tuple[str, str]] = {k.name: (k.sha256, k.where) for k in keys}
        extra = self.repositories(sec, "alpine.extra_repositories", taken, tags, key_fps)
        base = self.strings(sec, "base", "alpine.base")
        headroom = self.count(sec, "headroom_mib", "alpine.headroom_mib", MAX_HEADROOM_MIB)
        rts = self.obj(sec, "runtimes", "alpine.runtimes")
        runtimes = {}
        for name in rts:
            where = f"alpine.runtimes.{name}"
            self.name(name, where, "a runtime name (it names images and sessions)")
            if not re.match(r"^[a-z][a-z0-9_]*$", name):
                raise self.fail(where, "runtime names are lower-case letters, digits and _ (they name sessions)")
            rt = self.obj(rts, name, where)
            own = (
                self.count(rt, "headroom_mib", f"{where}.headroom_mib", MAX_HEADROOM_MIB)
                if "headroom_mib" in rt
                else None
            )
            image = self.image(rt, f"{where}.image") if "image" in rt else None
            if image is not None and "world" in rt:
                raise self.fail(where, "a runtime has either a world (Alpine packages) or an image, not both")
            binary = self.text(rt, "binary", f"{where}.binary")
            if not binary.startswith("/"):
                raise self.fail(f"{where}.binary", "expected an absolute path inside the image")
            program = self.strings(rt, "program", f"{where}.program") if "program" in rt else ()
            expect = self.text(rt, "expect", f"{where}.expect") if "expect" in rt else ""
            formats = self.formats(rt, "formats", f"{where}.formats") if "formats" in rt else None
            rt_tags = dict(tags)
            own_repos = self.repositories(rt, f"{where}.extra_repositories", dict(taken), rt_tags, dict(key_fps))
            world = self.strings(rt, "world", f"{where}.world") if image is None else ()
            for label, entries in ((f"{where}.world", world), ("alpine.base", base)):
                self.world_tags(label, entries, rt_tags, name)
            runtimes[name] = Runtime(
                name,
                world,
                self.strings(rt, "check", f"{where}.check"),
                binary,
                own,
                program,
                expect,
                formats,
                own_repos,
                image,
            )
        if not runtimes:
            raise self.fail("alpine.runtimes", "no runtimes")
        formats = self.formats(sec, "formats", "alpine.formats") if "formats" in sec else FORMATS_DEFAULT
        return Alpine(mirror, branch, repos, keys, base, runtimes, headroom, formats, extra)

    def image(self, rt: Mapping[str, Any], where: str) -> ImageSource:
        sec = self.obj(rt, "image", where)
        for key in sec:
            if key != "reference":
                raise self.fail(f"{where}.{key}", "unknown key; image takes reference")
        ref = self.text(sec, "reference", f"{where}.reference")
        if not IMAGE_REFERENCE.fullmatch(ref) or "/" not in ref or not re.match(r"[^/]*[.:]|localhost/", ref):
            raise self.fail(
                f"{where}.reference",
                f"{ref!r} is not REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST]",
                hint="e.g. docker.io/library/python:3.12-slim-bookworm@sha256:<64 hex>; the registry host is required",
            )
        return ImageSource(ref)

    def keys(self, sec: Mapping[str, Any], where: str, local: bool) -> tuple[AlpineKey, ...]:
        """Pinned keys: each by the SHA-256 of its DER public key, from a URL (or, for an extra
        repository, a local file): never trusted on first use."""
        keys_sec = self.obj(sec, "keys", where)
        if not keys_sec:
            raise self.fail(where, "no trusted keys", hint="pin at least one key with its fingerprint")
        keys = []
        for name in sorted(keys_sec):
            at = f"{where}.{name}"
            self.name(name, at, "a key name (the key's file in the cache and in /etc/apk/keys)")
            entry = self.obj(keys_sec, name, at)
            for k in entry:
                if k not in ("url", "path", "sha256"):
                    raise self.fail(f"{at}.{k}", "unknown key; a key takes url (or path) and sha256")
            sha = self.hex64(entry, "sha256", f"{at}.sha256")
            if local and "path" in entry:
                if "url" in entry:
                    raise self.fail(at, "both url and path: a key comes from one place")
                path = self.local_path(entry, "path", f"{at}.path", want_dir=False)
                keys.append(AlpineKey(name, "", sha, path, at))
            else:
                keys.append(AlpineKey(name, self.url(entry, "url", f"{at}.url", set()), sha, None, at))
        return tuple(keys)

    def local_path(self, entry: Mapping[str, Any], key: str, where: str, want_dir: bool) -> Path:
        text = self.text(entry, key, where)
        if "\0" in text:
            raise self.fail(where, f"{text!r} holds a NUL character, which no path can", hint="fix the path")
        path = (self.base / text).resolve() if not os.path.isabs(text) else Path(text).resolve()
        what = "directory" if want_dir else "file"
        if not (path.is_dir() if want_dir else path.is_file()):
            raise self.fail(
                where,
                f"{text!r} is not an existing {what} ({path})",
                hint="a relative path is taken from the pins file's directory"
                + ("; a repository is https://... or a local directory" if want_dir else ""),
            )
        if want_dir:
            out = settings.out_root().resolve()
            # the directory itself, and each architecture's directory in it (a symlink is followed)
            for real in (path, *((path / arch).resolve() for arch in ARCHES)):
                for top in ("images", "bin"):
                    inside = out / top
                    if real == inside or inside in real.parents:
                        raise self.fail(
                            where,
                            f"{text!r} is, or leads, inside {top}/ ({real}), which the tool writes and cleans",
                            hint="keep local packages elsewhere (e.g. ~/packages, where abuild puts them)",
                        )
        return path

    def repositories(
        self,
        sec: Mapping[str, Any],
        where: str,
        taken: dict[str, str],
        tags: dict[str, str],
        key_fps: dict[str, tuple[str, str]],
    ) -> tuple[Repository, ...]:
        """``extra_repositories``: name -> {url | path, keys, tag?}. Names are unique among all
        of an image's repositories, tags too; a key name means one key everywhere (the keys share
        /etc/apk/keys)."""
        if "extra_repositories" not in sec:
            return ()
        repos_sec = self.obj(sec, "extra_repositories", where)
        out = []
        for name in repos_sec:
            at = f"{where}.{name}"
            self.name(name, at, "a repository name (the lock's repo)")
            if name in taken:
                raise self.fail(at, f"a repository named {name!r} is already {taken[name]}", hint="name it uniquely")
            taken[name] = at
            entry = self.obj(repos_sec, name, at)
            for k in entry:
                if k not in ("url", "path", "keys", "tag", "supplier"):
                    raise self.fail(
                        f"{at}.{k}", "unknown key; a repository takes url (or path), keys, tag and supplier"
                    )
            if ("url" in entry) == ("path" in entry):
                raise self.fail(
                    at,
                    "expected exactly one of url (https://..., the directory that holds <arch>/APKINDEX.tar.gz) "
                    "and path (a local repository directory)",
                )
            local = None
            if "url" in entry:
                value = entry["url"]
                if isinstance(value, str) and not value.startswith("https://") and "://" not in value:
                    raise self.fail(
                        f"{at}.url",
                        f"{value!r} is neither an https:// URL nor a local repository",
                        hint="write a local directory as path, not url",
                    )
                location = self.url(entry, "url", f"{at}.url", set()).rstrip("/")
            else:
                location = self.text(entry, "path", f"{at}.path")
                local = self.local_path(entry, "path", f"{at}.path", want_dir=True)
            tag = ""
            if "tag" in entry:
                tag = self.text(entry, "tag", f"{at}.tag")
                if not TAG.fullmatch(tag):
                    raise self.fail(f"{at}.tag", f"{tag!r} is not a tag: letters, digits, '.', '_' and '-'")
                if tag in tags:
                    raise self.fail(
                        f"{at}.tag",
                        f"@{tag} is already the tag of {tags[tag]}",
                        hint="each tag names one repository (name@tag in a world must say where it comes from)",
                    )
                tags[tag] = at
            keys = self.keys(entry, f"{at}.keys", local=True)
            for key in keys:
                seen = key_fps.setdefault(key.name, (key.sha256, key.where))
                if seen[0] != key.sha256:
                    raise self.fail(
                        key.where,
                        f"another key of the same name is pinned at {seen[1]}",
                        hint="keys share /etc/apk/keys and apk names a signing key by its file name: "
                        "two different keys need two names",
                    )
            supplier = self.text(entry, "supplier", f"{at}.supplier") if "supplier" in entry else name
            out.append(Repository(name, location, keys, tag, local, at, supplier))
        return tuple(out)

    def world_tags(self, where: str, world: tuple[str, ...], tags: Mapping[str, str], runtime: str) -> None:
        """``name@tag`` in a world: the tag must be one of the runtime's repositories'."""
        for i, dep in enumerate(world):
            m = WORLD_TAG.search(dep)
            if m and m.group(1) not in tags:
                known = ", ".join("@" + t for t in sorted(tags)) or "none"
                raise self.fail(
                    f"{where}[{i}]",
                    f"{dep!r}: no repository of runtime {runtime} is tagged @{m.group(1)} (tags: {known})",
                    hint="add a tag to one of alpine.extra_repositories (or the runtime's own), or drop @tag",
                )


def read_json_text(path: Path, most: int, what: str) -> str:
    """A JSON file's text, read only if it is a regular file of at most ``most`` bytes: a device
    (/dev/zero) or a huge file is refused at once instead of read forever."""
    try:
        # O_NONBLOCK: opening a FIFO does not wait for a writer; a regular file reads as usual
        with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise PinError(f"{path}: not a regular file", hint=f"point it at a {what} (JSON)")
            data = f.read(most + 1)
    except FileNotFoundError:
        raise PinError(f"{path}: no such {what}", hint="set VULCAN_PINS to an existing file or unset it") from None
    except OSError as exc:
        raise PinError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > most:
        raise PinError(f"{path}: larger than {most >> 10} KiB: not a {what}", hint=f"point it at a {what} (JSON)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PinError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def load(path: Path | None = None) -> Pins:
    """Read and validate a pins file; raise PinError naming the JSON path of any problem."""
    path = path or pins_path()
    chk = _Checker(path)
    text = read_json_text(path, MAX_PINS_BYTES, "pins file")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PinError(f"{chk.label}: line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}") from None
    except (RecursionError, ValueError) as exc:  # 100,000 nested arrays; a 5,000-digit number
        what = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(";")[0]
        raise PinError(f"{chk.label}: invalid JSON: {what}") from None
    if not isinstance(raw, dict):
        raise chk.fail("(top level)", "expected an object")
    if "schema_version" not in raw:
        raise chk.fail("schema_version", "missing")
    version = raw["schema_version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise chk.fail(
            "schema_version",
            f"expected the number {SCHEMA_VERSION}, got {type(version).__name__} {json.dumps(version)}",
            hint=f'write "schema_version": {SCHEMA_VERSION} (no quotes)',
        )
    if version != SCHEMA_VERSION:
        raise chk.fail(
            "schema_version",
            f"unsupported version {version}; this tool reads version {SCHEMA_VERSION}",
            hint="use the pins file of this checkout's version, or update vulcan-images",
        )
    firecracker = chk.artifact(raw, "firecracker")
    kernel = chk.artifact(raw, "kernel")
    go = chk.artifact(raw, "go") if "go" in raw else None
    guest = chk.guest(raw)
    alpine = chk.alpine(raw) if "alpine" in raw else None
    digest = hashlib.sha256(json.dumps(raw, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return Pins(path, raw, firecracker, kernel, go, guest, alpine, digest)
