"""The errors a user can see: each says what failed, which input, and what to do next.

Model: cibuildwheel's errors.py and mkosi's die(msg, hint=...). The top-level handler in
scripts/__main__.py prints them without a traceback (with one under --debug).
"""

from __future__ import annotations


class VulcanError(Exception):
    """Base class. ``hint`` tells the user what to do next."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message}\n  hint: {self.hint}"
        return self.message


class PinError(VulcanError):
    """pins.json (or the lock) is malformed or incomplete."""


class DownloadError(VulcanError):
    """A URL could not be fetched."""


class ChecksumError(VulcanError):
    """Bytes do not match their pin."""


class ToolMissing(VulcanError):
    """An external program is not installed."""


class ToolFailed(VulcanError):
    """An external program exited non-zero."""


class BuildError(VulcanError):
    """A build step produced something unusable."""


class ArchiveError(VulcanError):
    """An archive has an unexpected layout."""
