"""Vulcan image tooling: everything a Vulcan host needs to boot a sandbox.

Sessions (``nox -l``; the logic lives in scripts/, this file only wires):
  download        pinned Firecracker, jailer and guest kernel -> bin/
  guest           the static vulcan-guest agent (guest/) -> bin/vulcan-guest
  lock            resolve every runtime's Alpine packages -> alpine.lock.json (on request)
  rootfs-<rt>     one ext4 image per runtime in pins.json (go, node, python) -> images/
  rootfs_all      all of them (tag: rootfs)
  verify          check bin/ and images/ against the pins and manifests (--json, --reproduce)
  boot            boot images and run their runtime (Firecracker, or --vmm qemu) (on request)
  clean           remove bin/, images/ and stamps; --all also the cache (on request)
  update_pins     newest upstream versions within the pinned lines; --check for CI (on request)
  bench           benchmarks against their floors, on a local mirror (on request)
  tests           the test suite (offline; local HTTP mirrors on 127.0.0.1)
  lint            ruff and mypy

Arguments after ``--`` go to the scripts, e.g. ``nox -s download -- --arch aarch64``.
Overrides: VULCAN_PINS (another pins file), VULCAN_MIRROR (fetch https://HOST/PATH as
$VULCAN_MIRROR/HOST/PATH), VULCAN_CACHE (download cache), VULCAN_OUT (where bin/ and images/ go).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import nox

nox.needs_version = ">=2024.10.9"
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["download", "rootfs_all"]

ROOT = Path(__file__).parent


def _runtimes() -> list[str]:
    """Runtime names from the pins file: adding one there adds its session here."""
    try:
        pins = json.loads(Path(os.environ.get("VULCAN_PINS", ROOT / "pins.json")).read_text())
        return sorted(pins["alpine"]["runtimes"])
    except (OSError, ValueError, KeyError, TypeError):
        return []  # a broken pins file is reported by the sessions themselves


RUNTIMES = _runtimes()


def _install(session: nox.Session, requirements: str) -> None:
    """Install pinned requirements once per venv: a no-op run must not touch pip."""
    if session.venv_backend == "none":  # nox --no-venv: this environment already has them (tests)
        return
    req = ROOT / requirements
    wanted = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(ROOT.glob("requirements*.txt")))).hexdigest()
    marker = Path(session.virtualenv.location) / f".vulcan-{req.stem}.sha256"
    if marker.exists() and marker.read_text() == wanted:
        return
    session.install("-r", str(req))
    marker.write_text(wanted)


def _up_to_date(command: str, argv: list[str]) -> bool:
    """Ask the step's own stamp check in this process (scripts/uptodate.py): a no-op session
    then starts no interpreter. Any doubt, including a nox on an older Python, runs the step."""
    try:
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        from scripts import uptodate
    except Exception:
        return False
    return uptodate.check(command, argv)


def _scripts(session: nox.Session, command: str, *args: str) -> None:
    if _up_to_date(command, [*args, *session.posargs]):
        return
    _install(session, "requirements.txt")
    session.run("python", "-m", "scripts", command, *args, *session.posargs, external=False, silent=False)


@nox.session
def download(session: nox.Session) -> None:
    """Download the pinned Firecracker, jailer and guest kernel into bin/ (verified)."""
    _scripts(session, "download")


@nox.session
def guest(session: nox.Session) -> None:
    """Build the static, reproducible vulcan-guest agent into bin/ (VULCAN_GO: local Go)."""
    _scripts(session, "guest")


def _rootfs_session(runtime: str) -> None:
    @nox.session(name=f"rootfs-{runtime}", requires=["guest"], tags=["rootfs", "image"])
    def rootfs(session: nox.Session) -> None:
        _scripts(session, "rootfs", "--runtime", runtime)

    rootfs.__doc__ = f"Build images/{runtime}.ext4 (+ manifest, SPDX SBOM) from the lock."


for _rt in RUNTIMES:
    _rootfs_session(_rt)


@nox.session(requires=[f"rootfs-{rt}" for rt in RUNTIMES], tags=["rootfs"])
def rootfs_all(session: nox.Session) -> None:
    """Build every runtime's image (the rootfs-* sessions)."""
    session.log(f"images for: {', '.join(RUNTIMES)}")


@nox.session
def verify(session: nox.Session) -> None:
    """Check every artifact in bin/ and images/ (table, or --json; --reproduce rebuilds)."""
    _scripts(session, "verify")


@nox.session(default=False)
def boot(session: nox.Session) -> None:
    """Boot images and prove the runtime works: Firecracker, or -- --vmm qemu."""
    _scripts(session, "boot")


@nox.session(default=False, venv_backend="none")
def clean(session: nox.Session) -> None:
    """Remove bin/, images/ and their stamps; -- --all also removes the download cache."""
    session.run("python3", "-m", "scripts", "clean", *session.posargs, external=True)


@nox.session(default=False)
def lock(session: nox.Session) -> None:
    """Resolve each runtime's Alpine packages for each arch into alpine.lock.json."""
    _scripts(session, "lock")


@nox.session(default=False)
def update_pins(session: nox.Session) -> None:
    """Move pins to the newest upstream versions in their lines, then re-lock (--check: report only)."""
    _scripts(session, "update_pins")


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Benchmarks: no-op, warm and cold builds, size, memory, boot; vs their floors."""
    _install(session, "requirements-dev.txt")
    session.run("python", "bench/bench.py", *session.posargs)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (offline; serves upstream-shaped mirrors on 127.0.0.1)."""
    _install(session, "requirements-dev.txt")
    session.run("pytest", *(session.posargs or ["-q", "tests"]))


@nox.session
def lint(session: nox.Session) -> None:
    """Check the code with ruff and mypy (the noxfile included)."""
    _install(session, "requirements-dev.txt")
    session.run("ruff", "check", "scripts", "tests", "bench", "noxfile.py")
    session.run("ruff", "format", "--check", "scripts", "tests", "bench", "noxfile.py")
    session.run("mypy", "scripts", "noxfile.py")
    # the CI workflow, against the GitHub Actions schema that check-jsonschema ships (offline)
    session.run("check-jsonschema", "--builtin-schema", "vendor.github-workflows", ".github/workflows/images.yml")
