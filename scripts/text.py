"""Formatting shared by the log and the errors (a leaf: it imports nothing of ours)."""

from __future__ import annotations


def human(n: float) -> str:
    """A byte count as people read it: 512 B, 1.5 KiB, 63.0 MiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover
