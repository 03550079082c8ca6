"""Vulcan image tooling: the logic behind the nox sessions (see noxfile.py)."""

TOOL_VERSION = "0.3.0"  # bumped whenever what an image holds changes: stamps and cached streams follow
