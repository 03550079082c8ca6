"""APKINDEX text: package records and dependency strings (pure parsing, no I/O).

Field letters from apk-tools' src/package.c (apk_pkg_add_info) and the APKINDEX format page
of the Alpine wiki: C checksum, P name, V version, A arch, S size, I installed size,
T description, U url, L license, o origin, m maintainer, t build time, c commit, D depends,
p provides, i install_if, k provider_priority, r replaces, q replaces_priority.
Unknown lower-case fields are ignored; an unknown upper-case field makes the package
unusable (apk-tools' rule: a newer format the reader does not understand).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from .. import names
from . import version as V

KNOWN = set("CPVASITULomtcDpikrq")
# The installed database (lib/apk/db/installed) adds per record its directories and files
# (F M R a Z) and state (s: repository tag, f: broken flags): read and skipped, since a Package
# holds no file list (apk-tools src/database.c apk_db_read_fdb / apk_db_write_fdb).
INSTALLED_ONLY = set("FMRaZsf")
_OPS = re.compile(r"(><|<=|>=|<~|>~|[<>=~])")


@dataclass(frozen=True)
class Dep:
    """``[!]name[@tag][op version]``; name may be ``so:...``, ``cmd:...``, ``pc:...`` or a path."""

    name: str
    mask: int = V.ANY
    version: str = ""
    conflict: bool = False
    tag: str = ""

    def matches_version(self, version: str) -> bool:
        if self.mask == V.CHECKSUM:
            return False  # checksum pins are matched by the caller (needs the package's C:)
        return V.matches(version, self.mask, self.version)

    def __str__(self) -> str:
        op = "" if self.mask == V.ANY else V.op_string(self.mask)
        tag = f"@{self.tag}" if self.tag else ""
        return f"{'!' if self.conflict else ''}{self.name}{tag}{op}{self.version}"


def parse_dep(text: str) -> Dep:
    conflict = text.startswith("!")
    body = text[1:] if conflict else text
    m = _OPS.search(body)
    if m:
        name, op, ver = body[: m.start()], m.group(1), body[m.end() :]
        mask = V.CHECKSUM if op == "><" else V.op_mask(op)
    else:
        name, mask, ver = body, V.ANY, ""
    tag = ""
    if "@" in name:
        name, tag = name.split("@", 1)
    if not name:
        raise ValueError(f"bad dependency {text!r}")
    return Dep(name, mask, ver, conflict, tag)


def parse_provide(text: str) -> tuple[str, str | None]:
    """``name=version`` (versioned provide) or ``name`` (unversioned)."""
    if "=" in text:
        name, ver = text.split("=", 1)
        return name, ver
    return text, None


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    arch: str = ""
    checksum: str = ""  # C: "Q1" + base64(sha1(control gzip member))
    size: int = 0
    installed_size: int = 0
    description: str = ""
    url: str = ""
    license: str = ""
    origin: str = ""
    maintainer: str = ""
    build_time: int = 0
    commit: str = ""
    depends: tuple[Dep, ...] = ()
    provides: tuple[tuple[str, str | None], ...] = ()
    install_if: tuple[Dep, ...] = ()
    provider_priority: int | None = None
    replaces: tuple[str, ...] = ()
    replaces_priority: int = 0
    repo: str = ""  # which repository it came from ("main", "community", ...)
    repo_index: int = 0  # position of that repository in the configured list
    extra: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    order: int = field(default=0, compare=False)  # position in its index: apk's last tie-breaker

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}.apk"

    @property
    def ident(self) -> str:
        return f"{self.name}-{self.version}"


@dataclass(frozen=True)
class ParsedIndex:
    packages: tuple[Package, ...]
    unusable: tuple[str, ...]  # "name-version: unknown field X"


def _ints(value: str, letter: str, where: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{where}: field {letter}: not a number: {value!r}") from None


_TEXT = {"C": "checksum", "P": "name", "V": "version", "A": "arch", "T": "description", "U": "url",
         "L": "license", "o": "origin", "m": "maintainer", "c": "commit"}  # fmt: skip
_NUMBER = {"S": "size", "I": "installed_size", "t": "build_time", "k": "provider_priority", "q": "replaces_priority"}
_LISTS: dict[str, tuple[str, Callable[[str], object]]] = {
    "D": ("depends", parse_dep),
    "p": ("provides", parse_provide),
    "i": ("install_if", parse_dep),
    "r": ("replaces", str),
}


def _record(fields: list[tuple[str, str]], repo: str, repo_index: int) -> Package | str:
    kw: dict[str, object] = {"repo": repo, "repo_index": repo_index}
    unknown = [k for k, _ in fields if k.isupper() and k not in KNOWN and k not in INSTALLED_ONLY]
    values = dict(fields)
    where = f"{values.get('P', '?')}-{values.get('V', '?')}"
    if unknown:
        return f"{where}: unknown field {unknown[0]}"
    if "P" not in values or "V" not in values:
        return f"{where}: record without P: or V:"
    for letter in ("P", "V", "A"):  # they make the file name <P>-<V>.apk and cache paths
        if letter in values and (why := names.problem(values[letter])) is not None:
            return f"{where!r}: field {letter}: not a plain file name ({why})"
    if (why := names.problem(f"{values['P']}-{values['V']}.apk")) is not None:
        return f"{where!r}: its file name {why}"
    for k, v in fields:
        if k in _TEXT:
            kw[_TEXT[k]] = v
        elif k in _NUMBER:
            kw[_NUMBER[k]] = _ints(v, k, where)
        elif k in _LISTS:  # these may repeat; apk appends (e.g. two p: lines in one record)
            name, parse = _LISTS[k]
            kw[name] = (*kw.get(name, ()), *(parse(item) for item in v.split()))  # type: ignore[misc]
    return Package(**kw)  # type: ignore[arg-type]


def checksum_key(checksum: str) -> bytes | str:
    """The identity apk gives a package: its decoded checksum. Two "Q1" strings that differ
    only in base64 padding bits are the same package (apk-tools hashes packages by checksum)."""
    if checksum.startswith("Q1"):
        try:
            return base64.b64decode(checksum[2:], validate=True)
        except (binascii.Error, ValueError):
            return checksum
    return checksum


def dedupe(packages: list[Package]) -> list[Package]:
    """Keep the first record of each checksum, as apk does when it loads indexes."""
    seen: set[bytes | str] = set()
    out = []
    for p in packages:
        key = checksum_key(p.checksum) if p.checksum else f"{p.name}-{p.version}-{p.repo_index}"
        if key in seen:
            continue
        seen.add(key)
        out.append(p)
    return out


def parse_index(text: str, repo: str = "", repo_index: int = 0) -> ParsedIndex:
    """Parse APKINDEX or installed-database text: records separated by blank lines, ``X:value``
    lines. Installed-database file lines are read and skipped (INSTALLED_ONLY)."""
    packages: list[Package] = []
    unusable: list[str] = []
    fields: list[tuple[str, str]] = []

    def flush() -> None:
        if fields:
            rec = _record(fields, repo, repo_index)
            if isinstance(rec, str):
                unusable.append(rec)
            else:
                packages.append(replace(rec, order=len(packages)))
            fields.clear()

    for line in text.splitlines():
        if not line.strip():
            flush()
            continue
        if len(line) < 2 or line[1] != ":":
            continue  # not a field line (apk skips these too)
        fields.append((line[0], line[2:]))
    flush()
    return ParsedIndex(tuple(packages), tuple(unusable))
