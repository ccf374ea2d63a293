"""THREAD answers of big mailboxes, kept for the next identical command
(issue #24: THREAD of 100,000 messages costs about a second of CPU in the
content pool; a client repeats it as it reopens a folder).

An answer threaded from the stored keys (storage.sortkeys) is a function
of the account and mailbox (ids: a mailbox id is one shard's), its
UIDVALIDITY, the algorithm and the exact list of
threaded UIDs alone: an entry's stored keys never change, and a UID is
never given again within one UIDVALIDITY (RFC 3501 section 2.3.1.1). The
reported numbers (UIDs, or sequence numbers, which EXPUNGEs shift) are
part of the key too. So a hit needs no read of the mailbox: its list of
matching UIDs and their numbers, compared as tuples (linear, in C).
Per process, a few answers (:data:`SIZE`), least recently used first out.
"""

from __future__ import annotations

from collections import OrderedDict

SIZE = 4

_Key = tuple[int, int, int, str, bool]
_answers: OrderedDict[_Key, tuple[tuple[int, ...], tuple[int, ...], bytes]] = OrderedDict()


def get(key: _Key, uids: tuple[int, ...], numbers: tuple[int, ...]) -> bytes | None:
    """The answer kept for ``key`` (account id, mailbox id, UIDVALIDITY,
    algorithm, UID THREAD) if it was for exactly ``uids`` numbered ``numbers``."""
    have = _answers.get(key)
    if have is None or have[0] != uids or have[1] != numbers:
        return None
    _answers.move_to_end(key)
    return have[2]


def put(key: _Key, uids: tuple[int, ...], numbers: tuple[int, ...], answer: bytes) -> None:
    """Keeps ``answer``, threaded from stored keys, for :func:`get`."""
    _answers[key] = (uids, numbers, answer)
    _answers.move_to_end(key)
    while len(_answers) > SIZE:
        _answers.popitem(last=False)


def clear() -> None:
    """Forgets every answer (tests)."""
    _answers.clear()
