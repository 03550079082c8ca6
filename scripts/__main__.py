"""Entry point: ``python -m scripts COMMAND [ARGS]``; the nox sessions call this."""

from __future__ import annotations

import os
import sys

from .errors import handle
from .steps import BY_COMMAND, STEPS


def usage() -> str:
    width = max(len(s.command) for s in STEPS)
    rows = "\n".join(f"  {s.command:<{width}}  {s.summary}" for s in STEPS)
    return (
        f"usage: python -m scripts COMMAND [--debug] [ARGS]   (nox -s SESSION -- ARGS runs the same)\n\n"
        f"commands:\n{rows}\n\n'python -m scripts COMMAND --help' shows a command's arguments; --debug adds a "
        "traceback to any error."
    )


def main(argv: list[str]) -> int:
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv or argv[0] not in BY_COMMAND:
        print(usage(), file=sys.stderr)
        if argv:
            print(f"vulcan: error: unknown command {argv[0]!r}", file=sys.stderr)
        return 2
    chosen = BY_COMMAND[argv[0]]
    try:
        from . import log, settings

        settings.check_all()
        log.setup(settings.ci(), settings.timing(), debug)
        module = chosen.load()
        if chosen.stamped:
            from .step import drive

            return drive(module, argv[1:])
        return int(module.main(argv[1:]))
    except (Exception, KeyboardInterrupt) as exc:
        return handle(exc, debug)


def exit_now(code: int) -> None:
    """Exit without the interpreter's teardown (freeing every module and object: 10-20 ms of
    every run, a tenth of a small warm rebuild). Safe here: files are written through
    context managers and published by rename, and every thread a step starts is waited for."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main(sys.argv[1:]))
