"""``server.processes = 2``: two mtad worker processes share one SQLite
queue, and each queued message reaches the peer exactly once.

Issue #23 recommends one mtad process per CPU for relaying; that rests on
the queue's leases (``storage/sql/queue.py`` ``lease_due``: one writer at
a time across processes, ``BEGIN IMMEDIATE``). Each process here runs a
single queue worker. The first two entries stall at the peer (no answer to
DATA): both stalled at once proves both processes were delivering side by
side. The peer then drops them (deferred, retried after 1 s) and the rest
is delivered by whichever process leases it first. Every recipient arrives
once, and every entry is done after one delivery attempt or, for the two
stalled ones, two.
"""

from __future__ import annotations

import collections
import re
import secrets
from pathlib import Path

from conf.settings import load_settings
from storage import open_storage
from tests.dnsserver import DnsServer
from tests.integration.outbound.conftest import CRASH_IP, eventually
from tests.integration.outbound.sink import SinkServer
from tests.integration.outbound.test_crash import start_mtad
from tests.ports import free_port

STALLED = ("stall-one@crash.test", "stall-two@crash.test")


def write_config(path: Path, data_dir: Path, dns: DnsServer, relay_port: int) -> Path:
    # Workers share their supervisor's listeners: fixed ports, not 0.
    listen = {key: free_port() for key in ("mx", "submission", "submissions")}
    path.write_text(
        f'[server]\nhostname = "mail.test"\ndata_dir = "{data_dir}"\nprocesses = 2\n'
        "metrics_listen = []\n"
        f'[dns]\nnameservers = ["127.0.0.1"]\nport = {dns.port}\ntimeout_seconds = 2.0\n'
        "[smtp]\n"
        + "".join(f'{key}_listen = ["127.0.0.1:{port}"]\n' for key, port in listen.items())
        + f"[queue]\nworkers = 1\nsmtp_port = {relay_port}\nlease_seconds = 300\n"
        "retry_schedule_seconds = [1]\npoll_interval_seconds = 0.2\n"
        "connect_timeout_seconds = 5.0\ncommand_timeout_seconds = 60.0\n"
    )
    return path


async def test_two_processes_deliver_each_queued_message_once(
    tmp_path: Path, relay_dns: DnsServer, relay_port: int
) -> None:
    config = write_config(tmp_path / "shardmail.toml", tmp_path / "data", relay_dns, relay_port)
    (tmp_path / "data").mkdir()
    storage = await open_storage(load_settings(str(config)).storage)
    sink = await SinkServer(CRASH_IP, relay_port, stall_for=dict.fromkeys(STALLED, "data")).start()
    log_path = tmp_path / "mtad.log"
    proc = None
    bodies: dict[str, bytes] = {}
    try:
        # The stalled ones first: the oldest entries are leased first.
        rcpts = [*STALLED, *(f"r{i}@crash.test" for i in range(secrets.randbelow(20) + 10))]
        for rcpt in rcpts:
            body = secrets.token_bytes(secrets.randbelow(4000) + 100).hex().encode()
            bodies[rcpt] = f"Subject: to {rcpt}\r\n\r\n".encode() + body + b"\r\n"
            key = await storage.blobs.put(bodies[rcpt])
            await storage.queue.enqueue("someone@elsewhere.test", [rcpt], key)

        proc = await start_mtad(config, log_path.name)

        def stalled_twice() -> bool:
            if proc.returncode is not None:
                raise AssertionError(f"mtad exited: {log_path.read_text(errors='replace')}")
            return sink.stalls == 2

        # One worker per process: two deliveries stalled at once are two processes'.
        await eventually(stalled_twice, timeout=60)
        assert len(sink.stalled) == 2
        sink.stall_for = {}
        sink.end_stalls()

        async def all_done():
            entries = await storage.queue.list()
            return all(e.status == "done" for e in entries) and entries

        entries = await eventually(all_done, timeout=90)
    finally:
        if proc is not None and proc.returncode is None:
            proc.terminate()
            await proc.wait()
        await sink.close()
        await storage.close()

    copies = collections.Counter(r for got in sink.received for r in got.rcpt_to)
    assert copies == dict.fromkeys(rcpts, 1), "a message was delivered twice or not at all"
    for got in sink.received:
        [rcpt] = got.rcpt_to
        assert got.data.endswith(bodies[rcpt])
    assert len(entries) == len(rcpts)
    attempts = {e.recipients[0].address: e.attempts for e in entries}
    assert attempts == {r: 2 if r in STALLED else 1 for r in rcpts}
    # Both processes logged from their own pid ("[pid]" with server.processes).
    log = log_path.read_text(errors="replace")
    delivered = re.findall(r"\[(\d+)\] INFO \S+: queue entry \S+: to=<([^>]+)> delivered", log)
    assert sorted(r for _pid, r in delivered) == sorted(rcpts)
    assert len(re.findall(r"shardmail ready", log)) >= 2, log[-2000:]
