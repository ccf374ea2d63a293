"""ESORT (RFC 5267 section 3), SEARCHRES (RFC 5182) and SORT/THREAD syntax
errors as scripted sessions: client lines and the replies the RFCs require."""

from __future__ import annotations

import random

from tests.protocol.imap.conftest import ImapEnv, message


async def _mailbox(env: ImapEnv, sizes: list[int]) -> None:
    """One message per size (body padding), subjects "m1".."mN"."""
    for i, size in enumerate(sizes, 1):
        await env.deliver(message(f"m{i}", "x" * size + "\r\n"))


def _untagged(lines: list[bytes], word: bytes) -> list[bytes]:
    return [ln for ln in lines if ln.startswith(b"* ") and word in ln]


async def test_esort_min_max_count_all(imap_env: ImapEnv) -> None:
    rng = random.Random()
    sizes = rng.sample(range(10, 2000), rng.randint(5, 12))
    await _mailbox(imap_env, sizes)
    by_size = sorted(range(1, len(sizes) + 1), key=lambda i: sizes[i - 1])
    c = await imap_env.client(login=True)
    caps = (await c.ok("CAPABILITY"))[0]
    assert b" ESORT" in caps and b" SEARCHRES" in caps and b" SORT " in caps
    await c.ok("SELECT INBOX")
    lines = await c.command("SORT RETURN (MIN MAX COUNT) (SIZE) UTF-8 ALL", "e1")
    assert lines[0] == (
        b'* ESEARCH (TAG "e1") MIN %d MAX %d COUNT %d' % (by_size[0], by_size[-1], len(sizes))
    )
    # ALL keeps the sort order: the reverse order of 1..n is "n,n-1,...".
    n = len(sizes)
    lines = await c.ok("SORT RETURN (ALL) (REVERSE ARRIVAL) UTF-8 ALL")
    assert lines[0] == b'* ESEARCH (TAG "t4") ALL ' + ",".join(
        str(i) for i in range(n, 0, -1)).encode()
    lines = await c.command("UID SORT RETURN (COUNT) (SIZE) UTF-8 LARGER 100000", "e3")
    assert lines[0] == b'* ESEARCH (TAG "e3") UID COUNT 0'
    lines = await c.ok("SORT (SIZE) US-ASCII ALL")  # plain SORT: a SORT response
    assert lines[0] == b"* SORT " + b" ".join(b"%d" % i for i in by_size)
    await c.close()


# RFC 5182 section 2: (command, expected untagged lines (prefix match), tagged status).
SEARCHRES_SCRIPT: list[tuple[str, list[bytes], bytes]] = [
    ("SEARCH RETURN (SAVE) SUBJECT m2", [], b"OK"),  # SAVE alone: no ESEARCH, no SEARCH
    ("FETCH $ (UID)", [b"* 2 FETCH (UID 2)"], b"OK"),
    ("SEARCH RETURN (SAVE) OR SUBJECT m3 SUBJECT m5", [], b"OK"),
    ("STORE $ +FLAGS.SILENT (\\Flagged)", [], b"OK"),
    ("UID SEARCH FLAGGED", [b"* SEARCH 3 5"], b"OK"),
    ("UID SEARCH UID $", [b"* SEARCH 3 5"], b"OK"),
    ("SEARCH $ SUBJECT m5", [b"* SEARCH 5"], b"OK"),
    ("UID FETCH $ (FLAGS)", [b"* 3 FETCH (UID 3 FLAGS (\\Flagged \\Recent))",
                             b"* 5 FETCH (UID 5 FLAGS (\\Flagged \\Recent))"], b"OK"),
    # MIN and MAX beside SAVE: only those are saved, and reported.
    ("SEARCH RETURN (SAVE MIN MAX) ALL", [b'* ESEARCH (TAG "t9") MIN 1 MAX 6'], b"OK"),
    ("FETCH $ (UID)", [b"* 1 FETCH (UID 1)", b"* 6 FETCH (UID 6)"], b"OK"),
    # COUNT beside SAVE saves every match.
    ("SEARCH RETURN (SAVE COUNT) SUBJECT m", [b'* ESEARCH (TAG "t11") COUNT 6'], b"OK"),
    ("SEARCH $", [b"* SEARCH 1 2 3 4 5 6"], b"OK"),
    # An expunged message leaves "$".
    ("SEARCH RETURN (SAVE) SUBJECT m1", [], b"OK"),
    ("STORE 1 +FLAGS.SILENT (\\Deleted)", [], b"OK"),
    ("EXPUNGE", [b"* 1 EXPUNGE"], b"OK"),
    ("FETCH $ (UID)", [], b"OK"),
    # A failed SEARCH ... SAVE empties "$" (section 2.1).
    ("SEARCH RETURN (SAVE) SUBJECT m2", [], b"OK"),
    ("SEARCH RETURN (SAVE) CHARSET KOI8-R SUBJECT m3", [], b"NO"),
    ("UID SEARCH UID $", [b"* SEARCH"], b"OK"),
    # "$" is alone or not at all.
    ("FETCH 1,$ (UID)", [], b"BAD"),
    ("SEARCH RETURN (SAVE) SUBJECT m4", [], b"OK"),
    # SELECT starts with an empty "$" (section 2.1).
    ("SELECT INBOX", [], b"OK"),
    ("SEARCH $", [b"* SEARCH"], b"OK"),
    ("SORT (FOO) UTF-8 ALL", [], b"BAD"),
    ("SORT () UTF-8 ALL", [], b"BAD"),
    ("SORT (SIZE) KOI8-R ALL", [], b"NO"),
    ("SORT RETURN (SAVE) (SIZE) UTF-8 ALL", [], b"BAD"),
    ("THREAD FANCY UTF-8 ALL", [], b"BAD"),
    ("THREAD REFERENCES UTF-8", [], b"BAD"),
    ("THREAD REFERENCES UTF-8 SUBJECT nothing-matches", [b"* THREAD"], b"OK"),
    ("UID SORT (REVERSE SUBJECT) UTF-8 SUBJECT m", [b"* SORT 6 5 4 3 2"], b"OK"),
]


async def test_searchres_script(imap_env: ImapEnv) -> None:
    await _mailbox(imap_env, [10, 20, 30, 40, 50, 60])
    c = await imap_env.client(login=True)
    await c.ok("SELECT INBOX")  # t2
    c.n = 0
    for text, want, status in SEARCHRES_SCRIPT:
        lines = await c.command(text)
        tagged = lines[-1].split(b" ")
        assert tagged[1] == status, (text, lines)
        got = [ln for ln in lines[:-1] if not ln.startswith((b"* FLAGS", b"* OK [PERM",
                                                             b"* OK [UID", b"* OK [HIGH",
                                                             b"* OK [UNSEEN"))]
        if text.startswith("SELECT"):
            continue
        assert got == want, (text, lines)
    await c.close()


async def test_sort_needs_a_selected_mailbox(imap_env: ImapEnv) -> None:
    c = await imap_env.client(login=True)
    for cmd in ("SORT (SIZE) UTF-8 ALL", "THREAD REFERENCES UTF-8 ALL"):
        lines = await c.command(cmd)
        assert lines[-1].split(b" ")[1] == b"BAD", lines
    await c.close()
