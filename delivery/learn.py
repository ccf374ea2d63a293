"""Junk that learns: a message a user moves into Junk is spam, one moved out
of Junk (to anything but Trash) is ham; rspamd's controller is taught so
(``/learnspam``, ``/learnham``, delivery/checks_rspamd.py) when
``[antispam] controller_url`` is set, else the account's own Bayes counts
of the built-in engine (delivery/spamengine.py, ``MailStore.learn_spam``)
while that engine is on. The built-in counts know each message learned:
learned again as the same class it counts once, moved back (out of Junk
after into it) it is relearned, its first lesson taken back.

The seam: every place a user files mail (IMAP MOVE and COPY, the HTTP
API's move) calls :func:`learn_moved` after the move is committed, with
the source and destination mailboxes and the (source UID, destination
UID) pairs. It never awaits and never raises: it only puts one job per
message on the running loop's bounded queue (:data:`QUEUE_MAX`), and a
background task reads each message from the destination mailbox and
posts it. So learning never delays the reply, a full queue drops the
surplus (logged), and a failure (rspamd down, the message moved on
before it was read) is logged, never shown to the client.

Which mailbox is Junk or Trash: its RFC 6154 special-use attribute
(``\\Junk``, ``\\Trash``), else its name (``Junk``, ``Trash``, any case).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from conf.settings import Settings
from delivery import spamengine
from delivery.checks_rspamd import RspamdError, client_for
from storage.api import Storage
from storage.errors import StorageError
from storage.model import Account, Mailbox, UidSet

log = logging.getLogger("delivery.learn")

QUEUE_MAX = 1000  # messages waiting to be learned, per process


def _is(box: Mailbox, use: str) -> bool:
    return box.special_use == f"\\{use}" or box.name.casefold() == use.casefold()


def lesson(source: Mailbox, dest: Mailbox) -> bool | None:
    """What moving (or copying) from ``source`` to ``dest`` teaches: True
    spam (into Junk), False ham (out of Junk, not into Trash: deleting
    spam says nothing), None nothing."""
    into, out_of = _is(dest, "Junk"), _is(source, "Junk")
    if into and not out_of:
        return True
    if out_of and not into and not _is(dest, "Trash"):
        return False
    return None


@dataclass(frozen=True)
class Job:
    """One message to learn, where it was filed."""

    settings: Settings
    storage: Storage
    account: Account
    mailbox_id: int
    uid: int
    spam: bool


class Learner:
    """The running loop's queue of :class:`Job` and its one worker task
    (started by :meth:`submit`, gone once the queue is empty)."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Job] = asyncio.Queue(QUEUE_MAX)
        self.dropped = 0
        self.learned = 0
        self.failed = 0
        self._task: asyncio.Task[None] | None = None

    def submit(self, job: Job) -> bool:
        """Queues ``job``; False (logged) when the queue is full."""
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("learn queue full: %s's message not learned", job.account.address)
            return False
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="learn")
        return True

    async def idle(self) -> None:
        """Returns once every queued job is done (for tests and shutdown)."""
        await self.queue.join()

    async def _run(self) -> None:
        # Runs while there is work: an idle process keeps no task pending.
        while True:
            try:
                job = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                await self._learn(job)
            except Exception:  # a bug: logged, the next job goes on
                self.failed += 1
                log.exception("learning a message of %s failed", job.account.address)
            finally:
                self.queue.task_done()

    async def _learn(self, job: Job) -> None:
        kind = "spam" if job.spam else "ham"
        try:
            mail = job.storage.mail(job.account)
            entries = await mail.entries(job.account.id, job.mailbox_id, UidSet.of([job.uid]))
            if not entries:
                log.info("message moved on before it was learned as %s", kind)
                return
            blobs = job.storage.blobs_for(job.account)
            key = entries[0].blob_key
            if job.settings.antispam.controller_url:
                await client_for(job.settings).learn(await blobs.get(key), job.spam)
            else:  # the built-in engine: its read of the message is bounded
                head = await blobs.get_range(key, 0, min(entries[0].size, spamengine.READ_MAX))
                tokens = await spamengine.message_tokens(head)
                if not await mail.learn_spam(job.account.id, key, tokens, job.spam):
                    log.info("a message of %s already learned as %s", job.account.address, kind)
                    return
                spamengine.forget_untrained(job.storage, job.account.id)
        except (RspamdError, StorageError, OSError) as exc:
            self.failed += 1
            log.warning("a message of %s not learned as %s: %s", job.account.address, kind, exc)
            return
        self.learned += 1
        log.info("learned a message of %s as %s", job.account.address, kind)


_LEARNERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Learner] = (
    weakref.WeakKeyDictionary()
)


def learner() -> Learner:
    """The running loop's learner."""
    loop = asyncio.get_running_loop()
    found = _LEARNERS.get(loop)
    if found is None:
        found = _LEARNERS[loop] = Learner()
    return found


def learn_moved(
    settings: Settings,
    storage: Storage,
    account: Account,
    source: Mailbox,
    dest: Mailbox,
    pairs: Sequence[tuple[int, int]],
) -> None:
    """Call after a committed move or copy of ``pairs`` (source UID,
    destination UID) from ``source`` to ``dest``: queues what it teaches
    (:func:`lesson`) when ``[antispam] controller_url`` is set or the
    built-in engine is on. Never awaits, never raises."""
    spam_settings = settings.antispam
    if not (spam_settings.controller_url or spam_settings.builtin_on) or not pairs:
        return
    spam = lesson(source, dest)
    if spam is None:
        return
    with contextlib.suppress(RuntimeError):  # no running loop: nothing to learn with
        queue = learner()
        for done, (_, uid) in enumerate(pairs):
            if not queue.submit(Job(settings, storage, account, dest.id, uid, spam)):
                queue.dropped += len(pairs) - done - 1  # the rest: not queued either
                break


__all__ = ["QUEUE_MAX", "Job", "Learner", "learn_moved", "learner", "lesson"]
