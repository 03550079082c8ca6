"""The one rule for names that become file names.

A key name, a runtime, a format, a version, or the ``P:``, ``V:``, ``A:`` of an index record
that make ``<name>-<version>.apk``: they come from pins.json, the lock, signed indexes and
packages, and a pull request's pins are untrusted input to CI. Each such name must be a plain
file name: not empty, not ``.`` or ``..``, no ``/``, no NUL or other control character, at most
255 bytes (NAME_MAX on Linux), so that ``dir / name`` can never leave ``dir``. Checked where
the name is read, so the error can name its file and JSON path.
"""

from __future__ import annotations

NAME_MAX = 255  # bytes, as Linux's NAME_MAX


def problem(name: object) -> str | None:
    """Why ``name`` is not a plain file name, or None when it is one."""
    if not isinstance(name, str):
        return f"expected a string, got {type(name).__name__}"
    if not name:
        return "empty"
    if name in (".", ".."):
        return f"{name!r} names a directory, not a file"
    if "/" in name:
        return "contains '/'"
    if "\0" in name:
        return "contains a NUL byte"
    if not name.isprintable():
        return "contains a control character"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if size > NAME_MAX:
        return f"is {size} bytes long; a file name takes at most {NAME_MAX}"
    return None
