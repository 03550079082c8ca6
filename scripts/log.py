"""Console output: plain log lines everywhere, a progress bar only on an interactive terminal."""

from __future__ import annotations

import contextlib
import contextvars
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO, TypeVar

from .text import human as human  # log.human: what callers format sizes with

T = TypeVar("T")


def _stream() -> TextIO:
    return sys.stderr


_console = threading.RLock()  # one writer at a time: builds and downloads run in threads
_active: list[Progress] = []  # the downloads whose progress is on screen
_bar_shown = False
WIDTH = 120


def _clear_bar(out: TextIO) -> None:
    """Erase the progress line (the caller holds _console) so a log line starts on a clean line."""
    global _bar_shown
    if _bar_shown:
        out.write("\r" + " " * WIDTH + "\r")
        _bar_shown = False


def info(msg: str) -> None:
    with _console:
        out = _stream()
        _clear_bar(out)
        print(f"vulcan: {msg}", file=out, flush=True)


def warn(msg: str) -> None:
    info(f"WARNING: {msg}")


def interactive() -> bool:
    """A progress bar only makes sense on a terminal, and never in CI logs."""
    return _stream().isatty() and not _config.ci


class _Config:
    ci = False  # CI: plain lines, never a progress bar
    timing: str | None = None  # VULCAN_TIMING: "1" a line of phases per build, "json" a JSON line
    debug = False  # --debug: tracebacks, and the lines debug() writes


_config = _Config()


def setup(ci: bool, timing: str | None, debug: bool = False) -> None:
    """What the settings say about output (``python -m scripts`` calls it once they are checked):
    the log reads no environment itself, so it imports nothing of ours but text.py."""
    _config.ci, _config.timing, _config.debug = ci, timing, debug


def debug(msg: str) -> None:
    """A line for ``--debug`` only (API requests and answers, ...)."""
    if _config.debug:
        info(f"debug: {msg}")


class Progress:
    """Byte progress of a download: one redrawn line on a terminal, nothing otherwise. Several
    downloads at once (parallel fetches, builds running together) share one line that sums them,
    and log lines are printed above it, never glued onto it."""

    def __init__(self, label: str, total: int | None) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.enabled = interactive()
        self._start = time.monotonic()
        if self.enabled:
            with _console:
                _active.append(self)

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        global _last_draw
        now = time.monotonic()
        with _console:
            if now - _last_draw < 0.1:
                return
            _last_draw = now
            _draw()

    def close(self) -> None:
        if not self.enabled:
            return
        with _console:
            if self in _active:
                _active.remove(self)
            _clear_bar(_stream())
            if _active:
                _draw()


_last_draw = 0.0


def _line(now: float) -> str:
    """The progress line for what is being downloaded (the caller holds _console)."""
    done = sum(p.done for p in _active)
    rate = done / max(now - min(p._start for p in _active), 1e-6)
    if len(_active) == 1:
        p = _active[0]
        if p.total:
            bar = "#" * int(min(p.done / p.total, 1.0) * 30)
            return f"{p.label} [{bar:<30}] {human(p.done)}/{human(p.total)} {human(rate)}/s"
        return f"{p.label} {human(p.done)} {human(rate)}/s"
    totals = [p.total for p in _active]
    of = f" of {human(sum(t for t in totals if t))}" if all(totals) else ""
    return f"downloading {len(_active)} files: {human(done)}{of} {human(rate)}/s"


def _draw() -> None:
    global _bar_shown
    if not _active:
        return
    out = _stream()
    out.write(f"\r{_line(time.monotonic())[:WIDTH]:<{WIDTH}}")
    out.flush()
    _bar_shown = True


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


def timed(name: str, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` timed as the phase ``name`` (for work handed to another thread)."""
    with phase(name):
        return fn(*args)


@contextlib.contextmanager
def timing(what: str) -> Iterator[None]:
    """Count this build's phases; with VULCAN_TIMING=1, one line of where its time went."""
    phases: dict[str, float] = {}
    token = _timings.set(phases)
    try:
        yield
    finally:
        _timings.reset(token)
        if _config.timing and phases:
            with _phase_lock:
                spent = {k: round(v, 4) for k, v in phases.items()}
            if _config.timing == "json":  # what the benchmark reads: no parsing of log text
                with _console:
                    print(json.dumps({"timing": what, "phases": spent}), file=_stream(), flush=True)
            else:
                info(f"timing {what}: " + "; ".join(f"{k}={v:.3f}s" for k, v in spent.items()))
