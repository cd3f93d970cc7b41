"""Stopping cleanly on SIGINT and SIGTERM, with no orphaned worker process.

Ctrl-C raises KeyboardInterrupt in the main thread; :func:`sigterm_interrupts` makes SIGTERM (what
``kill``, batch schedulers and containers send) take the same path, so a run or a study keeps its
finished work, stops its worker processes and exits with one line. Worker processes call
:func:`die_with_parent`, so that even a parent killed with SIGKILL leaves none of them behind.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt."""

    signum = signal.SIGTERM


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """The shell's convention: 128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + int(getattr(interrupt, "signum", signal.SIGINT))


@contextmanager
def sigterm_interrupts():
    """Within the block, SIGTERM raises :class:`Interrupted` in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG); a worker
    blocked on its task queue would otherwise live on, holding its model's memory."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:  # no glibc (e.g. musl): the parent's own cleanup still stops its workers
        pass
