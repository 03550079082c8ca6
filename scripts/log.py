"""Console output: plain log lines everywhere, a progress bar only on an interactive terminal."""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO


def _stream() -> TextIO:
    return sys.stderr


def info(msg: str) -> None:
    print(f"vulcan: {msg}", file=_stream(), flush=True)


def warn(msg: str) -> None:
    print(f"vulcan: WARNING: {msg}", file=_stream(), flush=True)


def interactive() -> bool:
    """A progress bar only makes sense on a terminal, and never in CI logs."""
    return _stream().isatty() and not os.environ.get("CI")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


class Progress:
    """Byte progress for one download: a redrawn bar on a terminal, nothing otherwise."""

    def __init__(self, label: str, total: int | None) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.enabled = interactive()
        self._last = 0.0
        self._start = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last < 0.1:
            return
        self._last = now
        self._draw()

    def _draw(self) -> None:
        rate = self.done / max(time.monotonic() - self._start, 1e-6)
        if self.total:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            text = f"{self.label} [{bar:<30}] {human(self.done)}/{human(self.total)} {human(rate)}/s"
        else:
            text = f"{self.label} {human(self.done)} {human(rate)}/s"
        print(f"\r{text[:120]:<120}", end="", file=_stream(), flush=True)

    def close(self) -> None:
        if self.enabled:
            self._draw()
            print(file=_stream(), flush=True)


# Phase timings (VULCAN_TIMING=1), per build: concurrent builds each count their own.
_timings: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("vulcan_timings", default=None)
_phase_lock = threading.Lock()


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Time a build phase (summed per name, across the build's threads); see timing()."""
    start = time.perf_counter()
    try:
        yield
    finally:
        phases = _timings.get()
        if phases is not None:
            with _phase_lock:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - start


@contextlib.contextmanager
def timing(what: str) -> Iterator[None]:
    """Count this build's phases; with VULCAN_TIMING=1, one line of where its time went."""
    phases: dict[str, float] = {}
    token = _timings.set(phases)
    try:
        yield
    finally:
        _timings.reset(token)
        from . import settings

        if settings.timing() and phases:
            with _phase_lock:
                text = "; ".join(f"{k}={v:.3f}s" for k, v in phases.items())
            info(f"timing {what}: {text}")
