"""The noxfile's in-process no-op check: is a step's output already up to date?

Starting ``python -m scripts`` costs about 75 ms per session on our machines (interpreter and
imports), four times in a no-op ``nox -s rootfs_all``. So before it starts the step, the
noxfile asks this module, in nox's own process, and skips the step when its stamp matches.
The answer comes from the step's own stamp check, run without network and without writes; it
is "up to date" only when that check says so. Anything else (outdated, a missing or stale
lock, a pinned Go not yet unpacked, an error, a command without a check) runs the step, which
then says what it does and why. ``VULCAN_NO_FASTPATH=1`` always runs the step.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os

from . import log

CHECKS = {"download": "vmm", "guest": "guest", "rootfs": "rootfs.build"}


def check(command: str, argv: list[str]) -> bool:
    """True (having logged why) if the step has nothing to do; False: run it."""
    if command not in CHECKS or os.environ.get("VULCAN_NO_FASTPATH"):
        return False
    try:  # silent: the step itself reports whatever made the check unsure (bad arguments, bad pins, ...)
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            done = importlib.import_module(f"{__package__}.{CHECKS[command]}").up_to_date(argv)
    except (Exception, SystemExit):
        return False
    if done is None:
        return False
    for line in done.splitlines():
        log.info(line)
    return True
