"""No mail is lost: a 250 to end of data means the message is durable.

mtad runs as a real process (``python -m mtad -c FILE -o ...``), is killed
with SIGKILL right after the 250, restarted, and the recipient's INBOX must
hold the message.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from storage import open_storage
from tests.conftest import copy_test_storage, make_settings
from tests.dnsserver import DnsServer
from tests.ports import free_port
from tests.protocol.smtp.support import ALICE, SmtpDialogue, mailbox_messages, message

REPO = Path(__file__).resolve().parents[3]



async def start_mtad(config: Path, ports: dict[str, int]) -> asyncio.subprocess.Process:
    log = (config.parent / "mtad.log").open("ab")  # a file: a full pipe would stall mtad
    overrides = [
        f"smtp.mx_listen=['127.0.0.1:{ports['mx']}']",
        f"smtp.submission_listen=['127.0.0.1:{ports['submission']}']",
        f"smtp.submissions_listen=['127.0.0.1:{ports['submissions']}']",
    ]
    argv = [sys.executable, "-m", "mtad", "-c", str(config)]
    for item in overrides:
        argv += ["-o", item]
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=REPO, stdout=asyncio.subprocess.DEVNULL, stderr=log
    )
    log.close()
    deadline = asyncio.get_running_loop().time() + 30
    while asyncio.get_running_loop().time() < deadline:
        if proc.returncode is not None:
            err = (config.parent / "mtad.log").read_text(errors="replace")
            raise AssertionError(f"mtad exited: {err}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", ports["mx"])
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        return proc
    proc.kill()
    raise AssertionError("mtad did not start listening")


def mtad_site(
    tmp_path: Path, dns: DnsServer, template: Path, server_extra: str = ""
) -> tuple[Path, Path, dict[str, int]]:
    """A data dir copied from ``template``, a config file naming it (plus
    ``server_extra`` lines in [server]) and free ports: (config, data_dir, ports)."""
    data_dir = tmp_path / "data"
    settings = make_settings(data_dir)
    copy_test_storage(template, settings)  # SHARDMAIL_TEST_BACKEND=postgresql: its database
    storage = f'[storage]\nurl = "{settings.storage.url}"\n'
    config = tmp_path / "shardmail.toml"
    config.write_text(
        f'[server]\nhostname = "mail.test"\ndata_dir = "{data_dir}"\n{server_extra}'
        f'[dns]\nnameservers = ["127.0.0.1"]\nport = {dns.port}\n{storage}'
    )
    ports = {name: free_port() for name in ("mx", "submission", "submissions")}
    return config, data_dir, ports


async def stop_mtad(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL if it has not stopped within 15 s."""
    proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), 15)
    except TimeoutError:
        proc.kill()
        await proc.wait()


async def test_sigkill_after_250_loses_nothing(
    tmp_path: Path, dns: DnsServer, populated_template: Path
) -> None:
    config, data_dir, ports = mtad_site(tmp_path, dns, populated_template)
    body = message(subject="Survives SIGKILL")

    proc = await start_mtad(config, ports)
    try:
        async with await SmtpDialogue.open(ports["mx"]) as client:
            await client.reply()
            await client.cmd("EHLO client.example")
            await client.cmd("MAIL FROM:<someone@spf-pass.example>")
            await client.cmd(f"RCPT TO:<{ALICE}>")
            await client.cmd("DATA")
            await client.send(body + b".\r\n")
            reply = await client.reply()
            os.kill(proc.pid, signal.SIGKILL)  # right after the 250
            assert reply.startswith("250 2.0.0"), reply
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    assert proc.returncode == -signal.SIGKILL

    proc = await start_mtad(config, ports)
    try:
        async with await SmtpDialogue.open(ports["mx"]) as client:
            assert (await client.reply()).startswith("220")
        settings = make_settings(data_dir)
        store = await open_storage(settings.storage)
        try:
            [raw] = await mailbox_messages(store, ALICE)
            assert raw.endswith(body)
        finally:
            await store.close()
    finally:
        await stop_mtad(proc)
    assert proc.returncode == 0
