"""Giving freed heap memory back to the operating system.

glibc keeps what a process freed in its heaps (one per thread that
allocated) until the top of a heap is free, so a burst of large transfers
(uploads read in 64 KiB chunks, interleaved with small long-lived objects)
leaves the process's RSS above where it was long after the memory was
freed. :func:`trim_soon` asks for ``malloc_trim(0)`` (every arena, glibc
2.8+) once, shortly after a burst ended: callers call it when a large
transfer's buffers were released. Elsewhere (another libc) it does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
from collections.abc import Callable

TRIM_DELAY_SECONDS = 0.5  # one trim for the releases of a burst

_pending: set[asyncio.AbstractEventLoop] = set()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim
    except (OSError, AttributeError):
        return None


def trim_now() -> None:
    """``malloc_trim(0)`` where glibc has it. ctypes releases the GIL for
    the call; it takes about a millisecond per 100 MB of heap."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def trim_soon() -> None:
    """Schedule one :func:`trim_now` on the running loop
    ``TRIM_DELAY_SECONDS`` from now, unless one is already scheduled
    (outside a loop: trim at once)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        trim_now()
        return
    if loop in _pending:
        return
    _pending.add(loop)

    def run() -> None:
        _pending.discard(loop)
        trim_now()

    loop.call_later(TRIM_DELAY_SECONDS, run)
