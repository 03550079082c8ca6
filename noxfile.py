"""Vulcan image tooling: everything a Vulcan host needs to boot a sandbox.

The logic lives in scripts/, this file only wires. The sessions and their one-line summaries
come from scripts/steps.py (the table ``python -m scripts --help`` shows) and from the
sessions below; the list at the end of this docstring is made from them when it loads
(``nox -l`` shows the same). Tags: ``rootfs`` (every image), ``image`` (one session per
runtime: CI's matrix). Arguments after ``--`` go to the scripts, e.g. ``nox -s download --
--arch aarch64``; a build session passes them on to the build sessions it requires.
Environment overrides: README.md, "Overrides" (scripts/settings.py reads and checks them all).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import nox

ROOT = Path(__file__).parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts import venvs  # noqa: E402  (stdlib only)
from scripts.steps import step  # noqa: E402  (stdlib only, imports no step)

nox.needs_version = ">=2024.10.9"
# uv when it is installed (faster), else virtualenv. nox still probes for uv when it creates a
# virtualenv and logs "uv binary not found." on every session of a machine without uv: noise
# for a user who chose not to have uv, so that one line is filtered out.
nox.options.default_venv_backend = "uv" if shutil.which("uv") else "virtualenv"
if not shutil.which("uv"):
    logging.getLogger("nox").addFilter(lambda record: record.getMessage() != "uv binary not found.")
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["download", "rootfs_all"]


def _read_pins() -> tuple[list[str], str | None]:
    """Runtime names (they name sessions) and the pins file's problem, if any.

    The problem is the tool's own message (scripts/pins.py): the same one `nox -s download`
    prints. Names are read leniently, so a pins file with one bad checksum still lists its
    sessions, which then fail with that message."""
    names: list[str] = []
    try:
        from scripts import pins, settings

        path = settings.pins_path()
        with contextlib.suppress(Exception):
            names = sorted(n for n in json.loads(path.read_text())["alpine"]["runtimes"] if isinstance(n, str))
        pins.load(path)
    except Exception as exc:  # every pins problem, said by the loader
        from scripts.errors import VulcanError

        return names, str(exc) if isinstance(exc, VulcanError) else f"{type(exc).__name__}: {exc}"
    return names, None


RUNTIMES, PINS_PROBLEM = _read_pins()


def _requested() -> list[str]:
    """Session names given on nox's command line (-s/--session/--sessions/-e)."""
    names, take = [], False
    for arg in sys.argv[1:]:
        if arg == "--":
            break
        if arg in ("-s", "--session", "--sessions", "-e"):
            take = True
        elif arg.startswith("-"):
            take = False
        elif take:
            names.append(arg)
    return names


def _explain_missing() -> None:
    """nox answers an unknown session with 'Sessions not found': say why, in our words."""
    if PINS_PROBLEM:
        print(f"vulcan: error: {PINS_PROBLEM}", file=sys.stderr)
        return
    for name in _requested():
        if name.startswith("rootfs-") and name.removeprefix("rootfs-") not in RUNTIMES:
            print(
                f"vulcan: error: no runtime {name.removeprefix('rootfs-')!r} in the pins file, so no session {name}\n"
                f"  hint: runtimes: {', '.join(RUNTIMES)} (sessions rootfs-<runtime>); add one under alpine.runtimes",
                file=sys.stderr,
            )


_explain_missing()


def _install(session: nox.Session, requirements: str) -> None:
    """Install hash-locked requirements once per venv: a no-op run must not touch pip. A venv
    without pip (left by a virtualenv run that died or raced, before scripts/venvs.py) is made again."""
    if session.venv_backend == "none":  # nox --no-venv: this environment already has them (tests)
        return
    req = ROOT / requirements
    wanted = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(ROOT.glob("requirements*.txt")))).hexdigest()
    location = Path(session.virtualenv.location)
    marker = location / f".vulcan-{req.stem}.sha256"
    if not (marker.exists() and marker.read_text() == wanted):
        if not list(location.glob("lib/python*/site-packages/pip/__main__.py")):
            session.log(f"{location} has no pip (a broken virtualenv): making it again")
            shutil.rmtree(location, ignore_errors=True)
            session.virtualenv.create()
        session.install("--require-hashes", "-r", str(req))
        marker.write_text(wanted)
    venvs.release(session.name)


def _up_to_date(command: str, argv: list[str]) -> bool:
    """Ask the step's own stamp check in this process (scripts/uptodate.py): a no-op session
    then starts no interpreter. Any doubt, including a nox on an older Python, runs the step."""
    try:
        from scripts import uptodate
    except Exception:
        return False
    return uptodate.check(command, argv)


def _scripts(session: nox.Session, command: str, *args: str) -> None:
    if _up_to_date(command, [*args, *session.posargs]):
        venvs.release(session.name)  # its venv is as it was: others may go on
        return
    _install(session, "requirements.txt")
    session.run("python", "-m", "scripts", command, *args, *session.posargs, external=False, silent=False)


def _step_session(command: str, **options: Any) -> None:
    """A session that runs one step of scripts/steps.py, with its summary as docstring."""

    def run(session: nox.Session) -> None:
        _scripts(session, command)

    run.__doc__ = step(command).summary
    run.__name__ = command
    nox.session(name=command, **options)(run)


_step_session("download")
_step_session("guest")


def _rootfs_session(runtime: str) -> None:
    def rootfs(session: nox.Session) -> None:
        _scripts(session, "rootfs", "--runtime", runtime)

    rootfs.__doc__ = f"Build images/{runtime}.<format> for alpine.formats (+ manifest, SPDX SBOM) from the lock."
    nox.session(name=f"rootfs-{runtime}", requires=["guest"], tags=["rootfs", "image"])(rootfs)


for _rt in RUNTIMES:
    _rootfs_session(_rt)


@nox.session(requires=["guest"], tags=["rootfs"])
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
_step_session("update_pins", default=False)


@nox.session(default=False, venv_backend="none")
def clean(session: nox.Session) -> None:
    """Remove bin/, images/ and their stamps; -- --all also removes the download cache."""
    session.run("python3", "-m", "scripts", "clean", *session.posargs, external=True)


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Benchmarks: no-op, warm and cold builds, size, memory, boot, snapshots, registry, assembly vs apk; vs floors."""
    _install(session, "requirements-dev.txt")
    session.run("python", "bench/bench.py", *session.posargs)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (offline; serves upstream-shaped mirrors on 127.0.0.1)."""
    _install(session, "requirements-dev.txt")
    session.run("pytest", *(session.posargs or ["-q", "tests"]))


@nox.session
def lint(session: nox.Session) -> None:
    """Check the code with ruff and mypy (the noxfile included), the workflow with check-jsonschema and zizmor."""
    _install(session, "requirements-dev.txt")
    session.run("ruff", "check", "scripts", "tests", "bench", "noxfile.py")
    session.run("ruff", "format", "--check", "scripts", "tests", "bench", "noxfile.py")
    session.run("mypy", "scripts", "noxfile.py")
    # the CI workflow, against the GitHub Actions schema that check-jsonschema ships (offline)
    session.run("check-jsonschema", "--builtin-schema", "vendor.github-workflows", ".github/workflows/images.yml")
    # and against zizmor's audits (template injection, credentials left in checkouts, ...), offline
    session.run("zizmor", "--offline", ".github/workflows/images.yml")


_NO_SESSION_RUN = {"-l", "--list", "--list-sessions", "--json", "--version", "-h", "--help", "--no-venv"}


def _hold_venv_creation() -> None:
    """One nox at a time creates each session's virtualenv (scripts/venvs.py): the sessions
    asked for (by name, by tag, or the defaults) and the sessions they require."""
    argv = sys.argv[1:]
    ours = argv[: argv.index("--")] if "--" in argv else argv
    if _NO_SESSION_RUN & set(ours) or "none" in ours:  # listing, or no virtualenvs (-db none)
        return
    registry = nox.registry.get()
    tags = {ours[i + 1] for i, a in enumerate(ours[:-1]) if a in ("-t", "--tags")}
    wanted = _requested() + [n for n, f in registry.items() if tags & set(f.tags)]
    if not wanted and not tags:
        wanted = list(nox.options.sessions or [])
    names = venvs.closure((n for n in wanted if n in registry), lambda n: registry[n].requires if n in registry else [])
    venvs.hold(ROOT / ".nox", (n for n in names if n in registry and registry[n].venv_backend != "none"))


_hold_venv_creation()
__doc__ += "\nSessions:\n" + "\n".join(
    f"  {name:<15} {func.__doc__}" for name, func in nox.registry.get().items()
)  # fmt: skip
