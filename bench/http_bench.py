"""HTTP API benchmark: requests/s for folder listing and message fetch, and push latency.

Runs everything on loopback against a throwaway storage: SQLite in a temp
dir, or with ``--backend postgresql`` a throwaway ``tests.pgserver``
server (``--storage-url`` names another database); bounded in time and
request count. Not part of the test run.

    python bench/http_bench.py --messages 500 --seconds 5 --concurrency 16
    python bench/http_bench.py --messages 500 --seconds 5 --concurrency 16 --backend postgresql
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import argon2

from conf.settings import Settings
from httpapi.service import start
from storage.backend import open_storage_from_url
from storage.ingest import Delivery, ingest

PASSWORD = "bench password"
MAX_REQUESTS = 200_000


def message(i: int) -> bytes:
    return (
        f"From: Sender {i} <sender{i}@remote.test>\r\nTo: bench@example.test\r\n"
        f"Subject: Benchmark message {i}\r\nMessage-ID: <bench{i}@remote.test>\r\n"
        f"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n\r\n" + "Body line of text.\r\n" * 40
    ).encode()


async def hammer(session: aiohttp.ClientSession, urls: list[str], headers: dict[str, str],
                 seconds: float, concurrency: int) -> tuple[int, list[float]]:
    deadline = time.monotonic() + seconds
    latencies: list[float] = []
    count = 0

    async def worker(offset: int) -> None:
        nonlocal count
        i = offset
        while time.monotonic() < deadline and count < MAX_REQUESTS:
            started = time.monotonic()
            async with session.get(urls[i % len(urls)], headers=headers) as resp:
                await resp.read()
                assert resp.status == 200, resp.status
            latencies.append(time.monotonic() - started)
            count += 1
            i += concurrency

    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return count, latencies


def report(name: str, count: int, latencies: list[float], seconds: float) -> None:
    lat = sorted(latencies)
    p50 = lat[len(lat) // 2] * 1000 if lat else 0.0
    p99 = lat[int(len(lat) * 0.99)] * 1000 if lat else 0.0
    print(f"{name:<16} {count / seconds:9.1f} req/s   p50 {p50:7.2f} ms   p99 {p99:7.2f} ms")


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        storage = await open_storage_from_url(
            args.storage_url or f"sqlite+aiosqlite:///{base / 'db.sqlite'}", base / "blobs",
            password_hasher=argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST),
        )
        await storage.directory.add_domain("example.test")
        account = await storage.directory.add_account("bench@example.test", PASSWORD)
        for i in range(args.messages):
            await ingest(storage, [Delivery(account, "INBOX")], message(i))
        settings = Settings.model_validate({
            "server": {"data_dir": str(base / "data")},
            "http": {"listen": ["127.0.0.1:0"], "rate_limit_per_user": 0, "rate_limit_per_ip": 0},
        })
        service = await start(settings, storage, None)
        root = f"http://127.0.0.1:{service.ports[0]}"
        try:
            async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=args.concurrency)
            ) as session:
                async with session.post(root + "/v1/login", json={
                        "address": account.address, "password": PASSWORD}) as resp:
                    token = (await resp.json())["token"]
                headers = {"Authorization": f"Bearer {token}"}
                async with session.get(root + "/v1/folders", headers=headers) as resp:
                    inbox = (await resp.json())["folders"][0]["id"]
                async with session.get(f"{root}/v1/folders/{inbox}/messages?limit=200",
                                       headers=headers) as resp:
                    ids = [m["id"] for m in (await resp.json())["messages"]]
                print(f"{args.messages} messages, {args.concurrency} concurrent clients, "
                      f"{args.seconds:.0f} s per test")
                count, lat = await hammer(session, [root + "/v1/folders"], headers,
                                          args.seconds, args.concurrency)
                report("folder listing", count, lat, args.seconds)
                count, lat = await hammer(
                    session, [f"{root}/v1/folders/{inbox}/messages?limit=50"], headers,
                    args.seconds, args.concurrency)
                report("message list", count, lat, args.seconds)
                count, lat = await hammer(session, [f"{root}/v1/messages/{i}" for i in ids],
                                          headers, args.seconds, args.concurrency)
                report("message fetch", count, lat, args.seconds)

                ws = await session.ws_connect(root.replace("http", "ws") + "/v1/events")
                await ws.send_json({"type": "auth", "token": token})
                await ws.receive_json()
                pushes: list[float] = []
                for i in range(args.pushes):
                    started = time.monotonic()
                    await ingest(storage, [Delivery(account, "INBOX")], message(100_000 + i))
                    while True:
                        frame = await ws.receive_json(timeout=5)
                        if frame["type"] == "event" and frame["event"]["kind"] == "new":
                            break
                    pushes.append(time.monotonic() - started)
                await ws.close()
                print(f"{'push latency':<16} deliver->WebSocket over {len(pushes)} messages: "
                      f"median {statistics.median(pushes) * 1000:.2f} ms, "
                      f"max {max(pushes) * 1000:.2f} ms (includes the ingest commit)")
        finally:
            await service.close()
            await storage.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--pushes", type=int, default=50)
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--storage-url", default="", help="an empty database to use")
    arguments = parser.parse_args()
    if arguments.backend == "postgresql" and not arguments.storage_url:
        from tests.pgserver import PgServer

        server = PgServer.start()
        try:
            arguments.storage_url = asyncio.run(server.create_database())
            asyncio.run(main(arguments))
        finally:
            server.stop()
    else:
        asyncio.run(main(arguments))
