"""CONTEXT=SEARCH and CONTEXT=SORT (RFC 5267 section 4, PARTIAL ranges of
RFC 9394 section 3.1) as scripted sessions: client lines and the replies the
RFCs require, with a second session whose APPEND, STORE and EXPUNGE the
first hears of as ADDTO / REMOVEFROM."""

from __future__ import annotations

import asyncio
import random

import pytest

from tests.protocol.imap.conftest import ImapClient, ImapEnv, message

# Body sizes of m1..m6: SIZE order is m2 m4 m6 m3 m1 m5 (UIDs 2,4,6,3,1,5).
SIZES = [500, 100, 400, 200, 600, 300]


def _size_message(subject: str, body: int) -> bytes:
    return message(subject, "x" * body + "\r\n", Message_ID=f"<{subject}@example.net>")


async def _fill(env: ImapEnv) -> None:
    for i, size in enumerate(SIZES, 1):
        await env.deliver(_size_message(f"m{i}", size))


async def _two_sessions(env: ImapEnv) -> tuple[ImapClient, ImapClient]:
    """m1..m6 delivered, and two sessions of the user with INBOX selected."""
    await _fill(env)
    a = await env.client(login=True)
    b = await env.client(login=True)
    await a.ok("SELECT INBOX")
    await b.ok("SELECT INBOX")
    return a, b


def _kept(lines: list[bytes]) -> list[bytes]:
    """The responses a script checks: ESEARCH, NOUPDATE, EXISTS, EXPUNGE."""
    return [
        ln
        for ln in lines
        if ln.startswith(b"* ESEARCH")
        or b"NOUPDATE" in ln
        or ln.endswith((b" EXISTS", b" EXPUNGE"))
    ]


async def _hear(a: ImapClient, want: list[bytes]) -> list[bytes]:
    """NOOP until ``want`` many checked responses came (the other session's
    change reaches this one through the event bus, not instantly), and a
    little longer to catch any that should not come."""
    got: list[bytes] = []
    for _ in range(40):
        got += _kept((await a.command("NOOP", "n"))[:-1])
        if len(got) >= len(want):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.1)
    got += _kept((await a.command("NOOP", "n"))[:-1])
    return got


# (who, tag, command, expected ESEARCH/NOUPDATE/EXISTS/EXPUNGE lines, status).
# "A" is the session with the contexts; "B" another session of the same
# user, after whose command A runs NOOPs and must hear ``expected``.
SCRIPT: list[tuple[str, str, str, list[bytes], bytes]] = [
    # RFC 5267 section 4.2: CONTEXT is a hint; the answer is as without it.
    ("A", "A01", "SEARCH RETURN (CONTEXT COUNT) ALL", [b'* ESEARCH (TAG "A01") COUNT 6'], b"OK"),
    # Section 4.4: PARTIAL 1:3 is the first three results, a range past the
    # end gives what there is, one wholly past it gives NIL; 3:1 is 1:3.
    (
        "A",
        "A02",
        "UID SEARCH RETURN (PARTIAL 1:3) ALL",
        [b'* ESEARCH (TAG "A02") UID PARTIAL (1:3 1:3)'],
        b"OK",
    ),
    (
        "A",
        "A03",
        "UID SEARCH RETURN (PARTIAL 5:10) ALL",
        [b'* ESEARCH (TAG "A03") UID PARTIAL (5:10 5:6)'],
        b"OK",
    ),
    (
        "A",
        "A04",
        "UID SEARCH RETURN (PARTIAL 7:9 COUNT) ALL",
        [b'* ESEARCH (TAG "A04") UID PARTIAL (7:9 NIL) COUNT 6'],
        b"OK",
    ),
    (
        "A",
        "A05",
        "SEARCH RETURN (MIN MAX PARTIAL 3:1) ALL",
        [b'* ESEARCH (TAG "A05") MIN 1 MAX 6 PARTIAL (3:1 1:3)'],
        b"OK",
    ),
    # RFC 9394 section 3.1: -1 is the last result, -1:-2 the last two.
    (
        "A",
        "A06",
        "UID SEARCH RETURN (PARTIAL -1:-2) ALL",
        [b'* ESEARCH (TAG "A06") UID PARTIAL (-1:-2 5:6)'],
        b"OK",
    ),
    (
        "A",
        "A07",
        "SEARCH RETURN (PARTIAL -7:-100) ALL",
        [b'* ESEARCH (TAG "A07") PARTIAL (-7:-100 NIL)'],
        b"OK",
    ),
    # CONTEXT=SORT: PARTIAL in sort order (RFC 5267 section 4.4).
    (
        "A",
        "A08",
        "UID SORT RETURN (PARTIAL 2:4) (SIZE) UTF-8 ALL",
        [b'* ESEARCH (TAG "A08") UID PARTIAL (2:4 4,6,3)'],
        b"OK",
    ),
    (
        "A",
        "A09",
        "SORT RETURN (PARTIAL -2:-1 COUNT) (SIZE) UTF-8 ALL",
        [b'* ESEARCH (TAG "A09") PARTIAL (-2:-1 1,5) COUNT 6'],
        b"OK",
    ),
    # One PARTIAL or one ALL at most (section 4.4); ranges are nz-number.
    ("A", "A10", "SEARCH RETURN (PARTIAL 1:5 ALL) ALL", [], b"BAD"),
    ("A", "A11", "SEARCH RETURN (PARTIAL 1:2 PARTIAL 3:4) ALL", [], b"BAD"),
    ("A", "A12", "SEARCH RETURN (PARTIAL 0:5) ALL", [], b"BAD"),
    ("A", "A13", "SEARCH RETURN (PARTIAL 1:*) ALL", [], b"BAD"),
    ("A", "A14", "SEARCH RETURN (PARTIAL -1:5) ALL", [], b"BAD"),
    ("A", "A15", "SORT RETURN (PARTIAL) (SIZE) UTF-8 ALL", [], b"BAD"),
    ("A", "A16", "SEARCH RETURN (UPDATE SOON) ALL", [], b"BAD"),
    # Section 4.3: UPDATE contexts. B01 answers nothing but the correlator.
    ("A", "B01", "UID SEARCH RETURN (UPDATE) FLAGGED", [b'* ESEARCH (TAG "B01") UID'], b"OK"),
    (
        "A",
        "B02",
        "UID SORT RETURN (UPDATE ALL) (SIZE) UTF-8 UNSEEN",
        [b'* ESEARCH (TAG "B02") UID ALL 2,4,6,3,1,5'],
        b"OK",
    ),
    (
        "A",
        "B03",
        "SEARCH RETURN (UPDATE COUNT) UNDELETED",
        [b'* ESEARCH (TAG "B03") COUNT 6'],
        b"OK",
    ),
    (
        "A",
        "B04",
        "SORT RETURN (UPDATE ALL) (REVERSE ARRIVAL) UTF-8 ALL",
        [b'* ESEARCH (TAG "B04") ALL 6,5,4,3,2,1'],
        b"OK",
    ),
    # Section 4.3: UPDATE under the tag of a live context is BAD.
    ("A", "B01", "UID SEARCH RETURN (UPDATE) ALL", [], b"BAD"),
    # Section 4.3.1: RECENT cannot be kept current here: NOUPDATE, still answered.
    (
        "A",
        "B05",
        "SEARCH RETURN (UPDATE COUNT) RECENT",
        [
            b'* NO [NOUPDATE "B05"] Cannot keep this search up to date',
            b'* ESEARCH (TAG "B05") COUNT 6',
        ],
        b"OK",
    ),
    # A UID range n:* stays open for new mail (RFC 3501 section 9 "*").
    (
        "A",
        "B06",
        "UID SEARCH RETURN (UPDATE ALL) UID 6:*",
        [b'* ESEARCH (TAG "B06") UID ALL 6'],
        b"OK",
    ),
    # A flag change elsewhere: ADDTO to FLAGGED, REMOVEFROM UNSEEN at the
    # message's position (4th by size); section 4.3.3 / 4.3.4.
    (
        "B",
        "",
        "UID STORE 3 +FLAGS (\\Flagged \\Seen)",
        [b'* ESEARCH (TAG "B01") UID ADDTO (0 3)', b'* ESEARCH (TAG "B02") UID REMOVEFROM (4 3)'],
        b"OK",
    ),
    # New mail (body 250: between m4 and m6 by size): EXISTS first, then ADDTO.
    (
        "B",
        "",
        "APPEND m7 250",
        [
            b"* 7 EXISTS",
            b'* ESEARCH (TAG "B02") UID ADDTO (3 7)',
            b'* ESEARCH (TAG "B03") ADDTO (0 7)',
            b'* ESEARCH (TAG "B04") ADDTO (1 7)',
            b'* ESEARCH (TAG "B06") UID ADDTO (0 7)',
        ],
        b"OK",
    ),
    # \Deleted leaves UNDELETED (a sequence-number context).
    ("B", "", "STORE 5 +FLAGS (\\Deleted)", [b'* ESEARCH (TAG "B03") REMOVEFROM (0 5)'], b"OK"),
    # The expunge: REMOVEFROM while the numbers are valid, before EXPUNGE.
    (
        "B",
        "",
        "EXPUNGE",
        [
            b'* ESEARCH (TAG "B02") UID REMOVEFROM (6 5)',
            b'* ESEARCH (TAG "B04") REMOVEFROM (3 5)',
            b"* 5 EXPUNGE",
        ],
        b"OK",
    ),
    # Our own STORE changes a context too (message 6, now sequence 5).
    (
        "A",
        "C01",
        "UID STORE 6 +FLAGS.SILENT (\\Flagged)",
        [b'* ESEARCH (TAG "B01") UID ADDTO (0 6)'],
        b"OK",
    ),
    # Section 4.3.5: CANCELUPDATE ends B02; B01 keeps going.
    ("A", "C02", 'CANCELUPDATE "B02"', [], b"OK"),
    (
        "B",
        "",
        "UID STORE 7 +FLAGS (\\Seen \\Flagged)",
        [b'* ESEARCH (TAG "B01") UID ADDTO (0 7)'],
        b"OK",
    ),
    ("A", "C03", 'CANCELUPDATE "B02"', [], b"BAD"),
    ("A", "C04", "CANCELUPDATE B01", [], b"BAD"),
    ("A", "C05", 'CANCELUPDATE "B01" "nope"', [], b"BAD"),
    # Section 4.3.1: past the limit (five: B01 B03 B04 B06 D01), NOUPDATE,
    # the other options still answered.
    ("A", "D01", "UID SEARCH RETURN (UPDATE) SEEN", [b'* ESEARCH (TAG "D01") UID'], b"OK"),
    (
        "A",
        "D03",
        "UID SEARCH RETURN (UPDATE COUNT MIN) ALL",
        [b'* NO [NOUPDATE "D03"] Too many contexts', b'* ESEARCH (TAG "D03") UID MIN 1 COUNT 6'],
        b"OK",
    ),
    ("A", "D05", 'CANCELUPDATE "D01" "B06"', [], b"OK"),
    (
        "A",
        "D06",
        "UID SEARCH RETURN (UPDATE COUNT) ALL",
        [b'* ESEARCH (TAG "D06") UID COUNT 6'],
        b"OK",
    ),
    # Section 4.3: updates cease when the mailbox is no longer selected.
    ("A", "E01", "SELECT INBOX", [], b"OK"),
    ("A", "E02", 'CANCELUPDATE "B01"', [], b"BAD"),
    ("B", "", "UID STORE 4 +FLAGS (\\Flagged)", [], b"OK"),
]


async def test_contexts_script(imap_env: ImapEnv) -> None:
    a, b = await _two_sessions(imap_env)
    caps = (await a.ok("CAPABILITY"))[0]
    assert b" CONTEXT=SEARCH" in caps and b" CONTEXT=SORT" in caps, caps
    for who, tag, text, want, status in SCRIPT:
        if who == "A":
            lines = await a.command(text, tag)
            assert lines[-1].split(b" ")[1] == status, (text, lines)
            got = [] if text.startswith("SELECT") else _kept(lines[:-1])
            assert got == want, (text, lines)
            continue
        if text.startswith("APPEND"):
            _, subject, size = text.split()
            raw = _size_message(subject, int(size))
            lines = await b.command(f"APPEND INBOX {{{len(raw)}+}}\r\n".encode() + raw)
        else:
            lines = await b.command(text)
        assert lines[-1].split(b" ")[1] == status, (text, lines)
        got = await _hear(a, want)
        assert got == want, (text, got)
    await a.close()
    await b.close()


class Mirror:
    """What a client keeps of one context by RFC 5267's rules: ADDTO and
    REMOVEFROM applied in order (section 4.3.2), positions 1-based, 0 in
    mailbox order (sections 4.3.3, 4.3.4); sequence numbers renumbered on
    EXPUNGE like any other."""

    def __init__(self, tag: str, results: list[int], uid: bool) -> None:
        self.tag = tag.encode()
        self.results = results
        self.uid = uid

    def apply(self, line: bytes) -> None:
        if line.endswith(b" EXPUNGE") and not self.uid:
            n = int(line.split()[1])
            assert n not in self.results, (line, self.results)  # REMOVEFROM came first
            self.results = [r - 1 if r > n else r for r in self.results]
            return
        if not line.startswith(b'* ESEARCH (TAG "' + self.tag + b'")'):
            return
        body = line.split(b") ", 1)[1].removeprefix(b"UID ")
        while body:
            word, rest = body.split(b" (", 1)
            inner, body = rest.split(b")", 1)
            body = body.strip()
            items = inner.split()
            for pos_b, set_b in zip(items[::2], items[1::2], strict=True):
                pos, nums = int(pos_b), _expand(set_b)
                if word == b"ADDTO":
                    if pos == 0:
                        self.results = sorted(self.results + nums)
                    else:
                        self.results[pos - 1 : pos - 1] = nums
                else:
                    assert word == b"REMOVEFROM", line
                    if pos == 0:
                        self.results = [r for r in self.results if r not in nums]
                    else:
                        assert self.results[pos - 1 : pos - 1 + len(nums)] == nums, line
                        del self.results[pos - 1 : pos - 1 + len(nums)]


def _expand(seqset: bytes) -> list[int]:
    out: list[int] = []
    for part in seqset.split(b","):
        a, _, b = part.partition(b":")
        lo, hi = int(a), int(b or a)
        out += range(lo, hi + 1) if lo <= hi else range(lo, hi - 1, -1)
    return out


def _all(lines: list[bytes], tag: str) -> list[int]:
    for ln in lines:
        if ln.startswith(b'* ESEARCH (TAG "%s")' % tag.encode()):
            return _expand(ln.split(b" ALL ")[1]) if b" ALL " in ln else []
    raise AssertionError(lines)


# Contexts the randomized test keeps: tag, command (with the tag's RETURN).
CONTEXTS = [
    ("S1", "UID SORT RETURN (UPDATE ALL) (REVERSE DATE SUBJECT) UTF-8 UNSEEN"),
    ("S2", "SORT RETURN (UPDATE ALL) (SIZE REVERSE SUBJECT) UTF-8 NOT FLAGGED"),
    ("S3", "UID SEARCH RETURN (UPDATE ALL) OR FLAGGED SUBJECT b"),
    ("S4", "SEARCH RETURN (UPDATE ALL) UNDELETED LARGER 300"),
    ("S5", "UID SORT RETURN (UPDATE ALL) (ARRIVAL) UTF-8 UID 4:* NOT DELETED"),
]


async def test_random_changes_keep_contexts_equal_to_a_new_search(imap_env: ImapEnv) -> None:
    """B appends (random sizes, subjects, dates with ties), flags and
    expunges at random; A's contexts, kept by applying what it heard, equal
    the same searches run afresh, after every step."""
    rng = random.Random()
    days = ["1 Feb 2020", "2 Feb 2020", "3 Feb 2020"]

    def mail() -> bytes:
        subject = rng.choice(["a", "b", "c", "Re: b"])
        return message(
            subject,
            "".join(rng.choice("xyz \r\n") for _ in range(rng.randint(1, 800))) + "\r\n",
            Date=f"Sat, {rng.choice(days)} 10:00:00 +0000",
            Message_ID=f"<{rng.random()}@example.net>",
        )

    for _ in range(rng.randint(8, 15)):
        await imap_env.deliver(mail())
    a = await imap_env.client(login=True)
    b = await imap_env.client(login=True)
    await a.ok("SELECT INBOX")
    await b.ok("SELECT INBOX")
    mirrors = [
        Mirror(tag, _all(await a.command(cmd, tag), tag), cmd.startswith("UID"))
        for tag, cmd in CONTEXTS
    ]
    exists = len(_all(await b.command("SEARCH RETURN (ALL) ALL", "cnt"), "cnt"))

    async def run_b(text: str | bytes) -> None:
        nonlocal exists
        for ln in await b.ok(text):
            if ln.endswith(b" EXISTS"):
                exists = int(ln.split()[1])
            elif ln.endswith(b" EXPUNGE"):
                exists -= 1

    def heard(lines: list[bytes]) -> None:
        for ln in lines:
            for m in mirrors:
                m.apply(ln)

    for step in range(25):
        op = rng.random()
        if op < 0.3 or exists < 3:
            raw = mail()
            await run_b(f"APPEND INBOX {{{len(raw)}+}}\r\n".encode() + raw)
        elif op < 0.75:
            sign = rng.choice("+-")
            flags = " ".join(rng.sample(["\\Seen", "\\Flagged", "\\Deleted"], rng.randint(1, 2)))
            seqs = ",".join(str(rng.randint(1, exists)) for _ in range(rng.randint(1, 3)))
            await run_b(f"STORE {seqs} {sign}FLAGS ({flags})")
        else:
            await run_b(f"STORE {rng.randint(1, exists)} +FLAGS (\\Deleted)")
            await run_b("EXPUNGE")
        # The bus brings B's change to A: NOOP until two in a row are quiet.
        quiet = 0
        for i in range(40):
            lines = (await a.command("NOOP", f"n{step}.{i}"))[:-1]
            heard(lines)
            quiet = 0 if _kept(lines) else quiet + 1
            if quiet >= 2 and i >= 2:
                break
            await asyncio.sleep(0.03)
        for m, (tag, cmd) in zip(mirrors, CONTEXTS, strict=True):
            ftag = f"f{step}{tag}"
            lines = await a.command(cmd.replace("UPDATE ALL", "ALL"), ftag)
            heard(lines)
            assert m.results == _all(lines, ftag), (step, tag, lines)
    await a.close()
    await b.close()


async def test_sort_context_past_its_size_ends_with_noupdate(
    imap_env: ImapEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RFC 5267 section 4.3.1: a SORT context too big to keep is refused
    when asked for, and one that grows past twice the bound later is ended
    with an untagged NO [NOUPDATE] (no more updates, its tag is free)."""
    from imapd.imap import contexts

    monkeypatch.setattr(contexts, "MAX_SORT_CONTEXT", 4)
    a, b = await _two_sessions(imap_env)
    lines = await a.command("UID SORT RETURN (UPDATE COUNT) (SIZE) UTF-8 ALL", "X1")
    assert lines[:2] == [
        b'* NO [NOUPDATE "X1"] Too many results to keep sorted',
        b'* ESEARCH (TAG "X1") UID COUNT 6',
    ], lines
    lines = await a.command("UID SORT RETURN (UPDATE ALL) (SIZE) UTF-8 UID 1:3", "X2")
    assert lines[0] == b'* ESEARCH (TAG "X2") UID ALL 2:3,1', lines
    await b.ok("UID STORE 1:6 +FLAGS (\\Seen)")  # flags alone: X2 unchanged
    raw = [_size_message(f"n{i}", 50 + i) for i in range(6)]
    for r in raw:  # UIDs 7..12 are not in UID 1:3
        await b.ok(f"APPEND INBOX {{{len(r)}+}}\r\n".encode() + r)
    assert [ln for ln in await _hear(a, [b"* 12 EXISTS"]) if b"X2" in ln] == []
    lines = await a.command("UID SORT RETURN (UPDATE ALL) (SIZE) UTF-8 UID 12:*", "X3")
    assert lines[0] == b'* ESEARCH (TAG "X3") UID ALL 12', lines
    for i in range(8):  # 1 + 8 = 9 > 2 * 4: the context ends
        r = _size_message(f"o{i}", 70 + i)
        await b.ok(f"APPEND INBOX {{{len(r)}+}}\r\n".encode() + r)
    got = await _hear(a, [b"* 20 EXISTS", b"NOUPDATE"])
    end = got.index(b'* NO [NOUPDATE "X3"] Too many results to keep sorted')
    assert not any(b'TAG "X3"' in ln for ln in got[end:]), got
    r = _size_message("late", 90)
    await b.ok(f"APPEND INBOX {{{len(r)}+}}\r\n".encode() + r)
    assert not any(b"X3" in ln for ln in await _hear(a, [b"* 21 EXISTS"]))
    assert (await a.command('CANCELUPDATE "X3"', "X4"))[-1].startswith(b"X4 BAD")
    assert (await a.command('CANCELUPDATE "X2"', "X5"))[-1].startswith(b"X5 OK")
    await a.close()
    await b.close()


async def test_sort_keys_past_the_pool_time_limit_end_the_context_not_the_session(
    imap_env: ImapEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New results whose sort keys the content pool cannot compute in time
    end that context with NOUPDATE; the session goes on."""
    from imapd.imap import contexts
    from storage.contentpool import ContentTimeout

    a, b = await _two_sessions(imap_env)
    lines = await a.command("UID SORT RETURN (UPDATE COUNT) (SIZE) UTF-8 ALL", "Y1")
    assert lines[0] == b'* ESEARCH (TAG "Y1") UID COUNT 6', lines

    async def too_slow(*args: object) -> list[object]:
        raise ContentTimeout("test")

    monkeypatch.setattr(contexts, "_key_values", too_slow)
    raw = _size_message("m7", 10)
    await b.ok(f"APPEND INBOX {{{len(raw)}+}}\r\n".encode() + raw)
    got = await _hear(a, [b"* 7 EXISTS", b"NOUPDATE"])
    assert got == [b"* 7 EXISTS", b'* NO [NOUPDATE "Y1"] Too many results to keep sorted'], got
    assert (await a.command('CANCELUPDATE "Y1"', "Y2"))[-1].startswith(b"Y2 BAD")
    await a.close()
    await b.close()
