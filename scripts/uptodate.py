"""The noxfile's in-process no-op check: is a step's output already up to date?

Starting ``python -m scripts`` costs about 75 ms per session on our machines (interpreter and
imports), four times in a no-op ``nox -s rootfs_all``. So before it starts the step, the
noxfile asks this module, in nox's own process, and skips the step when its stamp matches.
The answer is the step's own ``check()`` (step.py), run dry: without network and without
writes. Anything else (outdated, a missing or stale lock, a pinned Go not yet unpacked, an
error, a step without a stamp) runs the step, which then says what it does and why.
``VULCAN_NO_FASTPATH=1`` always runs the step.
"""

from __future__ import annotations

import contextlib
import io
from types import ModuleType

from . import log


def check(command: str, argv: list[str]) -> bool:
    """True (having logged why) if the step has nothing to do; False: run it."""
    try:  # silent: the step itself reports whatever made the check unsure (bad arguments, bad pins, ...)
        from . import settings, step, steps

        _check_settings_once(settings)  # a bad value runs the step, which says what is wrong
        chosen = steps.BY_COMMAND.get(command)
        if chosen is None or not chosen.stamped or settings.no_fastpath():
            return False
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            done = step.all_up_to_date(chosen.load(), argv)
    except (Exception, SystemExit):
        return False
    if done is None:
        return False
    for line in done:
        log.info(line)
    return True


_settings_checked: list[bool] = []


def _check_settings_once(settings: ModuleType) -> None:
    """What ``python -m scripts`` checks before any step (settings.check_all), here too: an
    up-to-date tree must not hide a bad value or warn nothing of a misspelt ``VULCAN_*`` name.
    Once per nox process: the warning is said once, not once per session."""
    if not _settings_checked:
        settings.check_all()  # raises on a bad value: every step then runs, and says it
        _settings_checked.append(True)
