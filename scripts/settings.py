"""Every environment variable the tool reads, validated in one place (the README's Overrides table).

A bad value is an error that names the variable and says what it takes, never a traceback or a
silent default. Each reader is a small function, so a no-op run reads only what it needs.
``tests/quick/test_layout.py`` keeps this table and the README's in step.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit

from .errors import SettingError

REPO_ROOT = Path(__file__).resolve().parent.parent
MAX_EPOCH = 2**32 - 1  # 2106-02-07: what tar, ext4 and squashfs all store without surprises
MAX_FETCH_WORKERS = 64


def _raw(name: str) -> str | None:
    assert name in NAMES, name  # every variable is declared above
    value = os.environ.get(name)
    return value if value else None


_resolved: dict[tuple[str, str], Path] = {}


def _directory(name: str, value: str) -> Path:
    """An existing directory, or a path whose nearest existing parent is a directory (resolved
    once per value: a build asks for the cache's path a few times per package)."""
    known = _resolved.get((name, value))
    if known is None:
        known = _resolved[(name, value)] = _resolve_directory(name, value)
    return known


def _resolve_directory(name: str, value: str) -> Path:
    path = Path(value).expanduser()
    probe = path
    try:
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        is_file = probe.exists() and not probe.is_dir()
    except PermissionError:  # not ours to look into: the step that uses it says so
        return Path(os.path.abspath(path))
    if is_file:
        raise SettingError(
            f"{name}={value}: {probe} is not a directory",
            hint=f"point {name} at a directory (or a path that can be created), or unset it",
        )
    return path.resolve()


def _whole(value: str) -> bool:
    """ASCII digits only, and few of them: str.isdigit() also takes '²', which int() refuses."""
    return value.isascii() and value.isdigit() and len(value) <= 20


def _flag(name: str) -> bool:
    value = _raw(name)
    if value is None or value == "0":
        return False
    if value == "1":
        return True
    raise SettingError(f"{name}={value!r}: expected 1 (on) or 0 (off)")


def pins_path() -> Path:
    value = _raw("VULCAN_PINS")
    return Path(value) if value else REPO_ROOT / "pins.json"


def mirror() -> str | None:
    """An http(s) URL, or a directory (a path, or file://) such as `nox -s mirror` writes: then
    ``file://`` and its absolute path."""
    value = _raw("VULCAN_MIRROR")
    if value is None:
        return None
    parts = urlsplit(value)
    if value.startswith("/") or parts.scheme == "file":
        directory = Path(parts.path if parts.scheme == "file" else value)
        if not directory.is_absolute() or not directory.is_dir():
            raise SettingError(f"VULCAN_MIRROR={value!r}: not an existing directory",
                               hint="a directory 'nox -s mirror -- DIR' wrote, by its absolute path")  # fmt: skip
        return f"file://{directory.resolve()}"
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise SettingError(
            f"VULCAN_MIRROR={value!r}: not an http:// or https:// URL, nor a directory",
            hint="e.g. VULCAN_MIRROR=http://127.0.0.1:8080/upstream (it serves https://HOST/PATH as .../HOST/PATH), "
            "or the absolute path of a directory 'nox -s mirror' wrote",
        )
    return value.rstrip("/")


def cache_dir() -> Path:
    value = _raw("VULCAN_CACHE")
    if value:
        return _directory("VULCAN_CACHE", value)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "vulcan-images"


def cache_is_default() -> bool:
    """No VULCAN_CACHE: the cache is this tool's own directory under the user's cache home."""
    return _raw("VULCAN_CACHE") is None


def out_root() -> Path:
    value = _raw("VULCAN_OUT")
    return _directory("VULCAN_OUT", value) if value else REPO_ROOT


def scratch_dir() -> Path | None:
    value = _raw("VULCAN_SCRATCH")
    return _directory("VULCAN_SCRATCH", value) if value else None


def ram_dir() -> Path | None:
    """Where an image is first written: a RAM file system (``/dev/shm`` unless said; None:
    write in the scratch directory). Setting VULCAN_SCRATCH means "assemble there": no RAM."""
    value = _raw("VULCAN_RAM")
    if value == "0" or (value is None and _raw("VULCAN_SCRATCH")):
        return None
    return _directory("VULCAN_RAM", value) if value else Path("/dev/shm")


def local_go() -> Path | None:
    value = _raw("VULCAN_GO")
    if value is None:
        return None
    go = Path(value)
    if not go.is_file() or not os.access(go, os.X_OK):
        raise SettingError(f"VULCAN_GO={value} is not an executable file", hint="point it at a go binary, or unset it")
    return go


def guest_source() -> tuple[Path, str] | None:
    value = _raw("VULCAN_GUEST_SOURCE")
    if value is None:
        return None
    directory, _, package = value.partition(":")
    return Path(directory), package or "."


def go_cache() -> Path:
    value = _raw("VULCAN_GOCACHE")
    return _directory("VULCAN_GOCACHE", value) if value else cache_dir() / "go-build"


def go_cache_is_set() -> bool:
    return _raw("VULCAN_GOCACHE") is not None


def tools_dir() -> Path:
    """Where mke2fs's helpers are built and kept (formats/ext4_preload.py)."""
    value = _raw("VULCAN_TOOLS")
    return _directory("VULCAN_TOOLS", value) if value else cache_dir() / "tools"


def tools_dir_is_set() -> bool:
    return _raw("VULCAN_TOOLS") is not None


def go_proxy() -> str:
    return _raw("VULCAN_GOPROXY") or "off"


def mke2fs_input() -> str | None:
    value = _raw("VULCAN_MKE2FS_INPUT")
    if value not in (None, "tar", "dir"):
        raise SettingError(f"VULCAN_MKE2FS_INPUT={value!r}: expected 'tar' or 'dir'", hint="or unset it")
    return value


def mke2fs_crc32c() -> bool:
    """Whether mke2fs gets the CRC-32C instruction (formats/ext4_preload.py): on unless 0."""
    return _raw("VULCAN_MKE2FS_CRC32C") is None or _flag("VULCAN_MKE2FS_CRC32C")


def reassemble() -> bool:
    return _flag("VULCAN_REASSEMBLE")


def fetch_workers() -> int:
    value = _raw("VULCAN_FETCH_WORKERS")
    if value is None:
        return 4
    if not _whole(value) or not 1 <= int(value) <= MAX_FETCH_WORKERS:
        raise SettingError(
            f"VULCAN_FETCH_WORKERS={value!r}: expected a whole number from 1 to {MAX_FETCH_WORKERS}",
            hint="or unset it (default 4)",
        )
    return int(value)


def keep_tar() -> Path | None:
    value = _raw("VULCAN_KEEP_TAR")
    return _directory("VULCAN_KEEP_TAR", value) if value else None


def no_fastpath() -> bool:
    return _raw("VULCAN_NO_FASTPATH") is not None


def timing() -> str | None:
    """None (off), "1" (a line of a build's phases) or "json" (one JSON line per build)."""
    value = _raw("VULCAN_TIMING")
    if value is None or value == "0":
        return None
    if value in ("1", "json"):
        return value
    raise SettingError(f"VULCAN_TIMING={value!r}: expected 1, json or 0 (off)")


def source_date_epoch() -> int | None:
    value = _raw("SOURCE_DATE_EPOCH")
    if value is None:
        return None
    if not _whole(value) or int(value) > MAX_EPOCH:
        raise SettingError(
            f"SOURCE_DATE_EPOCH={value!r}: expected whole seconds since 1970 from 0 to {MAX_EPOCH}",
            hint="or unset it: images are then clamped to the newest package's build time",
        )
    return int(value)


def registry_user() -> tuple[str, str] | None:
    """``VULCAN_REGISTRY_USER`` and ``VULCAN_REGISTRY_PASSWORD``, both or neither."""
    user, password = _raw("VULCAN_REGISTRY_USER"), _raw("VULCAN_REGISTRY_PASSWORD")
    if (user is None) != (password is None):
        given, missing = ("VULCAN_REGISTRY_USER", "VULCAN_REGISTRY_PASSWORD")[:: 1 if user else -1]
        raise SettingError(f"{given} is set but {missing} is not", hint="set both, or neither (then Docker's "
                           "config.json is read)")  # fmt: skip
    return (user, password) if user is not None and password is not None else None


def docker_config() -> Path:
    """``DOCKER_CONFIG``: the directory of Docker's config.json (default ~/.docker)."""
    value = _raw("DOCKER_CONFIG")
    return Path(value).expanduser() if value else Path.home() / ".docker"


def signing_key() -> bytes | None:
    """``VULCAN_SIGNING_KEY``: the publisher's private key, PEM text (CI: from a secret)."""
    value = _raw("VULCAN_SIGNING_KEY")
    if value is None:
        return None
    if "-----BEGIN" not in value:
        raise SettingError("VULCAN_SIGNING_KEY is not a PEM private key", hint="the key's PEM text itself, not a path "
                           "(a path goes to publish --key)")  # fmt: skip
    return value.encode()


def registry_insecure() -> frozenset[str]:
    """``VULCAN_REGISTRY_INSECURE``: registries (HOST:PORT, comma-separated) a build and
    ``nox -s lock`` reach over plain HTTP, as publish and pull do with --insecure; no other."""
    value = _raw("VULCAN_REGISTRY_INSECURE")
    hosts = frozenset(h.strip() for h in (value or "").split(",") if h.strip())
    for h in hosts:
        if not re.fullmatch(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?", h):
            raise SettingError(
                f"VULCAN_REGISTRY_INSECURE: {h!r} is not HOST or HOST:PORT",
                hint="e.g. VULCAN_REGISTRY_INSECURE=127.0.0.1:5000 (a comma-separated list)",
            )
    return hosts


def registry_ca() -> Path | None:
    """``VULCAN_REGISTRY_CA``: the PEM CA bundle a build and ``nox -s lock`` trust for
    registries (as publish and pull with --ca); default: the system's."""
    value = _raw("VULCAN_REGISTRY_CA")
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise SettingError(f"VULCAN_REGISTRY_CA={value}: not a file", hint="point it at a PEM CA bundle, or unset it")
    return path


def _seconds(name: str, default: float, most: float) -> float:
    value = _raw(name)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= most:
        raise SettingError(f"{name}={value!r}: expected seconds, more than 0 and at most {most:g}",
                           hint=f"or unset it (default {default:g})")  # fmt: skip
    return seconds


def registry_timeout() -> float:
    """``VULCAN_REGISTRY_TIMEOUT``: how long one read from a registry may wait (default 60 s)."""
    return _seconds("VULCAN_REGISTRY_TIMEOUT", 60.0, 3600.0)


def registry_deadline() -> float:
    """``VULCAN_REGISTRY_DEADLINE``: how long a pull's or publish's requests may take in all
    (default an hour: ~1 GB over a 2 Mbit/s link)."""
    return _seconds("VULCAN_REGISTRY_DEADLINE", 3600.0, 7 * 86400.0)


BOOT_TIMEOUT, SNAPSHOT_TIMEOUT, RESTORE_TIMEOUT = 600.0, 600.0, 60.0


def boot_timeout() -> float:
    """``VULCAN_BOOT_TIMEOUT``: how long a VM may take to boot to its agent (boot, and the cold
    boot beside a restore). 600 s: a normal KVM boots in about a second, QEMU's TCG and a KVM
    that emulates guest kernel code take minutes (a squashfs root ~2.5 min on such a host)."""
    return _seconds("VULCAN_BOOT_TIMEOUT", BOOT_TIMEOUT, 86400.0)


def snapshot_timeout() -> float:
    """``VULCAN_SNAPSHOT_TIMEOUT``: how long the VM of ``snapshot`` may take to become ready."""
    return _seconds("VULCAN_SNAPSHOT_TIMEOUT", SNAPSHOT_TIMEOUT, 86400.0)


def restore_timeout() -> float:
    """``VULCAN_RESTORE_TIMEOUT``: how long a restored clone may take from its load to the
    program's result (seconds on any KVM: the guest is already up)."""
    return _seconds("VULCAN_RESTORE_TIMEOUT", RESTORE_TIMEOUT, 86400.0)


def trust_file() -> Path | None:
    """``VULCAN_TRUST``: the PEM public keys a host trusts for what it pulls."""
    value = _raw("VULCAN_TRUST")
    return Path(value).expanduser() if value else None


def ci() -> bool:
    """Set by CI systems (GitHub Actions, GitLab, ...): plain log lines, never a progress bar."""
    return _raw("CI") is not None


class Variable(NamedTuple):
    """One environment variable: its name, what it takes, what it does, and its reader (the
    only code that reads it; a bad value is the reader's SettingError)."""

    name: str
    takes: str
    effect: str
    read: Callable[[], object]


VARIABLES = (
    Variable("VULCAN_PINS", "path", "another pins file (the lock is read next to it)", pins_path),
    Variable("VULCAN_MIRROR", "http(s) URL or directory", "fetch every upstream https://HOST/PATH as "
             "$VULCAN_MIRROR/HOST/PATH", mirror),
    Variable("VULCAN_CACHE", "directory", "the shared download cache", cache_dir),
    Variable("VULCAN_OUT", "directory", "where bin/ and images/ are written", out_root),
    Variable("VULCAN_SCRATCH", "directory", "where images are assembled", scratch_dir),
    Variable("VULCAN_RAM", "directory or 0", "where images are first written when it has room (0: never)", ram_dir),
    Variable("VULCAN_GO", "path to go", "build the agent with a local Go", local_go),
    Variable("VULCAN_GUEST_SOURCE", "dir[:package]", "build another agent", guest_source),
    Variable("VULCAN_GOCACHE", "directory", "the Go build cache", go_cache),
    Variable("VULCAN_TOOLS", "directory", "where mke2fs's CRC-32C helper is built (default $VULCAN_CACHE/tools)",
             tools_dir),
    Variable("VULCAN_GOPROXY", "GOPROXY value", "a Go module proxy for agents with dependencies", go_proxy),
    Variable("VULCAN_MKE2FS_INPUT", "tar or dir", "force the tar path or the staging-directory path", mke2fs_input),
    Variable("VULCAN_MKE2FS_CRC32C", "0 or 1", "0: mke2fs without the CPU's CRC-32C instruction (default 1: "
             "with it where it is known to be right; the same image bytes)", mke2fs_crc32c),
    Variable("VULCAN_REASSEMBLE", "1", "assemble the tar stream even if the cache has it", reassemble),
    Variable("VULCAN_FETCH_WORKERS", "1-64", "parallel package downloads", fetch_workers),
    Variable("VULCAN_KEEP_TAR", "directory", "also keep each image's tar stream there", keep_tar),
    Variable("VULCAN_NO_FASTPATH", "1", "always start the step, even when the in-process check says up to date",
             no_fastpath),
    Variable("VULCAN_TIMING", "1 or json", "say how long each build phase took (json: one JSON line per build)",
             timing),
    Variable("SOURCE_DATE_EPOCH", "seconds", "the timestamp images are clamped to", source_date_epoch),
    Variable("VULCAN_REGISTRY_USER", "user name", "the registry user for publish and pull (with the password)",
             registry_user),
    Variable("VULCAN_REGISTRY_PASSWORD", "password or token", "that user's password (or a token, e.g. GitHub's)",
             registry_user),
    Variable("DOCKER_CONFIG", "directory", "where Docker's config.json with registry credentials is",
             docker_config),
    Variable("VULCAN_REGISTRY_INSECURE", "HOST:PORT,...", "registries a template build and 'nox -s lock' reach "
             "over plain HTTP (publish and pull: --insecure)", registry_insecure),
    Variable("VULCAN_REGISTRY_CA", "path", "the PEM CA bundle a template build and 'nox -s lock' trust for "
             "registries (publish and pull: --ca)", registry_ca),
    Variable("VULCAN_REGISTRY_TIMEOUT", "seconds", "how long one read from a registry may wait (default 60)",
             registry_timeout),
    Variable("VULCAN_REGISTRY_DEADLINE", "seconds", "how long a pull's or publish's requests may take in all "
             "(default 3600)", registry_deadline),
    Variable("VULCAN_BOOT_TIMEOUT", "seconds", f"how long a VM may take to boot to its agent (default "
             f"{BOOT_TIMEOUT:g}; boot --timeout)", boot_timeout),
    Variable("VULCAN_SNAPSHOT_TIMEOUT", "seconds", f"how long snapshot's VM may take to become ready (default "
             f"{SNAPSHOT_TIMEOUT:g}; snapshot --timeout)", snapshot_timeout),
    Variable("VULCAN_RESTORE_TIMEOUT", "seconds", f"how long a restored clone may take to its first result "
             f"(default {RESTORE_TIMEOUT:g}; boot --restore --timeout)", restore_timeout),
    Variable("VULCAN_SIGNING_KEY", "PEM text", "the key publish signs with (else publish --key FILE)", signing_key),
    Variable("VULCAN_TRUST", "path", "the PEM public keys pull trusts (else pull --trust FILE)", trust_file),
    Variable("CI", "any value", "plain log lines, no progress bar (CI systems set it)", ci),
)  # fmt: skip
NAMES = frozenset(v.name for v in VARIABLES)


def environ(**values: str) -> dict[str, str]:
    """This process's environment with some settings given other values, for a run of this
    tool in a child process (``environ(VULCAN_OUT=...)``); only names of this table."""
    unknown = set(values) - NAMES
    assert not unknown, unknown
    return {**os.environ, **values}


WARNED = "_VULCAN_SAID_UNKNOWN"  # the unknown names already said in this run (not a VULCAN_ name itself)


def check_all() -> None:
    """Validate every variable that is set, before a command starts: a typo fails in a second,
    not after a build. Unknown ``VULCAN_*`` names get a warning (a misspelt override would
    otherwise be silently ignored; an error would break unrelated VULCAN_ variables)."""
    for v in VARIABLES:
        if os.environ.get(v.name):
            v.read()
    said = set(os.environ.get(WARNED, "").split(","))  # by the nox process or a step before this one
    for name in sorted(k for k in os.environ if k.startswith("VULCAN_") and k not in NAMES and k not in said):
        import difflib

        from . import log

        close = difflib.get_close_matches(name, sorted(NAMES), n=1, cutoff=0.75)
        guess = f"; did you mean {close[0]}?" if close else " (README.md, Overrides, lists the settings)"
        log.warn(f"{name} is not a setting of this tool and is ignored{guess}")
        said.add(name)
        os.environ[WARNED] = ",".join(sorted(said - {""}))  # the steps this process starts say it no more
