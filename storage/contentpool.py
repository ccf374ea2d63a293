"""CPU-heavy content work (parsing large MIME, HTML to text, sanitizing) in
worker processes with a time limit, where it cannot hold the server's GIL.

Contract: :meth:`ContentPool.run` returns ``fn(*args)`` computed in a worker
process, or raises :class:`ContentTimeout` when the job ran past the time
limit (or its worker died): the caller then degrades (no index text, a
plain-text view) instead of failing. ``fn`` and its arguments must be
picklable, module-level and pure. A job past its limit is abandoned and the
workers are killed and replaced: a process pool cannot stop one job, and
killing is the only way to get the CPU back. Jobs that shared the killed
workers get :class:`ContentTimeout` as well.

With ``workers == 0`` (tests, tiny hosts) jobs run in a thread instead,
without a time limit. The process-wide pool is configured once at daemon
start (:func:`configure`); until then it runs inline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures.process import BrokenProcessPool
from typing import TypeVar

T = TypeVar("T")

DEFAULT_TIME_LIMIT = 5.0
# Fresh workers first start an interpreter and import the parser (about a
# second, more on a busy host): jobs waiting on that get this much longer,
# so a pool's start never degrades the first large message.
STARTUP_ALLOWANCE = 10.0


class ContentTimeout(Exception):
    """The job did not finish within the pool's time limit."""


class ContentPool:
    def __init__(
        self,
        workers: int,
        time_limit: float = DEFAULT_TIME_LIMIT,
        startup_allowance: float = STARTUP_ALLOWANCE,
    ) -> None:
        self.workers = workers
        self.time_limit = time_limit
        self.startup_allowance = startup_allowance
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self._starting_until = 0.0  # monotonic time the workers should be up by

    def _pool(self) -> concurrent.futures.ProcessPoolExecutor:
        if self._executor is None:  # started lazily: most processes never need it
            # "spawn": a forked child would inherit the event loop's threads and locks.
            self._executor = concurrent.futures.ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context("spawn")
            )
            self._starting_until = time.monotonic() + self.startup_allowance
        return self._executor

    async def run(self, fn: Callable[..., T], *args: object, time_limit: float | None = None) -> T:
        """``fn(*args)`` off this process; :class:`ContentTimeout` past the
        limit: the pool's, or ``time_limit`` for this job (work that grows
        with its input, such as signing a large message)."""
        if self.workers <= 0:
            return await asyncio.to_thread(fn, *args)
        own_limit = self.time_limit if time_limit is None else time_limit
        executor = self._pool()
        future = asyncio.get_running_loop().run_in_executor(executor, fn, *args)
        limit = own_limit + max(0.0, self._starting_until - time.monotonic())
        try:
            return await asyncio.wait_for(future, limit)
        except TimeoutError:
            self._kill(executor)
            raise ContentTimeout(f"content job over {own_limit:g}s") from None
        except BrokenProcessPool:
            self._kill(executor)  # killed under another job's timeout, or crashed
            raise ContentTimeout("content worker died") from None
        except asyncio.CancelledError:
            # Still queued when another job's timeout killed the pool, which
            # cancels what is queued (``_kill``): this job's future was
            # cancelled, not the caller's task, so it is a failed job.
            task = asyncio.current_task()
            if future.cancelled() and task is not None and not task.cancelling():
                raise ContentTimeout("content job dropped with its killed pool") from None
            raise

    def _kill(self, executor: concurrent.futures.ProcessPoolExecutor) -> None:
        if self._executor is executor:
            self._executor = None  # the next job starts fresh workers
        # Jobs still queued may have filled the pipe to the workers killed
        # here; the pool's feeder thread then blocks on it forever, and on
        # Python 3.11.2 (Debian 12's) the process could never exit: its
        # exit joins that thread. Nothing queued is wanted any more.
        call_queue = getattr(executor, "_call_queue", None)
        if call_queue is not None:
            call_queue.cancel_join_thread()
        # None once the pool has shut itself down (a broken pool).
        for process in list((getattr(executor, "_processes", None) or {}).values()):
            process.kill()
        executor.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        if self._executor is not None:
            self._kill(self._executor)


_pool = ContentPool(0)


def configure(
    workers: int,
    time_limit: float = DEFAULT_TIME_LIMIT,
    startup_allowance: float = STARTUP_ALLOWANCE,
) -> ContentPool:
    """Replace the process-wide pool (at daemon start, from settings)."""
    global _pool
    _pool.close()
    _pool = ContentPool(workers, time_limit, startup_allowance)
    return _pool


def content_pool() -> ContentPool:
    """The process-wide pool every content job goes through."""
    return _pool
