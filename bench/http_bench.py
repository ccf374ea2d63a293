"""HTTP API benchmark: requests/s and server CPU per request for folder
listing, message list and message fetch, and push latency.

The server is the real daemon (``python -m httpapi``, one process, its
default event loop) in a process of its own; this process fills the storage
first and then drives the load over loopback with a small keep-alive HTTP/1.1
client written on raw asyncio streams (aiohttp's client costs more CPU per
request than the server under test, and both share this machine's cores).
Server CPU per request is read from ``/proc/<pid>/stat`` (every thread of
the server process, user + system) over each test: the figure that
transfers to a machine where the client runs elsewhere (2,000 req/s is
0.5 ms per request on one core). Storage is throwaway: SQLite in a temp
dir, or a ``tests.pgserver`` PostgreSQL; ``--backend sqlite,postgresql``
runs both in the same run. Not part of the test run.

    python bench/http_bench.py --messages 500 --seconds 5 --concurrency 16 \\
        --backend sqlite,postgresql
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import argon2  # noqa: E402

from storage.backend import open_storage_from_url  # noqa: E402
from storage.ingest import Delivery, ingest  # noqa: E402

PASSWORD = "bench password"
MAX_REQUESTS = 500_000
READY_LINE = "shardmail ready"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def message(i: int) -> bytes:
    return (
        f"From: Sender {i} <sender{i}@remote.test>\r\nTo: bench@example.test\r\n"
        f"Subject: Benchmark message {i}\r\nMessage-ID: <bench{i}@remote.test>\r\n"
        f"Date: Mon, 01 Jan 2024 00:00:00 +0000\r\n\r\n" + "Body line of text.\r\n" * 40
    ).encode()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU of every thread of ``pid`` so far (proc(5) fields 14, 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """One request on a keep-alive connection; the answer's status (body read and dropped)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return status


async def hammer(port: int, paths: list[str], token: str, seconds: float,
                 concurrency: int, limit: int = MAX_REQUESTS) -> tuple[int, list[float], float]:
    """Requests cycling through ``paths`` for ``seconds`` or ``limit``
    requests; the count, latencies and elapsed seconds."""
    requests = [
        (f"GET {p} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\r\n").encode()
        for p in paths
    ]
    begun = time.monotonic()
    deadline = begun + seconds
    latencies: list[float] = []
    count = 0

    async def worker(offset: int) -> None:
        nonlocal count
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = offset
        try:
            while time.monotonic() < deadline and count < limit:
                started = time.monotonic()
                status = await get(reader, writer, requests[i % len(requests)])
                assert status == 200, status
                latencies.append(time.monotonic() - started)
                count += 1
                i += concurrency
        finally:
            writer.close()

    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return count, latencies, time.monotonic() - begun


def report(name: str, count: int, latencies: list[float], seconds: float,
           user: float, system: float) -> None:
    lat = sorted(latencies)
    p50 = lat[len(lat) // 2] * 1000 if lat else 0.0
    p99 = lat[int(len(lat) * 0.99)] * 1000 if lat else 0.0
    per_request = (user + system) / count * 1000 if count else 0.0
    per_core = 1000 / per_request if per_request else 0.0
    print(f"{name:<15} {count / seconds:8.1f} req/s  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  "
          f"server CPU {per_request:5.3f} ms/req (user {user / max(count, 1) * 1000:5.3f}, "
          f"{per_core:5.0f} req/s per core)")


async def fill(url: str, blob_dir: Path, messages: int) -> None:
    storage = await open_storage_from_url(
        url, blob_dir,
        password_hasher=argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST),
    )
    try:
        await storage.directory.add_domain("example.test")
        account = await storage.directory.add_account("bench@example.test", PASSWORD)
        for i in range(messages):
            await ingest(storage, [Delivery(account, "INBOX")], message(i))
    finally:
        await storage.close()


def start_server(base: Path, url: str, port: int) -> subprocess.Popen[str]:
    config = base / "bench.toml"
    config.write_text(
        f'[server]\ndata_dir = "{base / "data"}"\nlog_level = "WARNING"\n'
        'metrics_listen = []\nprocesses = 1\n'
        f'[storage]\nurl = "{url}"\nblob_dir = "{base / "blobs"}"\n'
        f'[http]\nlisten = ["127.0.0.1:{port}"]\nrate_limit_per_user = 0\n'
        'rate_limit_per_ip = 0\nmax_connections_per_ip = 0\n'
    )
    server = subprocess.Popen(
        [sys.executable, "-m", "httpapi", "-c", str(config)],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )
    assert server.stderr is not None
    for line in server.stderr:
        if READY_LINE in line:
            return server
        sys.stderr.write(line)
    raise SystemExit(f"httpapi exited with {server.wait()} before it was ready")


async def push_latency(storage_url: str, blob_dir: Path, root: str, token: str,
                       pushes: int) -> list[float]:
    """Deliveries made here (another process) reaching the server's WebSocket."""
    storage = await open_storage_from_url(storage_url, blob_dir)
    account = await storage.directory.get_account("bench@example.test")
    found: list[float] = []
    try:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(root.replace("http", "ws") + "/v1/events")
            await ws.send_json({"type": "auth", "token": token})
            await ws.receive_json()
            for i in range(pushes):
                started = time.monotonic()
                await ingest(storage, [Delivery(account, "INBOX")], message(100_000 + i))
                while True:
                    frame = await ws.receive_json(timeout=5)
                    if frame["type"] == "event" and frame["event"]["kind"] == "new":
                        break
                found.append(time.monotonic() - started)
            await ws.close()
    finally:
        await storage.close()
    return found


async def drive(args: argparse.Namespace, pid: int, port: int, url: str, blob_dir: Path) -> None:
    root = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        async with session.post(root + "/v1/login", json={
                "address": "bench@example.test", "password": PASSWORD}) as resp:
            token = (await resp.json())["token"]
        headers = {"Authorization": f"Bearer {token}"}
        async with session.get(root + "/v1/folders", headers=headers) as resp:
            listing = await resp.json()
            assert "folders" in listing, listing
            inbox = listing["folders"][0]["id"]
        ids: list[str] = []
        query = "limit=200"
        while query:
            async with session.get(f"{root}/v1/folders/{inbox}/messages?{query}",
                                   headers=headers) as resp:
                page = await resp.json()
            ids += [m["id"] for m in page["messages"]]
            query = f"limit=200&cursor={page['next_cursor']}" if page["next_cursor"] else ""
    # "message fetch" reads the newest 200 again and again (after one pass
    # that is not measured); "first read" reads each of the others once.
    warm, cold = ids[:200], ids[200:]
    await hammer(port, [f"/v1/messages/{i}" for i in warm], token, 60, args.concurrency,
                 len(warm))
    tests = [
        ("folder listing", ["/v1/folders"], MAX_REQUESTS),
        ("message list", [f"/v1/folders/{inbox}/messages?limit=50"], MAX_REQUESTS),
        ("message fetch", [f"/v1/messages/{i}" for i in warm], MAX_REQUESTS),
        ("first read", [f"/v1/messages/{i}" for i in cold], len(cold)),
    ]
    for name, paths, limit in tests:
        if not paths:
            continue
        user, system = cpu_seconds(pid)
        count, lat, elapsed = await hammer(port, paths, token, args.seconds, args.concurrency,
                                           limit)
        user_after, system_after = cpu_seconds(pid)
        report(name, count, lat, elapsed, user_after - user, system_after - system)
    if args.pushes:
        pushes = await push_latency(url, blob_dir, root, token, args.pushes)
        print(f"{'push latency':<15} deliver->WebSocket over {len(pushes)} messages: "
              f"median {statistics.median(pushes) * 1000:.2f} ms, "
              f"max {max(pushes) * 1000:.2f} ms (includes the ingest commit)")


def run_backend(args: argparse.Namespace, url: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        url = url or f"sqlite+aiosqlite:///{base / 'db.sqlite'}"
        asyncio.run(fill(url, base / "blobs", args.messages))
        port = free_port()
        server = start_server(base, url, port)
        try:
            asyncio.run(drive(args, server.pid, port, url, base / "blobs"))
        finally:
            server.terminate()
            server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--pushes", type=int, default=50)
    parser.add_argument("--backend", default="sqlite",
                        help="sqlite, postgresql, or both comma-separated (same run)")
    parser.add_argument("--storage-url", default="", help="an empty database to use")
    args = parser.parse_args()
    print(f"{args.messages} messages, {args.concurrency} concurrent clients, "
          f"{args.seconds:.0f} s per test, load {os.getloadavg()[0]:.2f}")
    for backend in args.backend.split(","):
        if backend not in ("sqlite", "postgresql"):
            parser.error(f"unknown backend {backend!r}")
        print(f"--- {backend}")
        if backend == "sqlite" or args.storage_url:
            run_backend(args, args.storage_url if backend == "postgresql" else "")
            continue
        from tests.pgserver import PgServer

        pg = PgServer.start()
        try:
            run_backend(args, asyncio.run(pg.create_database()))
        finally:
            pg.stop()


if __name__ == "__main__":
    main()
