"""Work on another thread, in the same build's context: ``Task(fn, *args)``, ``task.result()``.

A build overlaps a few things (the cached stream's verification with the writer; the image's
check and its copy out of RAM with its hash). Plain threads: concurrent.futures would cost
every run its import (logging, queue: ~5 ms of a 0.3 s warm rebuild). The context (the
build's phase timings, log.py) goes with the work.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Task(Generic[T]):
    def __init__(self, fn: Callable[..., T], *args: Any) -> None:
        self._ctx = contextvars.copy_context()
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., T], args: tuple[Any, ...]) -> None:
        try:
            self._value = self._ctx.run(fn, *args)
        except BaseException as exc:  # handed to whoever asks for the result
            self._error = exc

    def exception(self) -> BaseException | None:
        """Wait; the error the work raised, if any."""
        self._thread.join()
        return self._error

    def result(self) -> T:
        """Wait; the work's value, or its error raised here."""
        if self.exception() is not None:
            raise self._error  # type: ignore[misc]
        return self._value  # type: ignore[return-value]


def once(fn: Callable[[], T]) -> Callable[[], T]:
    """``fn()`` computed once, whichever thread asks first; the others wait for that answer
    rather than run it again, as functools.lru_cache would on each thread that comes while it
    runs (an error is not kept: the next caller tries again). For what a build asks early, on
    another thread."""
    lock = threading.Lock()
    done: list[T] = []

    def first() -> T:
        with lock:
            if not done:
                done.append(fn())
            return done[0]

    return first


def wait_all(tasks: list[Task[Any]]) -> None:
    """Wait for every task, then raise the first error (none is left running behind an error)."""
    errors = [e for t in tasks if (e := t.exception()) is not None]
    if errors:
        raise errors[0]


_handoff_lock = threading.Lock()
_handoff_users = 0
_handoff_before = 0.0


@contextlib.contextmanager
def quick_handoff() -> Iterator[None]:
    """While one thread runs Python and others run C code that lets go of the GIL (inflating,
    hashing, writing), the GIL changes hands within 20 us of a request instead of Python's 5 ms:
    each return of those threads from C waits for the Python one to let go. Beside a busy merge,
    83 packages took 0.5 s to inflate at 5 ms, 0.065 s at 20 us (0.06 s alone); the stream's
    writer waited the same way. Counted: `rootfs --all` runs its builds in threads."""
    global _handoff_users, _handoff_before
    with _handoff_lock:
        if _handoff_users == 0:
            _handoff_before = sys.getswitchinterval()
            sys.setswitchinterval(2e-5)
        _handoff_users += 1
    try:
        yield
    finally:
        with _handoff_lock:
            _handoff_users -= 1
            if _handoff_users == 0:
                sys.setswitchinterval(_handoff_before)
