"""``mailctl acl`` as an admin runs it (a subprocess): grant, change,
list and revoke rights on an account's mailbox, and what a grantee's
storage access then allows; bad input is exit 2, unknown names exit 1."""

from __future__ import annotations

import json
from pathlib import Path

from storage import acl
from tests.integration.test_mailctl import mailctl, ok, run_with_storage


def _rights(data: Path, owner: str, grantee: str, mailbox: str) -> frozenset[str] | None:
    """The rights ``grantee`` opens ``owner``'s mailbox with (None: none)."""

    async def read(storage):  # type: ignore[no-untyped-def]
        who = await storage.directory.get_account(grantee)
        try:
            return (await acl.open_mailbox(storage, who, owner, mailbox)).rights
        except Exception:
            return None

    return run_with_storage(data, read)


def test_grant_list_revoke(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ok(mailctl(data, "domain", "add", "example.org"))
    for user in ("team", "bob", "carol"):
        ok(mailctl(data, "account", "add", f"{user}@example.org", stdin="pw\n"))
    team, bob, carol = "team@example.org", "bob@example.org", "carol@example.org"
    assert _rights(data, team, bob, "INBOX") is None

    out = ok(mailctl(data, "acl", "grant", team, "INBOX", bob, "lr"))
    assert out.strip() == f"{bob} on {team} INBOX: lr"
    assert _rights(data, team, bob, "INBOX") == frozenset("lr")
    ok(mailctl(data, "acl", "grant", team, "INBOX", bob, "+swi"))
    ok(mailctl(data, "acl", "grant", team, "INBOX", "anyone", "l"))
    ok(mailctl(data, "acl", "grant", team, "Sent", carol, "lrd"))  # "d": x, t and e
    listing = ok(mailctl(data, "acl", "list", team)).splitlines()
    assert listing == ["INBOX\tanyone\tl", f"INBOX\t{bob}\tlrswi", f"Sent\t{carol}\tlrxte"]
    rows = json.loads(ok(mailctl(data, "acl", "list", team, "Sent", "--json")))
    assert rows == [{"mailbox": "Sent", "grantee": carol, "rights": "lrxte"}]
    assert _rights(data, team, carol, "INBOX") == frozenset("l")  # anyone's

    ok(mailctl(data, "acl", "grant", team, "INBOX", bob, "--", "-w"))  # "--": not an option
    assert _rights(data, team, bob, "INBOX") == frozenset("lrsi")
    ok(mailctl(data, "acl", "revoke", team, "INBOX", bob))
    assert _rights(data, team, bob, "INBOX") == frozenset("l")  # anyone's still
    ok(mailctl(data, "acl", "revoke", team, "INBOX", "anyone"))
    assert _rights(data, team, bob, "INBOX") is None

    bad = mailctl(data, "acl", "grant", team, "INBOX", bob, "lrz")
    assert bad.returncode == 2 and "unknown right" in bad.stderr
    assert mailctl(data, "acl", "grant", team, "INBOX", bob).returncode == 2
    for args in ((team, "Nowhere", bob, "lr"), (team, "INBOX", "nobody@example.org", "lr")):
        missing = mailctl(data, "acl", "grant", *args)
        assert missing.returncode == 1 and "Traceback" not in missing.stderr
