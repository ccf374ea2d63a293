"""A big mailbox (issue #20): SELECT reads the UIDs, not a row per message;
entries are read for the messages a command touches, and what other
sessions change in messages never read is still announced."""

from __future__ import annotations

import random
import re

import pytest

from tests.protocol.imap.conftest import ImapEnv, message

_FETCH_FLAGS = re.compile(rb"\* (\d+) FETCH \(UID (\d+) FLAGS \(([^)]*)\)")


def _uids(text: str) -> set[int]:
    """The UIDs of an RFC 3501 sequence set such as ``3,7:9``."""
    out: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition(":")
        a, b = int(first), int(last or first)
        out.update(range(min(a, b), max(a, b) + 1))  # RFC 3501 section 9: either order
    return out


class _EntryCount:
    """Counts the entry rows storage turns into MessageEntry objects."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from storage.sql import mailstore

        self.rows = 0
        real = mailstore._entry

        def counted(row):  # type: ignore[no-untyped-def]
            self.rows += 1
            return real(row)

        monkeypatch.setattr(mailstore, "_entry", counted)


async def _fill(env: ImapEnv, rng: random.Random) -> list[tuple[str, ...]]:
    """A random number of messages with random flags; their flags in UID order."""
    made = []
    for i in range(rng.randint(120, 260)):
        flags = tuple(f for f in ("\\Seen", "\\Flagged", "$Work") if rng.random() < 0.5)
        await env.deliver(message(f"m{i}", "x" * rng.randint(1, 900) + "\r\n"), flags=flags)
        made.append(flags)
    return made


async def test_select_reads_no_message_rows(
    imap_env: ImapEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random()
    made = await _fill(imap_env, rng)
    count = _EntryCount(monkeypatch)
    a = await imap_env.client(login=True)
    lines = await a.ok("SELECT INBOX")
    assert count.rows == 0, count.rows
    assert f"* {len(made)} EXISTS".encode() in lines
    unseen = [i + 1 for i, flags in enumerate(made) if "\\Seen" not in flags]
    if unseen:  # RFC 3501 section 6.3.1: the first unseen message's number
        assert f"* OK [UNSEEN {unseen[0]}] First unseen".encode() in lines, lines
    assert f"* OK [UIDNEXT {len(made) + 1}] Predicted next UID".encode() in lines
    flags_line = next(x for x in lines if x.startswith(b"* FLAGS"))
    assert (b"$Work" in flags_line) == any("$Work" in f for f in made)
    # A FETCH reads the entries it names, and they are right.
    lo = rng.randint(1, len(made) - 10)
    got = await a.ok(f"FETCH {lo}:{lo + 9} (UID FLAGS)")
    assert count.rows == 10, count.rows
    for line in got[:-1]:
        m = _FETCH_FLAGS.match(line)
        assert m is not None, line
        seq, flags = int(m.group(1)), set(m.group(3).decode().split()) - {"\\Recent"}
        assert flags == set(made[seq - 1]), (line, made[seq - 1])
    await a.close()


async def test_changes_to_messages_never_read_are_announced(imap_env: ImapEnv) -> None:
    """Session A reads nothing after SELECT; B changes the flags of some
    messages and expunges others. A's NOOP tells of each (FETCH FLAGS with
    the right sequence numbers, EXPUNGE), and A then agrees with storage."""
    rng = random.Random()
    made = await _fill(imap_env, rng)
    a = await imap_env.client(login=True)
    b = await imap_env.client(login=True)
    await a.ok("ENABLE QRESYNC")  # flag updates then carry the UID (RFC 7162 section 3.2.4)
    await a.ok("SELECT INBOX")
    await b.ok("SELECT INBOX")
    flagged = sorted(rng.sample(range(1, len(made) + 1), rng.randint(1, 20)))
    await b.ok(f"UID STORE {','.join(map(str, flagged))} +FLAGS.SILENT (\\Answered)")
    doomed = sorted(rng.sample([u for u in range(1, len(made) + 1) if u not in flagged], 5))
    await b.ok(f"UID STORE {','.join(map(str, doomed))} +FLAGS.SILENT (\\Deleted)")
    await b.ok("EXPUNGE")
    told = await a.ok("NOOP")
    answered = {int(m.group(2)) for x in told if (m := _FETCH_FLAGS.match(x))
                and b"\\Answered" in m.group(3)}
    assert answered == set(flagged), told
    # RFC 7162 section 3.2.10: the UIDs may come as ranges and over several lines.
    vanished = {u for x in told if x.startswith(b"* VANISHED ")
                for u in _uids(x.removeprefix(b"* VANISHED ").decode())}
    assert vanished == set(doomed), told
    lines = await a.ok("UID FETCH 1:* (FLAGS)")
    kept = [u for u in range(1, len(made) + 1) if u not in doomed]
    got = [(int(m.group(1)), int(m.group(2))) for x in lines if (m := _FETCH_FLAGS.match(x))]
    assert got == [(i + 1, u) for i, u in enumerate(kept)]
    await a.close()
    await b.close()
