"""rspamd's answer as a verdict, the X-Spam-* fields, what a move teaches,
and the [antispam] settings (delivery/checks_rspamd.py, delivery/learn.py)."""

from __future__ import annotations

import datetime as dt
import json
import random
import string

import pytest

from conf.settings import Settings
from delivery.checks import Action, Flow, Subject, for_flow
from delivery.checks_rspamd import (
    LINE_MAX,
    RspamdError,
    RspamdResult,
    envelope_headers,
    fold,
    spam_headers,
    verdict_for,
)
from delivery.learn import lesson
from storage.model import Mailbox


def answer(action: str, score: float = 1.0, **extra: object) -> bytes:
    return json.dumps(
        {"action": action, "score": score, "required_score": 15.0, "symbols": {}, **extra}
    ).encode()


@pytest.mark.parametrize(
    ("action", "expected", "code"),
    [
        ("reject", Action.REJECT, 550),
        ("soft reject", Action.TEMPFAIL, 451),
        ("greylist", Action.TEMPFAIL, 451),
        ("rewrite subject", Action.QUARANTINE, None),
        ("add header", Action.QUARANTINE, None),
        ("no action", Action.ACCEPT, None),
    ],
)
def test_each_action_maps_to_its_verdict(action: str, expected: Action, code: int | None) -> None:
    verdict = verdict_for(RspamdResult.parse(answer(action)))
    assert verdict.action is expected
    if code is None:
        assert verdict.reply is None
    else:
        assert verdict.reply is not None
        assert verdict.reply[0] == code
        # RFC 3463: the enhanced code's class matches the reply's.
        assert verdict.reply[1] == f"{code // 100}.7.1"
    status = "No" if action in ("no action", "greylist") else "Yes"
    assert f"X-Spam-Status: {status}, ".encode() in verdict.headers


def test_quarantine_is_refused_on_submission_and_the_api() -> None:
    verdict = verdict_for(RspamdResult.parse(answer("add header", 8.0)))
    assert for_flow(verdict, Flow.MX).action is Action.QUARANTINE
    for flow in (Flow.SUBMISSION, Flow.HTTP):
        refused = for_flow(verdict, flow)
        assert refused.action is Action.REJECT and refused.reply is not None
        assert refused.reply[:2] == (550, "5.7.1")
        assert refused.headers == verdict.headers


def test_rspamds_message_is_the_reply_text_and_made_safe() -> None:
    text = "Spam \r\n550 forged\x00 é" + "x" * 500
    verdict = verdict_for(
        RspamdResult.parse(answer("reject", messages={"smtp_message": text}))
    )
    assert verdict.reply is not None
    shown = verdict.reply[2]
    assert shown.startswith("Spam")
    assert all(" " <= ch <= "~" for ch in shown) and len(shown) <= 200
    default = verdict_for(RspamdResult.parse(answer("reject")))
    assert default.reply == (550, "5.7.1", "Message refused as spam")


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"<html>oops</html>",
        b"[1, 2]",
        answer("discard"),
        json.dumps({"score": 3}).encode(),
    ],
)
def test_anything_but_an_answer_is_an_error(raw: bytes) -> None:
    with pytest.raises(RspamdError):
        RspamdResult.parse(raw)


def test_odd_scores_and_symbols_do_not_break_the_fields() -> None:
    raw = json.dumps({
        "action": "no action",
        "score": "NaN",
        "required_score": None,
        "symbols": {"A": {"score": True}, "B": "x", "C\r\nX-Evil: 1": {"score": 1e308}},
    }).encode()
    result = RspamdResult.parse(raw)
    headers = spam_headers(result).decode("ascii")
    assert "X-Evil" not in headers.replace("C??X-Evil", "")  # never a field of its own
    for line in headers.split("\r\n")[:-1]:
        assert line.startswith(("X-Spam-", " ")), line


def _random_symbols(rng: random.Random) -> list[tuple[str, float]]:
    alphabet = string.ascii_uppercase + string.digits + "_"
    return [
        (
            "".join(rng.choices(alphabet, k=rng.randrange(1, rng.choice([20, 60, 400])))),
            round(rng.uniform(-20, 20), 2),
        )
        for _ in range(rng.randrange(0, 300))
    ]


@pytest.mark.parametrize("seed", range(20))
def test_symbols_fold_into_lines_within_rfc5322_limits(seed: int) -> None:
    rng = random.Random(seed)
    symbols = _random_symbols(rng)
    score = sum(s for _, s in symbols)
    result = RspamdResult("add header", score, 15.0, tuple(symbols))
    raw = spam_headers(result)
    assert raw.endswith(b"\r\n")
    lines = raw[:-2].split(b"\r\n")
    # RFC 5322 section 2.1.1: no line longer than 998 octets; 2.2.3: a
    # continuation line starts with white space.
    assert all(len(line) <= LINE_MAX for line in lines)
    assert all(line[:1] in (b" ", b"X") for line in lines)
    fields = b"\r\n".join(lines).replace(b"\r\n ", b" ").split(b"\r\n")
    assert fields[0] == f"X-Spam-Score: {score:.2f}".encode()
    if not symbols:
        assert len(fields) == 2
        return
    shown = fields[2].decode().removeprefix("X-Spam-Symbols: ").split(", ")
    # Each symbol with its score, by name; a name too long is cut (200).
    assert shown == sorted(f"{name}({value:.2f})"[:200] for name, value in symbols)


@pytest.mark.parametrize("seed", range(10))
def test_fold_keeps_every_item_in_order(seed: int) -> None:
    rng = random.Random(seed)
    items = [
        "".join(rng.choices(string.ascii_letters, k=rng.randrange(1, 120)))
        for _ in range(rng.randrange(1, 100))
    ]
    raw = fold("X-Test", items)
    lines = raw[:-2].split(b"\r\n")
    assert all(len(line) <= LINE_MAX for line in lines)
    assert all(line.startswith(b" ") for line in lines[1:])
    # Lines stay under 78 where a break is possible (RFC 5322 section 2.1.1).
    for line in lines:
        assert len(line) <= 78 or line.count(b" ") <= 2, line
    value = b"".join(lines).decode().removeprefix("X-Test:")
    assert value.replace(" ", "").split(",") == items


def test_the_envelope_goes_in_request_header_fields() -> None:
    subject = Subject(
        Flow.SUBMISSION,
        b"x",
        "alice@example.net",
        ("bob@example.org", "carol@example.org"),
        client_ip="192.0.2.7",
        helo="client.example",
        account="alice@example.net",
    )
    headers = envelope_headers(subject, "Q123")
    assert headers["IP"] == "192.0.2.7"
    assert headers["Helo"] == "client.example"
    assert headers["From"] == "alice@example.net"
    assert headers.getall("Rcpt") == ["bob@example.org", "carol@example.org"]
    assert headers["User"] == "alice@example.net"
    assert headers["Queue-Id"] == "Q123"
    mx = envelope_headers(Subject(Flow.MX, b"x", "", ("a@b",)))
    assert mx["From"] == "" and "User" not in mx and "IP" not in mx


def box(name: str, use: str | None = None) -> Mailbox:
    return Mailbox(1, 1, name, 1, 1, 1, use)


@pytest.mark.parametrize(
    ("source", "dest", "teaches"),
    [
        (box("INBOX"), box("Junk", "\\Junk"), True),
        (box("Archive"), box("Spam", "\\Junk"), True),
        (box("INBOX"), box("junk"), True),
        (box("Junk", "\\Junk"), box("INBOX"), False),
        (box("Junk", "\\Junk"), box("Archive/2026"), False),
        (box("Junk", "\\Junk"), box("Trash", "\\Trash"), None),
        (box("Junk"), box("Bin", "\\Trash"), None),
        (box("Junk", "\\Junk"), box("Junk", "\\Junk"), None),
        (box("INBOX"), box("Archive"), None),
        (box("Trash", "\\Trash"), box("Junk", "\\Junk"), True),
    ],
)
def test_what_a_move_teaches(source: Mailbox, dest: Mailbox, teaches: bool | None) -> None:
    assert lesson(source, dest) is teaches


@pytest.mark.parametrize(
    "antispam",
    [
        {"rspamd_url": "ftp://127.0.0.1"},
        {"rspamd_url": "127.0.0.1:11333"},
        {"rspamd_url": "http://127.0.0.1:11333/?x=1"},
        {"rspamd_url": "http://127.0.0.1:99999"},
        {"rspamd_url": "http://127.0.0.1:11333", "on_error": "ignore"},
        {"rspamd_url": "http://127.0.0.1:11333", "timeout_seconds": 0},
        {"controller_url": "http://127.0.0.1:11334"},  # learning without checking
        {"rspamd_url": "http://127.0.0.1:11333", "password": "p"},  # a password for nothing
        {"rspamd_url": "http://127.0.0.1:11333", "unknown": 1},
    ],
)
def test_antispam_refuses_what_it_cannot_do(antispam: dict) -> None:
    with pytest.raises(ValueError, match="antispam"):
        Settings.model_validate({"antispam": antispam})


def test_antispam_accepts_a_full_section() -> None:
    spam = Settings.model_validate({
        "antispam": {
            "rspamd_url": "http://[::1]:11333/",
            "controller_url": "https://rspamd.example:11334",
            "password": "p",
            "on_error": "accept",
        }
    }).antispam
    assert spam.rspamd_url == "http://[::1]:11333"
    assert spam.on_error == "accept"


class _NoEntries:
    """A storage whose every message has moved on: nothing to read."""

    def __init__(self) -> None:
        self.reads = 0

    def mail(self, account: object) -> _NoEntries:
        return self

    async def entries(self, account_id: int, mailbox_id: int, uids: object) -> list[object]:
        self.reads += 1
        return []


async def test_the_learn_queue_is_bounded_and_drains_in_the_background() -> None:
    from delivery.learn import QUEUE_MAX, learn_moved, learner
    from storage.model import Account

    settings = Settings.model_validate({"antispam": {
        "rspamd_url": "http://127.0.0.1:9", "controller_url": "http://127.0.0.1:9"}})
    account = Account(1, "alice@example.net", "", "default", None, dt.datetime.now(dt.UTC))
    storage = _NoEntries()
    extra = random.randrange(2, 50)
    pairs = tuple((n, n) for n in range(1, QUEUE_MAX + extra + 1))
    # A move of more messages than the queue holds: the call returns at once,
    # having queued QUEUE_MAX and counted the rest as dropped.
    junk = box("Junk", "\\Junk")
    learn_moved(settings, storage, account, box("INBOX"), junk, pairs)  # type: ignore[arg-type]
    queue = learner()
    assert queue.queue.qsize() == QUEUE_MAX and queue.dropped == extra
    assert storage.reads == 0  # nothing read before the caller's reply
    await queue.idle()
    assert storage.reads == QUEUE_MAX and queue.learned == 0
