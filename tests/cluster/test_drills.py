"""The drills of issue #19 on the scaled setup (tests/cluster/harness.py):
two instances of each daemon as processes, a directory database, shards a
(with a synchronous streaming replica) and b, Redis.

Each drill drives real clients (smtplib, imaplib, urllib) and afterwards
reads every mailbox it wrote to back over IMAP: every message that got a
250 is there exactly once (RFC 5321 section 4.1.1.4: a 250 to end of data
means the message is the server's responsibility), and every refusal was
a 4xx (section 4.2.1: try again later), never a 5xx. Each drill restores
what it broke; the promotion, which cannot be undone here, runs last.
"""

from __future__ import annotations

import imaplib
import random
import time

import pytest

from storage.sql.directory import ROUTE_CACHE_SECONDS
from tests.cluster.harness import (
    DOMAIN,
    FAILURE_DELAY,
    PASSWORD,
    Cluster,
    IdleClient,
    ReaderLoad,
    SmtpLoad,
    deliver,
    http_json,
    import_mbox,
    qresync_select,
    wait_until,
)

RECOVER_WITHIN = 30.0  # seconds from a repair until the clients are served again


def users(role: str) -> dict[str, str]:
    return {"a": f"{role}_a@{DOMAIN}", "b": f"{role}_b@{DOMAIN}"}


def select(cluster: Cluster, address: str, port: int) -> tuple[str, list[bytes]]:
    """LOGIN then SELECT INBOX; (status, data) of the SELECT. A refused
    LOGIN raises imaplib.IMAP4.error with the server's text."""
    conn = cluster.imap(address, port)
    try:
        return conn.select("INBOX")
    finally:
        conn.logout()


def test_kill_one_instance_of_each_daemon_under_load(
    cluster: Cluster, accounts: dict[str, str]
) -> None:
    near, far = users("kill").values()
    with (
        SmtpLoad(cluster, [near, far]) as load,
        ReaderLoad(cluster, "imapd", near) as imap,
        ReaderLoad(cluster, "httpapi", far) as http,
    ):
        load.wait_acked(15)
        wait_until(lambda: imap.served_since(0) and http.served_since(0), 60, "readers")
        killed = time.monotonic()
        for name in ("mtad1", "imapd1", "httpapi1"):
            cluster.kill(cluster.instances[name])
        # The clients carry on with the other instances.
        load.wait_acked(15, RECOVER_WITHIN, since=killed)
        imapd2, httpapi2 = cluster.instances["imapd2"].port, cluster.instances["httpapi2"].port
        wait_until(lambda: imap.served_since(killed, imapd2) > 0, RECOVER_WITHIN, "imapd2")
        wait_until(lambda: http.served_since(killed, httpapi2) > 0, RECOVER_WITHIN, "httpapi2")
    cluster.ensure_running()
    load.ledger.check(cluster, {near, far})


def test_a_shard_down_fails_only_its_own_users(cluster: Cluster, accounts: dict[str, str]) -> None:
    near, far = users("outage").values()
    imap_ports, mx_ports = cluster.ports("imapd"), cluster.ports("mtad")
    with SmtpLoad(cluster, [near, far]) as load:
        load.wait_acked(10)
        cluster.stop_pg("b")
        try:
            for imap_port, mx_port in zip(imap_ports, mx_ports, strict=True):
                # Its users log in (the directory is up) and are told to come back.
                typ, data = select(cluster, far, imap_port)
                assert typ == "NO" and b"[UNAVAILABLE]" in data[0], data  # RFC 5530 section 3
                code, reply = deliver(mx_port, far)
                assert 400 <= code < 500, (code, reply)
                # Everyone else sees nothing.
                assert select(cluster, near, imap_port)[0] == "OK"
                assert deliver(mx_port, near) == (250, b"")
        finally:
            cluster.start_pg("b")
        load.wait_acked(5, RECOVER_WITHIN, since=time.monotonic(), rcpt=far)
    # Shard a's user was never refused, shard b's only with 4xx (checked).
    assert not load.ledger.refusals({near}), load.ledger.refusals({near})
    assert load.ledger.refusals({far}), "shard b was down, yet its user was never refused"
    load.ledger.check(cluster, {near, far})


def test_the_directory_down_is_temporary_for_everyone(
    cluster: Cluster, accounts: dict[str, str]
) -> None:
    everyone = list(users("dir").values())
    with SmtpLoad(cluster, everyone) as load:
        load.wait_acked(10)
        cluster.stop_pg("dir")
        stopped = time.monotonic()
        try:
            # More attempts than the login throttle would forgive, on every instance.
            for _ in range(2):
                for port in cluster.ports("imapd"):
                    for user in everyone:
                        with pytest.raises(imaplib.IMAP4.error) as refused:
                            select(cluster, user, port)
                        # RFC 5530 section 3: UNAVAILABLE, never AUTHENTICATIONFAILED.
                        assert "[UNAVAILABLE]" in str(refused.value), refused.value
                for port in cluster.ports("httpapi"):
                    status, body = http_json(
                        port, "POST", "/v1/login", {"address": everyone[0], "password": PASSWORD}
                    )
                    assert status == 503, (status, body)  # RFC 9110 section 15.6.4
                # A route read before the outage may serve for its cache's life.
                time.sleep(max(0.0, stopped + ROUTE_CACHE_SECONDS - time.monotonic()))
                for port in cluster.ports("mtad"):
                    # Who exists is not known: no 550 "no such user" either.
                    for rcpt in (everyone[1], f"nobody@{DOMAIN}"):
                        code, reply = deliver(port, rcpt)
                        assert 400 <= code < 500, (rcpt, code, reply)
        finally:
            cluster.start_pg("dir")
        back = time.monotonic()
        load.wait_acked(10, RECOVER_WITHIN, since=back)
    # None of those attempts counted as a failed login: no delay now.
    for port in cluster.ports("imapd"):
        for user in everyone:
            started = time.monotonic()
            assert select(cluster, user, port)[0] == "OK"
            assert time.monotonic() - started < FAILURE_DELAY / 2, (user, port)
    load.ledger.check(cluster, set(everyone))


def test_move_an_account_under_smtp_and_imap_idle_load(
    cluster: Cluster, accounts: dict[str, str]
) -> None:
    user = f"move@{DOMAIN}"
    imported = import_mbox(cluster, user, random.randint(800, 1200))
    with SmtpLoad(cluster, [user]) as load, IdleClient(cluster, user) as idle:
        load.wait_acked(10)
        before = idle.selects[0]
        out = cluster.mailctl("account", "move", user, "--to", "b", timeout=200)
        assert f"account {user} is on shard b" in out, out
        load.wait_acked(10, RECOVER_WITHIN, since=time.monotonic())
        # The fence ended the IDLE session (RFC 3501 section 7.1.5, RFC 5530
        # UNAVAILABLE); the client came back to the same mailbox.
        wait_until(lambda: len(idle.selects) > 1, RECOVER_WITHIN, "the IDLE client's resync")
    assert any(b"[UNAVAILABLE]" in bye for bye in idle.byes), (idle.byes, idle.errors)
    # No client resyncs from scratch: same UIDVALIDITY (RFC 3501 section 2.3.1.1).
    assert {uidvalidity for uidvalidity, _ in idle.selects} == {before[0]}, idle.selects
    conn = cluster.imap(user)
    try:
        conn.enable("QRESYNC")
        assert qresync_select(conn, idle.selects[-1])[0] == before[0]
    finally:
        conn.logout()
    assert cluster.directory_shard(user) == "b"
    assert cluster.shards_holding(user) == ["b"]
    load.ledger.check(cluster, {user})
    stored = cluster.message_ids(user)
    assert all(stored[mid] == 1 for mid in imported), "an imported message lost or doubled"


@pytest.mark.parametrize("kill_at", ["copy", "fenced"])
def test_a_move_killed_halfway_is_finished_by_running_it_again(
    cluster: Cluster, accounts: dict[str, str], kill_at: str
) -> None:
    user = f"resume_{kill_at}@{DOMAIN}"
    source = cluster.directory_shard(user)
    target = "a" if source == "b" else "b"
    imported = import_mbox(cluster, user, random.randint(300, 700))
    with SmtpLoad(cluster, [user]) as load:
        load.wait_acked(5)
        state = cluster.kill_mailctl_at(kill_at, "account", "move", user, "--to", target)
        assert set(cluster.shards_holding(user)) in ({source}, {source, target}), state
        out = cluster.mailctl("account", "move", user, "--to", target, timeout=200)
        assert f"account {user} is on shard {target}" in out, out
        load.wait_acked(5, RECOVER_WITHIN, since=time.monotonic())
    assert cluster.directory_shard(user) == target
    assert cluster.shards_holding(user) == [target]
    load.ledger.check(cluster, {user})
    stored = cluster.message_ids(user)
    assert all(stored[mid] >= 1 for mid in imported), "an imported message lost"
    assert all(n == 1 for n in stored.values()), "a message doubled"


def test_sigkill_of_a_primary_then_promotion_of_its_replica(
    cluster: Cluster, accounts: dict[str, str]
) -> None:
    near, far = users("promote").values()
    with SmtpLoad(cluster, [near, far], clients=4) as load:
        load.wait_acked(20, rcpt=near)
        cluster.pg["a"].kill()
        cluster.pg["a_replica"].promote()
        promoted = time.monotonic()
        # The daemons find the new primary by themselves, without a restart.
        load.wait_acked(10, RECOVER_WITHIN, since=promoted, rcpt=near)
    for port in cluster.ports("imapd"):
        # Each imapd finds the new primary too (its pool's next connection).
        answers: list[tuple[str, list[bytes]]] = []
        try:
            wait_until(
                lambda port=port, answers=answers: (
                    answers.append(select(cluster, near, port)) or answers[-1][0] == "OK"
                ),
                RECOVER_WITHIN,
                f"SELECT on imapd port {port} after the promotion",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {answers[-3:]}") from None
    assert all(i.alive() for i in cluster.instances.values())
    load.ledger.check(cluster, {near, far})
