"""What the noxfile's sessions do, so that the noxfile only declares them: standard library only.

nox imports the noxfile before it runs anything, so what is read here at import is cheap: the
pins file's runtime names (they name the rootfs-<runtime> sessions) and, for a session nox will
not find, the reason in our words. A session runs a step after ``up_to_date``, the step's own
stamp check in nox's process (a no-op session starts no interpreter), as ``python -m scripts``
in the shared virtualenv of requirements.txt (``activated``, venvs.py).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from . import venvs

ROOT = Path(__file__).resolve().parent.parent


def pins_summary() -> tuple[list[str], str | None]:
    """Runtime names (they name sessions) and the pins file's problem, if any: the loader's own
    message, the one `nox -s download` prints. Names are read leniently, so a pins file with one
    bad checksum still lists its sessions, which then fail with that message."""
    names: list[str] = []
    try:
        from . import pins, settings

        path = settings.pins_path()
        with contextlib.suppress(Exception):
            names = sorted(n for n in json.loads(path.read_text())["alpine"]["runtimes"] if isinstance(n, str))
        pins.load(path)
    except Exception as exc:  # every pins problem, said by the loader
        from .errors import VulcanError

        return names, str(exc) if isinstance(exc, VulcanError) else f"{type(exc).__name__}: {exc}"
    return names, None


SESSION_FLAGS = ("-s", "-e", "--session", "--sessions")


def requested(argv: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """The sessions named on nox's command line, in every form nox takes: ``-s A B``,
    ``--session A``, ``--sessions A B``, ``-e A``, ``-sA``, ``--session=A``; else ``NOXSESSION``
    (comma-separated). Up to ``--``, after which the arguments are the session's."""
    names: list[str] = []
    given, take = False, False
    for arg in argv:
        if arg == "--":
            break
        flag, eq, value = arg.partition("=")
        if arg in SESSION_FLAGS:
            given, take = True, True
        elif eq and flag in SESSION_FLAGS:
            given, take = True, False
            names.append(value)
        elif arg[:2] in ("-s", "-e") and len(arg) > 2 and not arg.startswith("--"):
            given, take = True, False
            names.append(arg[2:])
        elif arg.startswith("-"):
            take = False
        elif take:
            names.append(arg)
    if not given:
        names = [n.strip() for n in environ.get("NOXSESSION", "").split(",") if n.strip()]
    return names


def missing_session(argv: Sequence[str], environ: Mapping[str, str], runtimes: Sequence[str],
                    problem: str | None) -> str | None:  # fmt: skip
    """Why nox will answer 'Sessions not found', in our words (None: nothing to say)."""
    if problem:
        return f"vulcan: error: {problem}"
    for name in requested(argv, environ):
        runtime = name.removeprefix("rootfs-")
        if name.startswith("rootfs-") and runtime not in runtimes:
            return (f"vulcan: error: no runtime {runtime!r} in the pins file, so no session {name}\n"
                    f"  hint: runtimes: {', '.join(runtimes)} (sessions rootfs-<runtime>); add one under "
                    "alpine.runtimes")  # fmt: skip
    return None


def no_venv(argv: Sequence[str]) -> bool:
    """``nox --no-venv``: the sessions run with the python on PATH (the test suite runs nox so)."""
    ours = list(argv[: list(argv).index("--")] if "--" in argv else argv)
    return "--no-venv" in ours


def activated(requirements: str, plain: bool, say: Callable[[str], None]) -> tuple[str, dict[str, str]]:
    """The bin/ directory of the shared virtualenv of ``requirements`` (made the first time it
    is needed) and the environment of a program run in it, as an activated virtualenv gives:
    its bin/ first on PATH (the tests find zizmor, check-jsonschema, oras there) and
    VIRTUAL_ENV. ``plain`` (--no-venv): the environment as it is, programs from PATH."""
    if plain:
        return "", {}
    venv = venvs.ensure(ROOT, requirements, say)
    path = f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
    return str(venv / "bin"), {"PATH": path, "VIRTUAL_ENV": str(venv)}


def up_to_date(command: str, argv: list[str]) -> bool:
    """The step's own stamp check, in this process (uptodate.py): a no-op session then starts no
    interpreter. Any doubt, including a nox on an older Python, runs the step."""
    try:
        from . import uptodate
    except Exception:
        return False
    return uptodate.check(command, argv)
