"""``mailctl queue`` and ``mailctl dkim`` against a real storage folder.

The commands are driven through an argparse parser built the way
mailctl/cli.py builds its own (``command(name, func, help)``), then run as
the CLI runs them (``args.func(args, settings)``, which opens storage with
``asyncio.run``): these tests are synchronous on purpose.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import dkim
import pytest

from mailctl.dkim_cmds import add_dkim_parser
from mailctl.queue_cmds import add_queue_parser
from tests.conftest import make_settings


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="mailctl")
    sub = root.add_subparsers(dest="command", required=True)

    def command(name, func, help):
        p = sub.add_parser(name, help=help)
        p.set_defaults(func=func)
        return p

    add_queue_parser(command)
    add_dkim_parser(command)
    return root


def run(settings, capsys, *argv: str) -> tuple[int, str, str]:
    args = parser().parse_args(argv)
    code = args.func(args, settings)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def settings(tmp_path: Path):
    return make_settings(tmp_path / "data", queue={"dkim_key_dir": str(tmp_path / "dkim")})


def seed(settings) -> list[int]:
    from storage import open_storage
    from storage.sql.queue import Outcome

    async def go() -> list[int]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        storage = await open_storage(settings.storage)
        try:
            key = await storage.blobs.put(
                b"From: a@example.net\r\nSubject: Queued one\r\n\r\nx\r\n"
            )
            q = storage.queue
            first = await q.enqueue("a@example.net", ["x@remote.test", "y@remote.test"], key)
            second = await q.enqueue("", ["z@remote.test"], key)
            [leased] = await q.lease_due("w", 1, 60)
            await q.record_attempt(
                leased.id,
                "w",
                {"x@remote.test": Outcome("deferred", "451 4.3.0 busy (host mx.remote.test)")},
                None,
            )
            await q.move_to_errors(second, "invalid address: junk")
            return [first, second]
        finally:
            await storage.close()

    return asyncio.run(go())


def test_queue_list_show_hold_release_retry_delete(settings, capsys) -> None:
    first, second = seed(settings)
    code, out, _ = run(settings, capsys, "queue", "list")
    assert code == 0
    assert "x@remote.test  (451 4.3.0 busy (host mx.remote.test))" in out
    assert "error: invalid address: junk" in out
    assert f"{second:>6}  error" in out and "<>" in out

    code, out, _ = run(settings, capsys, "queue", "show", str(first))
    assert code == 0 and "attempts:      1" in out and "Subject: Queued one" in out

    assert run(settings, capsys, "queue", "hold", str(first))[0] == 0
    assert f"{first:>6}  held" in run(settings, capsys, "queue", "list")[1]
    assert run(settings, capsys, "queue", "release", str(first))[0] == 0
    code, out, _ = run(settings, capsys, "queue", "retry", "--all")
    assert code == 0 and "2 queue entries due now" in out
    assert f"{second:>6}  queued" in run(settings, capsys, "queue", "list")[1]

    assert run(settings, capsys, "queue", "delete", str(second))[0] == 0
    code, _, err = run(settings, capsys, "queue", "delete", str(second))
    assert code == 1 and "no such queue entry: " in err
    code, _, err = run(settings, capsys, "queue", "show")
    assert code == 2 and "ID is required" in err


def test_dkim_generate_prints_a_record_that_verifies(settings, capsys) -> None:
    code, out, _ = run(settings, capsys, "dkim", "generate", "Example.NET")
    assert code == 0
    # In the directory, where every instance finds it, not in a host's folder.
    assert not Path(settings.queue.dkim_key_dir).exists()
    assert 'shardmail._domainkey.example.net. IN TXT ( "v=DKIM1; k=rsa; p=' in out
    value = out.split("(value: ", 1)[1].rsplit(")", 1)[0]
    code, again, _ = run(settings, capsys, "dkim", "show", "example.net")
    assert code == 0 and value in again
    assert run(settings, capsys, "dkim", "generate", "example.net")[0] == 1  # exists

    from mtad.outbound.signing import DkimSigner
    from storage import open_storage

    async def sign(message: bytes) -> bytes:
        storage = await open_storage(settings.storage)
        try:
            signer = DkimSigner(settings.queue.dkim_key_dir, "shardmail", storage.directory)
            return await signer.sign(message, "")
        finally:
            await storage.close()

    message = b"From: a@example.net\r\nTo: b@x.test\r\nSubject: s\r\n\r\nbody\r\n"
    signed = asyncio.run(sign(message))
    assert dkim.verify(signed, dnsfunc=lambda name, timeout=5: value.encode())


def test_queue_commands_see_every_shards_partition(tmp_path: Path, capsys) -> None:
    from storage import open_storage

    shard_b = f"sqlite+aiosqlite:///{tmp_path / 'shard-b.db'}"
    settings = make_settings(tmp_path / "data", storage={"shards": {"b": shard_b}})

    async def seed() -> list:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        storage = await open_storage(settings.storage, data_dir=settings.data_dir)
        try:
            key = await storage.blobs.put(b"From: a@example.net\r\nSubject: Sharded\r\n\r\nx\r\n")
            return [
                await storage.queue.partitions[name].enqueue(
                    "a@example.net", [f"{name}@remote.test"], key
                )
                for name in ("default", "b")
            ]
        finally:
            await storage.close()

    in_default, in_b = asyncio.run(seed())
    assert (str(in_default), str(in_b)) == ("1", "b:1")
    code, out, _ = run(settings, capsys, "queue", "list")
    assert code == 0
    assert "     1  queued" in out and "   b:1  queued" in out
    assert "default@remote.test" in out and "b@remote.test" in out

    assert run(settings, capsys, "queue", "hold", "b:1")[0] == 0
    code, out, _ = run(settings, capsys, "queue", "show", "b:1")
    assert code == 0 and "held:          yes" in out and "b@remote.test" in out
    code, out, _ = run(settings, capsys, "queue", "show", "1")
    assert code == 0 and "held:          no" in out and "default@remote.test" in out

    code, out, _ = run(settings, capsys, "queue", "stats")
    assert code == 0
    rows = {line.split()[0]: line.split()[1:5] for line in out.splitlines()[1:]}
    assert rows == {"default": ["1", "0", "0", "0"], "b": ["0", "0", "1", "0"]}

    code, out, _ = run(settings, capsys, "queue", "retry", "--all")
    assert code == 0 and "2 queue entries due now" in out
    assert run(settings, capsys, "queue", "delete", "b:1")[0] == 0
    code, _, err = run(settings, capsys, "queue", "show", "b:1")
    assert code == 1 and "no such queue entry: b:1" in err
    code, _, err = run(settings, capsys, "queue", "show", "b:one")
    assert code == 2 and "SHARD:NUMBER" in err


def test_queue_list_and_stats_name_a_partition_that_is_down(tmp_path: Path, capsys) -> None:
    from storage import open_storage
    from tests.pgserver import PgServer

    server = PgServer.start()
    try:
        shard_b = asyncio.run(server.create_database())
        settings = make_settings(tmp_path / "data", storage={"shards": {"b": shard_b}})

        async def seed() -> None:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            storage = await open_storage(settings.storage, data_dir=settings.data_dir)
            try:
                key = await storage.blobs.put(b"Subject: down\r\n\r\nx\r\n")
                for name in ("default", "b"):
                    part = storage.queue.partitions[name]
                    await part.enqueue("a@example.net", [f"{name}@remote.test"], key)
            finally:
                await storage.close()

        asyncio.run(seed())
    finally:
        server.stop()
    code, out, err = run(settings, capsys, "queue", "list")
    assert code == 1 and "Traceback" not in err
    assert "default@remote.test" in out and "b@remote.test" not in out
    assert "queue partition b: storage temporarily unavailable" in err
    code, out, err = run(settings, capsys, "queue", "stats")
    assert code == 1 and "queue partition b" in err
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["default"]
