"""QUOTA (RFC 9208) as scripted sessions and through imapclient, as
Thunderbird and K-9 ask for it (GETQUOTAROOT INBOX)."""

from __future__ import annotations

import asyncio
import random
import ssl

import imapclient

from tests.protocol.imap.conftest import PASSWORD, USER, ImapEnv, message


def _kib_up(octets: int) -> int:
    return -(-octets // 1024)


async def _used(env: ImapEnv) -> int:
    return await env.storage.mail(env.account).quota_used(env.account.id)  # type: ignore[attr-defined]


async def test_getquotaroot_reports_storage_of_every_mailbox(imap_env: ImapEnv) -> None:
    rng = random.Random()
    limit = rng.randint(200, 900) * 1024 + rng.randint(0, 1023)
    await imap_env.storage.directory.set_quota(USER, limit)  # type: ignore[attr-defined]
    for i in range(rng.randint(2, 6)):
        await imap_env.deliver(message(f"m{i}", "x" * rng.randint(10, 5000) + "\r\n"))
    c = await imap_env.client(login=True)
    caps = (await c.ok("CAPABILITY"))[0]
    assert b" QUOTA " in caps and b" QUOTA=RES-STORAGE" in caps
    assert b"QUOTASET" not in caps  # RFC 9208 section 4.1.3: SETQUOTA is refused
    # A message in another mailbox counts against the same root (section 3.2).
    await c.ok("CREATE Kept")
    raw = message("archived", "y" * rng.randint(3000, 9000) + "\r\n")
    await c.ok(b"APPEND Kept {%d+}\r\n" % len(raw) + raw)
    used = await _used(imap_env)
    quota = b'* QUOTA "" (STORAGE %d %d)' % (_kib_up(used), limit // 1024)
    lines = await c.ok("GETQUOTAROOT INBOX")
    assert lines[:2] == [b'* QUOTAROOT "INBOX" ""', quota]
    lines = await c.ok("GETQUOTAROOT Kept")
    assert lines[:2] == [b'* QUOTAROOT "Kept" ""', quota]
    lines = await c.ok('GETQUOTA ""')
    assert lines[0] == quota
    # The administrator's change shows without a new login.
    await imap_env.storage.directory.set_quota(USER, limit * 2)  # type: ignore[attr-defined]
    lines = await c.ok('GETQUOTA ""')
    assert lines[0] == b'* QUOTA "" (STORAGE %d %d)' % (_kib_up(used), limit * 2 // 1024)
    await c.close()


# RFC 9208 section 4.1: (command, expected untagged lines, tagged status and code).
SCRIPT: list[tuple[str, list[bytes], bytes]] = [
    ("GETQUOTAROOT Nowhere", [], b"NO [NONEXISTENT]"),
    ('GETQUOTA "User quota"', [], b"NO [NONEXISTENT]"),
    ('SETQUOTA "" (STORAGE 512)', [], b"NO [NOPERM]"),
    ('SETQUOTA "" ()', [], b"NO [NOPERM]"),
    ('SETQUOTA "" (STORAGE)', [], b"BAD"),
    ('SETQUOTA "" (STORAGE 99999999999999999999999)', [], b"BAD"),
    ("GETQUOTA", [], b"BAD"),
    ("GETQUOTAROOT", [], b"BAD"),
    ("GETQUOTAROOT INBOX extra", [], b"BAD"),
]


async def test_quota_script(imap_env: ImapEnv) -> None:
    await imap_env.storage.directory.set_quota(USER, 1 << 20)  # type: ignore[attr-defined]
    c = await imap_env.client()
    lines = await c.command("GETQUOTAROOT INBOX", "pre")
    assert lines[-1].startswith(b"pre BAD"), lines  # RFC 9208: authenticated state only
    await c.ok(f"LOGIN {USER} {PASSWORD}")
    for n, (line, untagged, status) in enumerate(SCRIPT):
        lines = await c.command(line, f"q{n}")
        assert lines[:-1] == untagged, (line, lines)
        assert lines[-1].startswith(f"q{n} ".encode() + status), (line, lines)
    await c.close()


async def test_unlimited_account_has_no_quota_root(imap_env: ImapEnv) -> None:
    c = await imap_env.client(login=True)
    lines = await c.ok("GETQUOTAROOT INBOX")
    assert lines[0] == b'* QUOTAROOT "INBOX"' and len(lines) == 2
    lines = await c.command('GETQUOTA ""', "g")
    assert lines == [b"g NO [NONEXISTENT] No such quota root"]
    await c.close()


async def test_append_and_copy_over_quota_say_overquota(imap_env: ImapEnv) -> None:
    """RFC 9208 section 4.3.1: a NO to APPEND/COPY over the limit carries [OVERQUOTA]."""
    rng = random.Random()
    first = message("first", "z" * rng.randint(2000, 6000) + "\r\n")
    await imap_env.deliver(first)
    used = await _used(imap_env)
    await imap_env.storage.directory.set_quota(USER, used + rng.randint(0, 500))  # type: ignore[attr-defined]
    c = await imap_env.client(login=True)
    raw = message("second", "w" * rng.randint(1000, 3000) + "\r\n")
    lines = await c.command(b"APPEND INBOX {%d+}\r\n" % len(raw) + raw, "a")
    assert lines[-1].startswith(b"a NO [OVERQUOTA]"), lines
    await c.ok("CREATE Kept")
    await c.ok("SELECT INBOX")
    lines = await c.command("COPY 1 Kept", "c")
    assert lines[-1].startswith(b"c NO [OVERQUOTA]"), lines
    assert await _used(imap_env) == used  # nothing half-stored
    # MOVE frees what it adds, so it is not over the quota.
    await c.ok("MOVE 1 Kept")
    assert await _used(imap_env) == used
    await c.close()


def _thunderbird_like(port: int, ctx: ssl.SSLContext) -> tuple[object, object]:
    with imapclient.IMAPClient("127.0.0.1", port=port, ssl=True, ssl_context=ctx) as c:
        c.login(USER, PASSWORD)
        assert c.has_capability("QUOTA")
        roots = c.get_quota_root("INBOX")
        quotas = c.get_quota()  # imapclient: GETQUOTAROOT INBOX, the QUOTA lines
        c.logout()
    return roots, quotas


async def test_imapclient_get_quota_root(imap_env: ImapEnv) -> None:
    rng = random.Random()
    limit = rng.randint(1, 50) * 1024 * 1024
    await imap_env.storage.directory.set_quota(USER, limit)  # type: ignore[attr-defined]
    for i in range(rng.randint(1, 4)):
        await imap_env.deliver(message(f"m{i}", "b" * rng.randint(100, 20000) + "\r\n"))
    used = await _used(imap_env)
    roots, quotas = await asyncio.to_thread(
        _thunderbird_like, imap_env.tls_port, imap_env.client_tls)
    mailbox_roots, root_quotas = roots  # type: ignore[misc]
    assert mailbox_roots.mailbox == "INBOX" and mailbox_roots.quota_roots == [""]
    assert len(root_quotas) == 1
    q = root_quotas[0]
    assert (q.quota_root, q.resource, q.usage, q.limit) == (
        "", "STORAGE", _kib_up(used), limit // 1024)
    assert quotas == root_quotas


async def test_status_deleted_and_deleted_storage(imap_env: ImapEnv) -> None:
    """RFC 9051 section 6.3.11 DELETED and RFC 9208 section 4.1.4 DELETED-STORAGE:
    what an EXPUNGE would remove, and that after it the quota usage drops by that."""
    rng = random.Random()
    await imap_env.storage.directory.set_quota(USER, 10 << 20)  # type: ignore[attr-defined]
    sizes = [rng.randint(10, 9000) for _ in range(rng.randint(3, 10))]
    raws = [message(f"d{i}", "q" * n + "\r\n") for i, n in enumerate(sizes)]
    for raw in raws:
        await imap_env.deliver(raw)
    doomed = sorted(rng.sample(range(1, len(raws) + 1), rng.randint(1, len(raws) - 1)))
    c = await imap_env.client(login=True)
    lines = await c.ok("STATUS INBOX (MESSAGES DELETED DELETED-STORAGE)")
    assert lines[0] == b'* STATUS "INBOX" (MESSAGES %d DELETED 0 DELETED-STORAGE 0)' % len(raws)
    await c.ok("SELECT INBOX")
    await c.ok("STORE " + ",".join(map(str, doomed)) + " +FLAGS.SILENT (\\Deleted)")
    freed = sum(len(raws[i - 1]) for i in doomed)
    await c.ok("UNSELECT")
    lines = await c.ok("STATUS INBOX (DELETED-STORAGE DELETED)")
    assert lines[0] == b'* STATUS "INBOX" (DELETED-STORAGE %d DELETED %d)' % (
        _kib_up(freed), len(doomed))
    before = await _used(imap_env)
    await c.ok("SELECT INBOX")
    await c.ok("EXPUNGE")
    assert await _used(imap_env) == before - freed
    lines = await c.ok("STATUS INBOX (DELETED)")
    assert lines[0] == b'* STATUS "INBOX" (DELETED 0)'
    await c.close()
