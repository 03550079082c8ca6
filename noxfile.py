"""Vulcan image tooling: everything a Vulcan host needs to boot a sandbox (README.md).

`nox` downloads and builds every image; `nox -s NAME -- ARGS` runs one session with its arguments.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import nox

ROOT = Path(__file__).parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts import nox_sessions  # noqa: E402  (stdlib only)
from scripts.steps import step  # noqa: E402  (stdlib only, imports no step)

nox.needs_version = ">=2024.10.9"
# nox probes for uv before each session and logs "uv binary not found." on a machine without
# it, though no session here asks nox for a virtualenv: noise, filtered out.
logging.getLogger("nox").addFilter(lambda record: record.getMessage() != "uv binary not found.")
nox.options.sessions = ["download", "rootfs_all"]


RUNTIMES, PINS_PROBLEM = nox_sessions.pins_summary()
_said = nox_sessions.missing_session(sys.argv[1:], os.environ, RUNTIMES, PINS_PROBLEM)
if _said:
    print(_said, file=sys.stderr)
NO_VENV = nox_sessions.no_venv(sys.argv[1:])


def _run(session: nox.Session, requirements: str, program: str, *args: str) -> None:
    """``program`` of the shared virtualenv of ``requirements``, run as in an activated one."""
    bin_dir, env = nox_sessions.activated(requirements, NO_VENV, session.log)
    session.run(f"{bin_dir}/{program}" if bin_dir else program, *args, external=True, env=env)


def _scripts(session: nox.Session, command: str, *args: str) -> None:
    if nox_sessions.up_to_date(command, [*args, *session.posargs]):
        return
    _run(session, "requirements.txt", "python", "-m", "scripts", command, *args, *session.posargs)


def _step_session(command: str, **options: Any) -> None:
    """A session that runs one step of scripts/steps.py, with its summary as docstring."""

    def run(session: nox.Session) -> None:
        _scripts(session, command)

    run.__doc__ = step(command).summary
    run.__name__ = command
    nox.session(name=command, venv_backend="none", **options)(run)


_step_session("download")
_step_session("guest")


def _rootfs_session(runtime: str) -> None:
    def rootfs(session: nox.Session) -> None:
        _scripts(session, "rootfs", "--runtime", runtime)

    rootfs.__doc__ = f"Build images/{runtime}.<format> for alpine.formats (+ manifest, SPDX SBOM) from the lock."
    nox.session(name=f"rootfs-{runtime}", requires=["guest"], tags=["rootfs", "image"], venv_backend="none")(rootfs)


for _rt in RUNTIMES:
    _rootfs_session(_rt)


@nox.session(requires=["guest"], tags=["rootfs"], venv_backend="none")
def rootfs_all(session: nox.Session) -> None:
    """Build every runtime's images, all at once in one process (what the rootfs-* sessions build)."""
    if PINS_PROBLEM or not RUNTIMES:
        session.error(f"vulcan: error: {PINS_PROBLEM or 'no runtimes in the pins file'}")
    session.log(f"images for: {', '.join(RUNTIMES)}")
    _scripts(session, "rootfs", "--all")


_step_session("verify")
_step_session("boot", default=False)
_step_session("snapshot", default=False)
_step_session("publish", default=False)
_step_session("pull", default=False)
_step_session("lock", default=False)
_step_session("mirror", default=False)
_step_session("update_pins", default=False)


@nox.session(default=False, venv_backend="none")
def clean(session: nox.Session) -> None:
    """Remove bin/, images/ and their stamps; -- --all also removes the download cache."""
    session.run("python3", "-m", "scripts", "clean", *session.posargs, external=True)


@nox.session(default=False, venv_backend="none")
def bench(session: nox.Session) -> None:
    """Benchmarks: no-op, warm and cold builds, size, memory, boot, snapshots, registry, assembly vs apk; vs floors."""
    _run(session, "requirements-dev.txt", "python", "bench/bench.py", *session.posargs)


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """Run the test suite (offline; serves upstream-shaped mirrors on 127.0.0.1)."""
    _run(session, "requirements-dev.txt", "python", "-m", "pytest", *(session.posargs or ["-q", "tests"]))


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    """Check the code with ruff and mypy (the noxfile included), the workflow with check-jsonschema and zizmor."""

    def tool(name: str, *args: str) -> None:
        _run(session, "requirements-dev.txt", name, *args)

    tool("ruff", "check", "scripts", "tests", "bench", "noxfile.py")
    tool("ruff", "format", "--check", "scripts", "tests", "bench", "noxfile.py")
    tool("mypy", "scripts", "noxfile.py")
    # the CI workflow, against the GitHub Actions schema that check-jsonschema ships (offline)
    tool("check-jsonschema", "--builtin-schema", "vendor.github-workflows", ".github/workflows/images.yml")
    # and against zizmor's audits (template injection, credentials left in checkouts, ...), offline
    tool("zizmor", "--offline", ".github/workflows/images.yml")


# The logic lives in scripts/, this file only wires. Each step session's summary is its line in
# scripts/steps.py (the table `python -m scripts --help` shows), so `nox -l` and the scripts say
# the same. Tags: rootfs (every image), image (one session per runtime: CI's matrix). No session
# asks nox for a virtualenv: they share one per requirements file (scripts/venvs.py).
