"""Entry point: ``python -m scripts COMMAND [ARGS]``; the nox sessions call this."""

from __future__ import annotations

import importlib
import sys

from .errors import VulcanError

COMMANDS = {
    "download": "vmm",
    "guest": "guest",
    "lock": "lock",
    "rootfs": "rootfs.build",
    "boot": "boot",
    "verify": "verify",
    "clean": "clean",
    "ci-matrix": "ci",
    "update_pins": "update_pins",
}


def main(argv: list[str]) -> int:
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m scripts {{{','.join(COMMANDS)}}} [--debug] [ARGS]", file=sys.stderr)
        return 2
    module = importlib.import_module(f"scripts.{COMMANDS[argv[0]]}")
    try:
        return int(module.main(argv[1:]))
    except VulcanError as exc:
        if debug:
            import traceback  # only here: every process start counts (bench: no-op)

            traceback.print_exc()
        print(f"vulcan: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("vulcan: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
