"""A flag to wait on, as ``asyncio.Event``, costing nothing while nobody waits.

Every IMAP connection holds a few of these for as long as it is open
(issue #24: memory per idle connection). ``asyncio.Event`` allocates a
deque of waiters up front, about 760 octets each, per event per
connection; this one has two slots and makes a future only for a waiter.

Contract: ``asyncio.Event``'s for the methods here. :meth:`set` wakes every
current waiter; :meth:`wait` returns at once while the flag is set; a
cancelled waiter leaves the others waiting. Not thread-safe (one event loop).
"""

from __future__ import annotations

import asyncio


class WaitFlag:
    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] | None = None  # only while some wait

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        for fut in self._waiters or ():
            if not fut.done():
                fut.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> bool:
        """Returns True once the flag is set (at once if it is)."""
        if self._set:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._waiters
        if waiters is None:
            waiters = self._waiters = []
        waiters.append(fut)
        try:
            await fut
            return True
        finally:
            waiters.remove(fut)
            if not waiters and self._waiters is waiters:
                self._waiters = None
