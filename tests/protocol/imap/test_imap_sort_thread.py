"""SORT, THREAD, ESORT and SEARCHRES (RFC 5256, 5267, 5182) against the
server: imapclient's sort() and thread() on a mailbox of random messages,
compared with an independent reference written here from the RFC text, the
RFC's own rules on hand-made threads, and raw lines for ESORT and "$"."""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import random
import re

import imapclient

from tests.protocol.imap.conftest import PASSWORD, USER, ImapEnv

# --------------------------------------------------------------------------
# Reference implementation (slow and literal on purpose: slicing, re.sub).


def ref_base_subject(subject: str) -> tuple[str, bool]:
    """RFC 5256 section 2.1, steps (1)-(7), as written."""
    s = re.sub(r"[ \t\r\n]+", " ", subject)
    reply = False
    while True:
        while True:  # (2)
            if s.endswith(" ") or s.endswith("\t"):
                s = s[:-1]
            elif s.lower().endswith("(fwd)"):
                s, reply = s[:-5], True
            else:
                break
        while True:  # (3)-(5)
            m = re.match(r"(\[[^\[\]]*\][ \t]*)*(re|fwd?)[ \t]*(\[[^\[\]]*\][ \t]*)?:", s, re.I)
            if m:
                s, reply = s[m.end():], True
                continue
            if s[:1] in (" ", "\t"):
                s = s[1:]
                continue
            m = re.match(r"\[[^\[\]]*\][ \t]*", s)
            if m and s[m.end():]:
                s = s[m.end():]
                continue
            break
        if s.lower().startswith("[fwd:") and s.endswith("]"):  # (6)
            s, reply = s[5:-1], True
            continue
        return s, reply


def ref_key(msg: dict, key: str) -> object:
    if key == "ARRIVAL":
        return msg["arrival"]
    if key == "DATE":
        return msg["date"]
    if key == "SIZE":
        return msg["size"]
    if key == "SUBJECT":
        return ref_base_subject(msg["subject"])[0].encode().upper()
    if key == "DISPLAYFROM":  # RFC 5957: the display name, else the addr-spec
        return (msg["display"] or msg["from"]).encode().upper()
    if key == "DISPLAYTO":
        return msg["to"].encode().upper()
    return msg[key.lower()].split("@")[0].encode().upper()  # addr-mailbox, casemapped


def ref_sort(msgs: list[dict], criteria: list[tuple[str, bool]]) -> list[int]:
    """Pairwise comparison, ties by UID (RFC 5256 section 3)."""
    import functools

    def cmp(a: dict, b: dict) -> int:
        for key, rev in criteria:
            x, y = ref_key(a, key), ref_key(b, key)
            if x != y:
                r = -1 if x < y else 1  # type: ignore[operator]
                return -r if rev else r
        return -1 if a["uid"] < b["uid"] else 1

    return [m["uid"] for m in sorted(msgs, key=functools.cmp_to_key(cmp))]


# --------------------------------------------------------------------------
# Random mailbox

_PREFIXES = ["", "Re: ", "RE: ", "Fwd: ", "fw: ", "[list] ", "[list] Re: ", "Re[2]: ",
             "  ", "[a][b] ", "re : "]
_WORDS = ["alpha", "Beta", "gamma", "ALPHA", "beta", "delta", "zeta", "Ümlaut", "eta"]
_TRAILERS = ["", " (fwd)", " (FWD)", "  ", ""]
_NAMES = ["ann", "Bob", "carl", "dora", "Eve", "bob"]
# From display names as sent, and as RFC 5957 compares them (decoded).
_DISPLAY = [("", ""), ("Zed", "Zed"), ("anna", "anna"), ('"Bob, Jr."', "Bob, Jr."),
            ("=?utf-8?q?=C3=89mile?=", "Émile"), ("emile", "emile")]


def random_messages(rng: random.Random, n: int) -> list[dict]:
    msgs = []
    base = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    for i in range(n):
        subject = rng.choice(_PREFIXES) + " ".join(rng.sample(_WORDS, rng.randint(1, 2)))
        subject += rng.choice(_TRAILERS)
        if rng.random() < 0.1:
            subject = f"[fwd: {subject}]"
        sent = base + dt.timedelta(minutes=rng.randint(0, 5000))
        arrival = base + dt.timedelta(minutes=rng.randint(0, 5000))
        fr = f"{rng.choice(_NAMES)}@example.net"
        to = f"{rng.choice(_NAMES)}@example.org"
        cc = rng.choice(["", f"{rng.choice(_NAMES)}@example.com"])
        display, shown = rng.choice(_DISPLAY)
        body = "x" * rng.randint(1, 400) + "\r\n"
        head = [f"From: {display} <{fr}>" if display else f"From: {fr}", f"To: {to}",
                f"Subject: {subject}", f"Date: {email.utils.format_datetime(sent)}",
                f"Message-ID: <m{i}@test>"]
        if cc:
            head.append(f"Cc: {cc}")
        raw = ("\r\n".join(head) + "\r\n\r\n" + body).encode()
        msgs.append({"raw": raw, "subject": subject, "date": sent.timestamp(),
                     "arrival": arrival, "size": len(raw), "from": fr, "to": to, "cc": cc,
                     "display": shown})
    return msgs


def _client(env: ImapEnv) -> imapclient.IMAPClient:
    c = imapclient.IMAPClient("127.0.0.1", port=env.tls_port, ssl=True,
                              ssl_context=env.client_tls)
    c.login(USER, PASSWORD)
    return c


def _filled(env: ImapEnv, rng: random.Random, least: int, most: int) -> list[dict]:
    """Random messages APPENDed with their arrival as INTERNALDATE, each
    given the UID the server gave it."""
    msgs = random_messages(rng, rng.randint(least, most))
    with _client(env) as c:
        for m in msgs:
            resp = c.append("INBOX", m["raw"], msg_time=m["arrival"])
            m["uid"] = int(resp.split(b"]")[0].split()[-1])
    return msgs


_CRITERIA = [
    [("ARRIVAL", False)], [("DATE", False)], [("SIZE", True)], [("SUBJECT", False)],
    [("FROM", False), ("DATE", True)], [("TO", True), ("SUBJECT", False)],
    [("CC", False), ("REVERSE SIZE", False)], [("SUBJECT", True), ("ARRIVAL", False)],
    [("DISPLAYFROM", False)], [("DISPLAYTO", True), ("SIZE", False)],
]


def _imap_criteria(criteria: list[tuple[str, bool]]) -> list[str]:
    return [("REVERSE " if rev else "") + k for k, rev in criteria]


def _ref_criteria(criteria: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    out = []
    for k, rev in criteria:
        if k.startswith("REVERSE "):
            k, rev = k[8:], True
        out.append((k, rev))
    return out


def _sort_session(env: ImapEnv, seed: int) -> None:
    msgs = _filled(env, random.Random(seed), 30, 60)
    seq_of = {m["uid"]: i + 1 for i, m in enumerate(msgs)}
    with _client(env) as c:
        assert b"SORT" in c.capabilities()
        c.select_folder("INBOX")
        for criteria in _CRITERIA:
            want = ref_sort(msgs, _ref_criteria(criteria))
            assert c.sort(_imap_criteria(criteria)) == want, criteria  # UID SORT
            c.use_uid = False
            assert c.sort(_imap_criteria(criteria)) == [seq_of[u] for u in want], criteria
            c.use_uid = True
        # A search narrows what is sorted.
        small = [m for m in msgs if m["size"] < 200]
        assert c.sort(["SIZE"], ["SMALLER", 200]) == ref_sort(small, [("SIZE", False)])


async def test_sort_matches_reference_on_random_mailbox(imap_env: ImapEnv) -> None:
    await asyncio.to_thread(_sort_session, imap_env, random.randrange(1 << 30))


def _ref_ordered_subject(msgs: list[dict]) -> list[list[int]]:
    """RFC 5256 section 3 ORDEREDSUBJECT as nested lists (first, then children)."""
    groups: dict[bytes, list[dict]] = {}
    for m in sorted(msgs, key=lambda m: (m["date"], m["uid"])):
        groups.setdefault(ref_key(m, "SUBJECT"), []).append(m)  # type: ignore[arg-type]
    threads = sorted(groups.values(), key=lambda g: (g[0]["date"], g[0]["uid"]))
    return [[g[0]["uid"]] + [m["uid"] for m in g[1:]] for g in threads]


def _flatten_ordered(thread: tuple) -> list[int]:
    """imapclient's form of "(1 (2)(3))" is (1, (2,), (3,)); "(1 2)" is (1, 2)."""
    out: list[int] = []
    for item in thread:
        out.extend(_flatten_ordered(item) if isinstance(item, tuple) else [item])
    return out


def _thread_session(env: ImapEnv, seed: int) -> None:
    msgs = _filled(env, random.Random(seed), 20, 40)
    with _client(env) as c:
        caps = c.capabilities()
        assert b"THREAD=ORDEREDSUBJECT" in caps and b"THREAD=REFERENCES" in caps
        c.select_folder("INBOX")
        got = c.thread("ORDEREDSUBJECT")
        want = _ref_ordered_subject(msgs)
        assert [_flatten_ordered(t) for t in got] == want
        for t, w in zip(got, want, strict=True):
            if len(w) > 2:  # several children: each its own list
                assert all(isinstance(x, tuple) for x in t[1:]), t


async def test_thread_orderedsubject_matches_reference(imap_env: ImapEnv) -> None:
    await asyncio.to_thread(_thread_session, imap_env, random.randrange(1 << 30))


def _msg(mid: str | None, subject: str, date: int, refs: str = "", irt: str = "") -> bytes:
    sent = dt.datetime(2021, 1, 1, tzinfo=dt.UTC) + dt.timedelta(hours=date)
    head = ["From: a@example.net", f"Subject: {subject}",
            f"Date: {email.utils.format_datetime(sent)}"]
    if mid:
        head.append(f"Message-ID: {mid}")
    if refs:
        head.append(f"References: {refs}")
    if irt:
        head.append(f"In-Reply-To: {irt}")
    return ("\r\n".join(head) + "\r\n\r\nbody\r\n").encode()


# Hand-checked against RFC 5256 section 4: (messages in mailbox order, the
# THREAD REFERENCES answer in sequence numbers).
REFERENCE_CASES = [
    # A plain reply chain, given out of order, and a second reply to the root.
    ([("<1@x>", "hello", 1, "", ""), ("<3@x>", "Re: hello", 3, "<1@x> <2@x>", ""),
      ("<2@x>", "Re: hello", 2, "<1@x>", ""), ("<4@x>", "Re: hello", 4, "", "<1@x>")],
     "(1 (3 2)(4))"),
    # Missing parent: two replies to a message not in the mailbox share a
    # dummy at the top; a later reply by subject only joins that dummy.
    ([("<a@x>", "Topic", 1, "<gone@x>", ""), ("<b@x>", "Topic", 2, "<gone@x>", ""),
      ("<c@x>", "Re: Topic", 3, "", "")],
     "((1)(2)(3))"),
    # A missing parent with one child is not kept: the child is promoted.
    ([("<a@x>", "one", 2, "<gone@x>", ""), ("<b@x>", "two", 1, "", "")], "(2)(1)"),
    # Subject merging: a reply by subject under the original, two
    # originals with one subject under a dummy.
    ([("<a@x>", "Same", 1, "", ""), ("<b@x>", "Re: Same", 2, "", ""),
      ("<c@x>", "Other", 3, "", ""), ("<d@x>", "Other", 4, "", "")],
     "(1 2)((3)(4))"),
    # A References loop (a says b is its parent, b says a): the first link
    # made (b above a) stands, the one closing the loop is not made.
    ([("<a@x>", "loop", 1, "<b@x>", ""), ("<b@x>", "loop", 2, "<a@x>", "")], "(2 1)"),
    # Duplicate Message-ID: the second is a message of its own; quoting of
    # a msg-id does not make it another one.
    ([("<d@x>", "dup", 1, "", ""), ("<d@x>", "dup2", 2, "", ""),
      ("<q@x>", "quoted", 3, "", ""), ("<r@x>", "Re: x", 4, '<"q"@x>', "")],
     "(1)(2)(3 4)"),
    # No Message-ID at all, and an empty subject: never merged.
    ([(None, "", 1, "", ""), (None, "", 2, "", "")], "(1)(2)"),
]


def _raw_thread(env: ImapEnv) -> list[str]:
    out = []
    for case, _ in REFERENCE_CASES:
        with _client(env) as c:
            name = f"T{len(out)}"
            c.create_folder(name)
            for mid, subj, date, refs, irt in case:
                c.append(name, _msg(mid, subj, date, refs, irt))
            c.select_folder(name)
            c.use_uid = False
            typ, data = c._imap._simple_command("THREAD", "REFERENCES", "UTF-8", "ALL")
            assert typ == "OK"
            _, lines = c._imap._untagged_response(typ, data, "THREAD")
            out.append(lines[0].decode())
    return out


async def test_thread_references_rfc_rules(imap_env: ImapEnv) -> None:
    got = await asyncio.to_thread(_raw_thread, imap_env)
    assert got == [want for _, want in REFERENCE_CASES]
