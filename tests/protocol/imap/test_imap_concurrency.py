"""Several sessions changing one mailbox at once: every session's sequence
numbers stay consistent, and once each has polled it sees exactly what
storage holds."""

from __future__ import annotations

import asyncio
import random
import re

from tests.protocol.imap.conftest import ImapClient, ImapEnv, message

_EXISTS = re.compile(rb"\* (\d+) EXISTS")
_EXPUNGE = re.compile(rb"\* (\d+) EXPUNGE")
_FETCH = re.compile(rb"\* (\d+) FETCH \(.*?UID (\d+)")
_VANISHED = re.compile(rb"\* VANISHED ([\d:,]+)")


def _count(seqset: bytes) -> int:
    total = 0
    for part in seqset.split(b","):
        a, _, b = part.partition(b":")
        total += abs(int(b or a) - int(a)) + 1
    return total


class Tracked:
    """A client that keeps EXISTS the way a real client must."""

    def __init__(self, client: ImapClient) -> None:
        self.c = client
        self.exists = 0

    async def run(self, text: str) -> list[bytes]:
        lines = await self.c.command(text)
        for line in lines:
            if m := _EXISTS.fullmatch(line):
                self.exists = int(m.group(1))
            elif m := _EXPUNGE.fullmatch(line):
                assert int(m.group(1)) <= self.exists, line
                self.exists -= 1
            elif m := _VANISHED.fullmatch(line):  # RFC 7162 section 3.2.10
                self.exists -= _count(m.group(1))
            elif m := _FETCH.match(line):
                assert int(m.group(1)) <= self.exists, (line, self.exists)
        assert lines[-1].split(b" ")[1] in (b"OK", b"NO"), lines
        return lines


async def _worker(env: ImapEnv, seed: int) -> Tracked:
    rng = random.Random(seed)
    t = Tracked(await env.client(login=True))
    if seed % 2:
        await t.run("ENABLE QRESYNC")
    await t.run("SELECT INBOX")
    for i in range(40):
        op = rng.randrange(7)
        n = t.exists
        if op == 0 and n:
            await t.run(f"STORE {rng.randint(1, n)} +FLAGS (\\Flagged)")
        elif op == 1 and n:
            await t.run(f"STORE {rng.randint(1, n)} -FLAGS (\\Flagged \\Seen)")
        elif op == 2:
            lines = await t.run("FETCH 1:* (UID FLAGS)" if n else "NOOP")
            # Unsolicited FLAGS updates (with UID under QRESYNC) may precede
            # the answer; within one response seq -> uid must be one mapping,
            # increasing (no EXPUNGE shifts numbers during FETCH).
            pairs = {(int(m.group(1)), int(m.group(2)))
                     for line in lines if (m := _FETCH.match(line))}
            mapping = dict(pairs)
            assert len(mapping) == len(pairs), sorted(pairs)
            ordered = [mapping[k] for k in sorted(mapping)]
            assert ordered == sorted(set(ordered)), sorted(pairs)
        elif op == 3:
            msg = message(f"w{seed}-{i}")
            await t.run(f"APPEND INBOX {{{len(msg)}+}}\r\n" + msg.decode())
        elif op == 4 and n:
            await t.run(f"STORE {rng.randint(1, n)} +FLAGS.SILENT (\\Deleted)")
            await t.run("EXPUNGE")
        elif op == 5 and n:
            await t.run(f"UID SEARCH {'UNSEEN' if rng.random() < 0.5 else 'FROM carol'}")
        else:
            await t.run("NOOP")
    return t


async def test_concurrent_sessions_stay_consistent(imap_env: ImapEnv) -> None:
    for i in range(20):
        await imap_env.deliver(message(f"start {i}"))
    workers = await asyncio.gather(*(_worker(imap_env, seed) for seed in range(6)))
    store = imap_env.storage.mail(imap_env.account)  # type: ignore[attr-defined]
    acct = imap_env.account.id  # type: ignore[attr-defined]
    box = await store.get_mailbox(acct, "INBOX")
    truth = await store.uids(acct, box.id)
    await asyncio.sleep(2.1)  # past the forced-poll interval: NOOP reads storage
    for t in workers:
        await t.run("NOOP")
        assert t.exists == len(truth)
        lines = await t.run("FETCH 1:* (UID FLAGS)") if truth else []
        got = [(int(m.group(1)), int(m.group(2))) for line in lines
               if (m := _FETCH.match(line))]
        assert got == [(i + 1, e.uid) for i, e in enumerate(truth)]
        for line, e in zip(lines, truth, strict=False):
            flags = set(re.search(rb"FLAGS \(([^)]*)\)", line).group(1).decode().split())  # type: ignore
            assert flags - {"\\Recent"} == set(e.flags), (line, e.flags)
        # SEARCH answers from the session's flag index, which every flag
        # change it heard about (its own, other sessions') must have kept.
        found = [line for line in await t.run("UID SEARCH UNSEEN") if line.startswith(b"* SEARCH")]
        unseen = [e.uid for e in truth if "\\Seen" not in e.flags]
        assert found == [b"* SEARCH" + b"".join(b" %d" % u for u in unseen)], (found, unseen)
        await t.c.close()
