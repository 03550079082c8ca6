"""Vulcan image tooling: the logic behind the nox sessions (see noxfile.py)."""

TOOL_VERSION = "0.1.0"
