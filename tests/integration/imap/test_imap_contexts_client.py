"""imaplib (Python's own client) with CONTEXT=SORT and CONTEXT=SEARCH (RFC
5267): a live UID SORT context followed while another imaplib session
appends and flags, then CANCELUPDATE; PARTIAL counted from the end (RFC
9394 section 3.1)."""

from __future__ import annotations

import asyncio
import imaplib
import random
import time

from tests.protocol.imap.conftest import PASSWORD, USER, ImapEnv, message
from tests.protocol.imap.test_imap_contexts import Mirror, _expand

# imaplib checks a command's name against this table before sending it.
imaplib.Commands.setdefault("CANCELUPDATE", ("SELECTED",))


def _esearch(client: imaplib.IMAP4) -> list[bytes]:
    """The ESEARCH responses imaplib collected since last asked, as lines."""
    _, data = client.response("ESEARCH")
    return [b"* ESEARCH " + d for d in data if isinstance(d, bytes)]


def _wait_esearch(client: imaplib.IMAP4, count: int, tries: int = 60) -> list[bytes]:
    got: list[bytes] = []
    for _ in range(tries):
        client.noop()
        got += _esearch(client)
        if len(got) >= count:
            break
        time.sleep(0.05)
    return got


def _session(port: int, new_mail: bytes, seen_uid: int) -> dict[str, object]:
    out: dict[str, object] = {}
    a = imaplib.IMAP4("127.0.0.1", port)
    b = imaplib.IMAP4("127.0.0.1", port)
    try:
        a.login(USER, PASSWORD)
        out["caps"] = a.capability()[1][0].decode().split()  # after login
        a.select("INBOX")
        tag = a._command(
            "UID", "SORT", "RETURN", "(UPDATE ALL)", "(REVERSE SIZE)", "UTF-8", "UNSEEN"
        )
        out["sort"] = a._command_complete("SORT", tag)[0]
        out["tag"] = tag.decode()
        out["initial"] = _esearch(a)
        p = a._command("UID", "SEARCH", "RETURN", "(PARTIAL -1:-2 COUNT)", "ALL")
        a._command_complete("SEARCH", p)
        out["partial"] = _esearch(a)
        out["all"] = a.uid("SEARCH", "ALL")[1]

        b.login(USER, PASSWORD)
        b.select("INBOX")
        b.append("INBOX", None, None, new_mail)
        b.uid("STORE", str(seen_uid), "+FLAGS", "(\\Seen)")
        out["heard"] = _wait_esearch(a, 2)
        out["fresh"] = a.uid("SORT", "(REVERSE SIZE)", "UTF-8", "UNSEEN")[1]

        out["cancel"] = a._simple_command("CANCELUPDATE", f'"{out["tag"]}"')[0]
        b.uid("STORE", "1:*", "+FLAGS", "(\\Seen)")
        time.sleep(0.3)
        out["after_cancel"] = _wait_esearch(a, 1, tries=5)
        try:
            a._simple_command("CANCELUPDATE", f'"{out["tag"]}"')
        except imaplib.IMAP4.error as exc:  # imaplib raises on BAD
            out["again"] = str(exc)
    except imaplib.IMAP4.error as exc:
        out["error"] = str(exc)
    finally:
        for c in (a, b):
            try:
                c.logout()
            except (imaplib.IMAP4.error, OSError):
                pass
    return out


async def test_imaplib_follows_a_sort_context(imap_env: ImapEnv) -> None:
    rng = random.Random()
    count = rng.randint(5, 12)
    sizes = rng.sample(range(50, 5000), count + 1)
    for i, size in enumerate(sizes[:-1], 1):
        body = "".join(rng.choice("abc xyz\r\n") for _ in range(size))
        await imap_env.deliver(message(f"s{i}", body + "\r\n", Message_ID=f"<s{i}@x>"))
    new_mail = message("new", "q" * sizes[-1] + "\r\n", Message_ID="<new@x>")
    seen_uid = rng.randint(1, count)
    out = await asyncio.to_thread(_session, imap_env.port, new_mail, seen_uid)
    assert "error" not in out, out
    assert "CONTEXT=SORT" in out["caps"] and "CONTEXT=SEARCH" in out["caps"]  # type: ignore[operator]
    assert out["sort"] == "OK"
    tag = str(out["tag"])
    (initial,) = out["initial"]  # type: ignore[misc]
    assert initial.startswith(b'* ESEARCH (TAG "%s") UID ALL ' % tag.encode())
    mirror = Mirror(tag, _expand(initial.split(b" ALL ")[1]), uid=True)
    assert len(mirror.results) == count
    # RFC 9394 section 3.1: the last two matches, and COUNT of them all.
    uids = [int(u) for u in out["all"][0].split()]  # type: ignore[index]
    last = b"%d:%d" % (uids[-2], uids[-1])
    (partial,) = out["partial"]  # type: ignore[misc]
    assert partial.startswith(b'* ESEARCH (TAG "') and partial.endswith(
        b'") UID PARTIAL (-1:-2 %s) COUNT %d' % (last, count)
    ), partial
    # The append (ADDTO at its size's place) and the \Seen (REMOVEFROM).
    heard = out["heard"]
    assert isinstance(heard, list) and len(heard) == 2, heard
    assert any(b" UID ADDTO (" in h for h in heard) and any(
        b" UID REMOVEFROM (" in h for h in heard
    )
    for line in heard:
        mirror.apply(line)
    fresh = [int(u) for u in out["fresh"][0].split()]  # type: ignore[index]
    assert mirror.results == fresh and seen_uid not in fresh and count + 1 in fresh
    # CANCELUPDATE: no more updates, and the tag is free (again: BAD).
    assert out["cancel"] == "OK"
    assert out["after_cancel"] == []
    assert "BAD" in str(out["again"]) and "No update context" in str(out["again"])
