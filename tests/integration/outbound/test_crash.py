"""SIGKILL a worker process mid-delivery: nothing is lost.

Two real ``python -m mtad`` processes share one SQLite queue. The first
leases two entries and is killed while one delivery waits for the DATA go-ahead
and the other waits for the reply to its final dot. The second process takes
both once the first one's lease expires and delivers them. The message whose
final dot had reached the peer arrives twice: that is the unavoidable
at-least-once window (RFC 5321 section 6.1 puts the duplicate on the sender's
side rather than a loss), and it is counted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from conf.settings import load_settings
from storage import open_storage
from tests.dnsserver import DnsServer
from tests.integration.outbound.conftest import CRASH_IP, eventually
from tests.integration.outbound.sink import SinkServer

REPO = Path(__file__).resolve().parents[3]
LEASE_SECONDS = 3


def write_config(path: Path, data_dir: Path, dns: DnsServer, relay_port: int) -> Path:
    path.write_text(
        f'[server]\nhostname = "mail.test"\ndata_dir = "{data_dir}"\n'
        f'[dns]\nnameservers = ["127.0.0.1"]\nport = {dns.port}\ntimeout_seconds = 2.0\n'
        '[smtp]\nmx_listen = ["127.0.0.1:0"]\nsubmission_listen = ["127.0.0.1:0"]\n'
        'submissions_listen = ["127.0.0.1:0"]\n'
        f"[queue]\nworkers = 2\nsmtp_port = {relay_port}\nlease_seconds = {LEASE_SECONDS}\n"
        "retry_schedule_seconds = [1]\npoll_interval_seconds = 0.2\n"
        "connect_timeout_seconds = 2.0\ncommand_timeout_seconds = 30.0\n"
    )
    return path


async def start_mtad(config: Path, log_name: str) -> asyncio.subprocess.Process:
    log_path = config.parent / log_name
    with log_path.open("ab") as log:  # a file: a full pipe would stall mtad
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mtad",
            "-c",
            str(config),
            cwd=REPO,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log,
        )

    def ready() -> bool:
        if proc.returncode is not None:
            raise AssertionError(f"mtad exited: {log_path.read_text(errors='replace')}")
        return "shardmail ready" in log_path.read_text(errors="replace")

    await eventually(ready, timeout=30)
    return proc


async def test_sigkill_mid_delivery_loses_nothing(
    tmp_path: Path, relay_dns: DnsServer, relay_port: int
) -> None:
    data_dir = tmp_path / "data"
    config = write_config(tmp_path / "shardmail.toml", data_dir, relay_dns, relay_port)
    settings = load_settings(str(config))
    data_dir.mkdir()
    storage = await open_storage(settings.storage)
    procs: list[asyncio.subprocess.Process] = []
    sink = SinkServer(
        CRASH_IP,
        relay_port,
        stall_for={"before-data@crash.test": "data", "after-dot@crash.test": "dot"},
    )
    await sink.start()
    try:
        ids = {}
        for rcpt in ("before-data@crash.test", "after-dot@crash.test"):
            key = await storage.blobs.put(f"Subject: for {rcpt}\r\n\r\nbody\r\n".encode())
            ids[rcpt] = await storage.queue.enqueue("someone@elsewhere.test", [rcpt], key)

        first = await start_mtad(config, "first.log")
        procs.append(first)
        await eventually(lambda: sink.stalls == 2, timeout=30)  # both mid-delivery
        os.kill(first.pid, signal.SIGKILL)
        await first.wait()
        leased = {e.id: e for e in await storage.queue.list()}
        assert all(e.lease_owner and e.status == "queued" for e in leased.values())
        lease_until = max(e.lease_until.timestamp() for e in leased.values())
        assert [r.rcpt_to for r in sink.received] == [["after-dot@crash.test"]]

        sink.stall_for = {}
        second = await start_mtad(config, "second.log")
        procs.append(second)

        async def all_done():
            entries = await storage.queue.list()
            return all(e.status == "done" for e in entries) and entries

        entries = await eventually(all_done, timeout=30)
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()
        await sink.close()
        await storage.close()

    copies = {rcpt: sum(rcpt in r.rcpt_to for r in sink.received) for rcpt in ids}
    duplicates = sum(n - 1 for n in copies.values())
    print(f"deliveries per message {copies}; duplicates {duplicates}")
    assert copies == {"before-data@crash.test": 1, "after-dot@crash.test": 2}
    assert duplicates == 1  # only the message whose final dot had been sent
    # The survivor waited for the dead worker's lease to expire.
    assert min(sink.received_at[1:]) >= lease_until - 0.05
    for entry in entries:
        assert entry.attempts == 2
        assert entry.recipients[0].status == "delivered"
    assert time.time() - lease_until < 30
