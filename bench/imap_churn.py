"""The shared-mailbox churn: many sessions changing one INBOX at once, and a
checker of what each session was told against what storage holds.

Each :class:`ChurnSession` loops LIST, STATUS, FETCH of envelopes and flags,
FETCH of whole bodies, STORE of flags and keywords, STORE \\Deleted plus
EXPUNGE, and APPEND (only while its view holds fewer than ``floor``
messages), so every session must hear of the others' expunges and new
messages. It keeps the view a client keeps from the server's responses
alone (RFC 3501 sections 7.3.1 EXISTS, 7.4.1 EXPUNGE, 7.4.2 FETCH): message
sequence number -> UID, UID -> Message-ID, and the keywords announced in
FLAGS (section 7.2.6); every response that contradicts that view is a
problem. :func:`verify` then compares each session's view, after a final
NOOP, with a fresh session's reading of the mailbox.

Used by ``bench/imap_bench.py --phases churn`` (against shardmail and
Dovecot) and by the integration test ``tests/integration/imap/test_imap_churn.py``.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

PASSWORD = "benchpass"
# The churn mix: relative weights of each kind of command.
CHURN_MIX: dict[str, int] = {
    "list": 5,
    "status": 5,
    "fetch_envelope": 25,
    "fetch_body": 15,
    "store": 25,
    "expunge": 15,
    "append": 10,
}
KEYWORDS = ("$Churn1", "$Churn2", "$Churn3", "$Todo", "$Work", "Later")
SYSTEM_FLAGS = ("\\Seen", "\\Flagged", "\\Answered", "\\Draft")
MAX_EXAMPLES = 20  # problems kept verbatim per kind

_LITERAL = re.compile(rb"\{(\d+)\+?\}\r\n")
_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(<[^>\r\n]*>)", re.I | re.M)
_APPENDUID = re.compile(rb"\[APPENDUID \d+ (\d+)\]")


# ------------------------------------------------------------------ parsing
def parse_response(data: bytes) -> list[Any]:
    """One response (literals inline as ``{n}\\r\\n`` + n octets) as a list
    of atoms (bytes), strings (bytes), NIL (None) and parenthesised lists.
    (Dovecot answers NIL for the body of a message another session expunged.) An atom with
    brackets (``BODY[HEADER.FIELDS (X)]``) stays one atom (RFC 3501 section 9)."""
    stack: list[list[Any]] = [[]]
    i, n = 0, len(data)
    while i < n:
        c = data[i : i + 1]
        if c in (b" ", b"\r", b"\n"):
            i += 1
        elif c == b"(":
            stack.append([])
            i += 1
        elif c == b")":
            done = stack.pop() if len(stack) > 1 else []
            stack[-1].append(done)
            i += 1
        elif c == b'"':
            out = bytearray()
            i += 1
            while i < n and data[i : i + 1] != b'"':
                if data[i : i + 1] == b"\\":
                    i += 1
                out += data[i : i + 1]
                i += 1
            stack[-1].append(bytes(out))
            i += 1
        elif c == b"{" and (m := _LITERAL.match(data, i)):
            start = m.end()
            stack[-1].append(data[start : start + int(m.group(1))])
            i = start + int(m.group(1))
        else:
            start = i
            depth = 0
            while i < n:
                ch = data[i : i + 1]
                if ch == b"[":
                    depth += 1
                elif ch == b"]":
                    depth -= 1
                elif depth <= 0 and ch in (b" ", b"(", b")", b"\r", b"\n"):
                    break
                i += 1
            atom = data[start:i]
            stack[-1].append(None if atom.upper() == b"NIL" else atom)
    while len(stack) > 1:
        done = stack.pop()
        stack[-1].append(done)
    return stack[0]


def fetch_items(tokens: list[Any]) -> dict[bytes, Any]:
    """``* n FETCH (k v k v ...)`` -> {K: v} with upper-case keys."""
    items = tokens[3] if len(tokens) > 3 and isinstance(tokens[3], list) else []
    return {bytes(items[k]).upper(): items[k + 1] for k in range(0, len(items) - 1, 2)}


def message_id_of(header: bytes) -> bytes | None:
    m = _MESSAGE_ID.search(header)
    return m.group(1) if m else None


def churn_message(session: int, n: int, rng: random.Random) -> tuple[bytes, bytes]:
    """(Message-ID, a message with it and a random body of random length)."""
    msgid = b"<churn-%d-%d-%d@example.net>" % (session, n, rng.getrandbits(48))
    body = rng.randbytes(6000).hex().encode()[: rng.randint(1, 12000)]
    lines = b"\r\n".join(body[k : k + 76] for k in range(0, len(body), 76))
    head = (
        b"From: Churn <churn@example.net>\r\nTo: user@example.org\r\n"
        b"Subject: churn %d/%d\r\nDate: Tue, 4 Mar 2025 10:00:00 +0000\r\n"
        b"Message-ID: %s\r\n\r\n" % (session, n, msgid)
    )
    return msgid, head + lines + b"\r\n"


# ------------------------------------------------------------------ checker
@dataclass
class Problems:
    """Contradictions between what a server said and what it said before."""

    counts: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, text: str) -> None:
        self.counts[kind] += 1
        kept = self.examples.setdefault(kind, [])
        if len(kept) < MAX_EXAMPLES:
            kept.append(text)

    def merge(self, other: Problems) -> None:
        for kind, n in other.counts.items():
            self.counts[kind] += n
            kept = self.examples.setdefault(kind, [])
            kept.extend(other.examples.get(kind, [])[: MAX_EXAMPLES - len(kept)])

    def report(self) -> str:
        if not self.counts:
            return "no problems"
        lines = []
        for kind, n in sorted(self.counts.items()):
            lines.append(f"{kind}: {n}")
            lines += [f"    {e}" for e in self.examples.get(kind, [])[:5]]
        return "\n".join(lines)


@dataclass
class Tally:
    ok: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)


# Commands during which RFC 3501 section 7.4.1 forbids EXPUNGE responses.
_NO_EXPUNGE = (b"FETCH ", b"STORE ", b"SEARCH ")


class ChurnSession:
    """One client of the churn, keeping the view a client keeps."""

    def __init__(
        self, number: int, login: str, floor: int, problems: Problems, seed: int | None = None
    ) -> None:
        self.number = number
        self.login = login
        self.floor = floor
        self.problems = problems
        self.rng = random.Random(seed)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.tag = 0
        self.seqs: list[int | None] = []  # sequence number - 1 -> UID (None: not yet heard)
        self.message_ids: dict[int, bytes] = {}  # UID -> Message-ID as first fetched
        self.keywords: set[str] = set()  # announced by the last FLAGS response
        self.appended = 0
        self.append_times: list[float] = []
        self.expunges_heard = 0
        self.smallest_view = 1 << 30
        self.appends_made = 0

    # -- wire
    async def connect(self, port: int, host: str = "127.0.0.1") -> None:
        self.reader, self.writer = await asyncio.open_connection(host, port)
        await self._response()  # the greeting

    async def _response(self) -> bytes:
        """One response with its literals inline."""
        assert self.reader is not None
        out = bytearray()
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("server closed the connection")
            out += line
            m = _LITERAL.search(line)
            if m and m.end() == len(line):
                out += await self.reader.readexactly(int(m.group(1)))
                continue
            return bytes(out)

    async def command(self, line: bytes) -> tuple[bytes, bytes, list[list[Any]]]:
        """Send one command, apply every untagged response to the view in
        order; returns (status, tagged line, parsed untagged responses)."""
        assert self.writer is not None
        self.tag += 1
        tag = b"c%d" % self.tag
        self.writer.write(tag + b" " + line + b"\r\n")
        await self.writer.drain()
        untagged = []
        while True:
            resp = await self._response()
            if resp.startswith(tag + b" "):
                status = resp.split(b" ", 2)[1]
                return status, resp, untagged
            if resp.startswith(b"* "):
                tokens = parse_response(resp)
                untagged.append(tokens)
                self._apply(line, tokens)

    # -- the client's view
    def _apply(self, line: bytes, tokens: list[Any]) -> None:
        if len(tokens) < 3:
            return
        word = tokens[2].upper() if isinstance(tokens[2], bytes) else b""
        if word == b"EXISTS":
            n = int(tokens[1])
            if n < len(self.seqs):
                self.problems.add("exists-shrank", f"{self.login}#{self.number}: {n} EXISTS "
                                  f"after {len(self.seqs)} without EXPUNGE")
                del self.seqs[n:]
            self.seqs.extend([None] * (n - len(self.seqs)))
        elif word == b"EXPUNGE":
            n = int(tokens[1])
            if line.upper().startswith(_NO_EXPUNGE):
                self.problems.add("expunge-during-fetch-store-search",
                                  f"{line[:40]!r}: {n} EXPUNGE")
            if not 1 <= n <= len(self.seqs):
                self.problems.add("expunge-out-of-range", f"{n} EXPUNGE of {len(self.seqs)}")
                return
            del self.seqs[n - 1]
            self.expunges_heard += 1
        elif word == b"FETCH":
            self._apply_fetch(int(tokens[1]), fetch_items(tokens))
        elif tokens[1] == b"FLAGS" and isinstance(tokens[2], list):
            self.keywords = {f.decode() for f in tokens[2] if not f.startswith(b"\\")}
        self.smallest_view = min(self.smallest_view, len(self.seqs))

    def _apply_fetch(self, seq: int, items: dict[bytes, Any]) -> None:
        if not 1 <= seq <= len(self.seqs):
            self.problems.add("fetch-out-of-range", f"{seq} FETCH of {len(self.seqs)}")
            return
        uid = int(items[b"UID"]) if b"UID" in items else None
        if uid is not None:
            known = self.seqs[seq - 1]
            if known is None:
                self.seqs[seq - 1] = uid
            elif known != uid:
                self.problems.add("seq-to-uid-changed", f"seq {seq}: UID {known} then {uid}")
        flags = items.get(b"FLAGS")
        if isinstance(flags, list):
            unannounced = {f.decode() for f in flags if not f.startswith(b"\\")} - self.keywords
            if unannounced:
                self.problems.add("keyword-not-in-flags",
                                  f"seq {seq}: {sorted(unannounced)} not in FLAGS")
        uid = uid if uid is not None else self.seqs[seq - 1]
        msgid = None
        for key, value in items.items():
            if key == b"ENVELOPE" and isinstance(value, list) and len(value) > 9:
                msgid = value[9] if isinstance(value[9], bytes) else None
            elif key.startswith(b"BODY[") and isinstance(value, bytes):
                msgid = message_id_of(value)
                size = items.get(b"RFC822.SIZE")
                if key == b"BODY[]" and size is not None and int(size) != len(value):
                    self.problems.add("body-size", f"UID {uid}: {len(value)} octets, "
                                      f"RFC822.SIZE {int(size)}")
        if uid is not None and msgid is not None:
            first = self.message_ids.setdefault(uid, msgid)
            if first != msgid:
                self.problems.add("uid-header-changed", f"UID {uid}: {first!r} then {msgid!r}")

    def _known(self) -> list[int]:
        return [u for u in self.seqs if u is not None]

    # -- the commands of the mix
    async def open(self, port: int, password: str = PASSWORD) -> None:
        await self.connect(port)
        for line in (b'LOGIN "%s" "%s"' % (self.login.encode(), password.encode()),
                     b"SELECT INBOX"):
            status, text, _ = await self.command(line)
            if status != b"OK":
                raise RuntimeError(f"{self.login}: {line!r} -> {text!r}")
        await self.command(b"FETCH 1:* (UID FLAGS)" if self.seqs else b"NOOP")

    def _command_for(self, kind: str) -> bytes | None:
        rng = self.rng
        known = self._known()
        if kind == "list":
            return b'LIST "" "*"'
        if kind == "status":
            return b"STATUS INBOX (MESSAGES UIDNEXT UNSEEN)"
        if kind == "fetch_envelope":
            if None in self.seqs:  # new messages announced: learn them as clients do
                first = self.seqs.index(None) + 1
                return b"FETCH %d:* (UID FLAGS ENVELOPE)" % first
            if not self.seqs:
                return None
            a = rng.randint(1, len(self.seqs))
            b = min(len(self.seqs), a + rng.randint(0, 9))
            if rng.random() < 0.5:
                return b"FETCH %d:%d (UID FLAGS ENVELOPE)" % (a, b)
            uids = b",".join(b"%d" % u for u in rng.sample(known, min(len(known), 5)))
            return b"UID FETCH %s (FLAGS ENVELOPE)" % uids if uids else None
        if not known:
            return None
        if kind == "fetch_body":
            return b"UID FETCH %d (RFC822.SIZE BODY.PEEK[])" % rng.choice(known)
        if kind == "store":
            flags = rng.sample(SYSTEM_FLAGS[:2] + KEYWORDS, rng.randint(1, 2))
            sign = b"+" if rng.random() < 0.6 else b"-"
            return b"UID STORE %d %sFLAGS (%s)" % (
                rng.choice(known), sign, " ".join(flags).encode())
        return None

    async def step(self, kind: str) -> tuple[str, bool] | None:
        """Runs one command of ``kind`` (or a fallback when it does not
        apply now); returns (what ran, whether it succeeded)."""
        if kind == "append" and len(self.seqs) >= self.floor:
            kind = "fetch_envelope"
        if kind == "expunge":
            return await self._expunge()
        if kind == "append":
            return await self._append()
        line = self._command_for(kind)
        if line is None:
            line, kind = b"NOOP", "noop"
        status, text, _ = await self.command(line)
        return kind, self._check_status(line, status, text)

    def _check_status(self, line: bytes, status: bytes, text: bytes) -> bool:
        if status != b"OK":
            self.problems.add("command-failed", f"{line[:60]!r} -> {text[:120]!r}")
            return False
        return True

    async def _expunge(self) -> tuple[str, bool]:
        known = self._known()
        if not known:
            return "expunge", True
        doomed = self.rng.sample(known, min(len(known), self.rng.randint(1, 3)))
        line = b"UID STORE %s +FLAGS.SILENT (\\Deleted)" % b",".join(b"%d" % u for u in doomed)
        status, text, _ = await self.command(line)
        ok = self._check_status(line, status, text)
        status, text, _ = await self.command(b"EXPUNGE")
        return "expunge", self._check_status(b"EXPUNGE", status, text) and ok

    async def _append(self) -> tuple[str, bool]:
        self.appends_made += 1
        msgid, raw = churn_message(self.number, self.appends_made, self.rng)
        line = b"APPEND INBOX {%d+}\r\n" % len(raw) + raw
        status, text, _ = await self.command(line)
        ok = self._check_status(b"APPEND", status, text)
        m = _APPENDUID.search(text)
        if ok and m:
            # RFC 4315: the UID it got names this message from now on.
            self.message_ids.setdefault(int(m.group(1)), msgid)
            self.appended += 1
            self.append_times.append(time.monotonic())
        return "append", ok

    async def drive(self, mix: dict[str, int], deadline: float) -> dict[str, Tally]:
        """Runs commands picked from ``mix`` until ``deadline``
        (time.perf_counter); per kind, how many and how long they took."""
        kinds = list(mix)
        weights = [mix[k] for k in kinds]
        tallies: dict[str, Tally] = {}
        clock = time.perf_counter
        while clock() < deadline:
            t0 = clock()
            result = await self.step(self.rng.choices(kinds, weights)[0])
            if result is None:
                continue
            kind, ok = result
            tally = tallies.setdefault(kind, Tally())
            tally.latencies.append(clock() - t0)
            if ok:
                tally.ok += 1
            else:
                tally.failed += 1
        return tallies

    async def close(self) -> None:
        if self.writer is None:
            return
        try:
            await asyncio.wait_for(self.command(b"LOGOUT"), 5)
        except (OSError, ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        self.writer.close()


# ------------------------------------------------------------------- verify
async def mailbox_truth(port: int, login: str, password: str = PASSWORD) -> dict[int, bytes]:
    """UID -> Message-ID of every message in INBOX, read by a new session."""
    reader = ChurnSession(-1, login, 0, Problems())
    await reader.open(port, password)
    try:
        _, _, responses = await reader.command(
            b"UID FETCH 1:* (UID BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])"
        )
    finally:
        await reader.close()
    truth = {}
    for tokens in responses:
        if len(tokens) > 3 and tokens[2] == b"FETCH":
            items = fetch_items(tokens)
            header = next((v for k, v in items.items() if k.startswith(b"BODY[")), b"")
            truth[int(items[b"UID"])] = message_id_of(header) or b""
    return truth


async def verify(
    sessions: list[ChurnSession], port: int, password: str = PASSWORD, settle: float = 0.5
) -> Problems:
    """After the churn: each session sends NOOP (RFC 3501 section 6.1.2,
    where it hears of every change) and FETCH 1:* (UID); then its view must
    be the mailbox as storage holds it, UID for UID and Message-ID for
    Message-ID. Returns every problem found, the sessions' own included."""
    found = Problems()
    await asyncio.sleep(settle)  # let the last changes' notifications land
    for s in sessions:
        await s.command(b"NOOP")
        if s.seqs:
            await s.command(b"FETCH 1:* (UID)")
    truth = await mailbox_truth(port, sessions[0].login, password)
    expected = sorted(truth)
    for s in sessions:
        known = {u for u in s.seqs if u is not None}
        if s.seqs != expected:
            missing = sorted(set(expected) - known)
            extra = sorted(known - set(expected))
            found.add("view-differs-from-storage",
                      f"session {s.number}: {len(s.seqs)} messages, storage {len(expected)}; "
                      f"missing {missing[:10]}, extra {extra[:10]}")
        for uid, msgid in s.message_ids.items():
            if uid in truth and truth[uid] != msgid:
                found.add("uid-content-differs",
                          f"session {s.number}: UID {uid} {msgid!r}, storage {truth[uid]!r}")
    for problems in {id(s.problems): s.problems for s in sessions}.values():
        found.merge(problems)
    return found


async def open_churn(
    port: int, login: str, clients: int, floor: int = 35, seed: int | None = None,
    password: str = PASSWORD,
) -> list[ChurnSession]:
    """``clients`` sessions on ``login``'s INBOX, logged in, INBOX selected,
    sharing one :class:`Problems`; run them with :meth:`ChurnSession.drive`."""
    problems = Problems()
    rng = random.Random(seed)
    sessions = [ChurnSession(i, login, floor, problems, rng.getrandbits(32))
                for i in range(clients)]
    for s in sessions:  # one login at a time: servers limit logins in progress
        await s.open(port, password)
    return sessions


async def run_churn(sessions: list[ChurnSession], seconds: float) -> None:
    """Every session drives :data:`CHURN_MIX` for ``seconds``."""
    deadline = time.perf_counter() + seconds
    await asyncio.gather(*(s.drive(CHURN_MIX, deadline) for s in sessions))
