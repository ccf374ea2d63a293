"""POP3 RETR throughput: messages per second for 5 KB messages.

Fills a fresh SQLite storage (in a temporary directory) with ``--messages``
messages of about 5 KB, starts the POP3 server on loopback and downloads
them all with RETR from ``--clients`` concurrent sessions (one account
each, since a maildrop allows one session), optionally pipelining
``--pipeline`` RETRs at a time (RFC 2449 PIPELINING). Never part of the
test run::

    python -m bench.pop3_bench --messages 2000 --clients 4 --pipeline 16 [--tls]
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from conf.settings import Settings
from imapd.pop3.server import start_pop3_service

PASSWORD = "bench password"


def message(i: int, size: int = 5 * 1024) -> bytes:
    header = (
        f"From: Bench <bench@example.net>\r\nTo: user@example.org\r\n"
        f"Subject: message {i}\r\nMessage-ID: <{i}@bench.example.net>\r\n\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog. 0123456789 abcdefghij\r\n"
    body = (line * (size // len(line) + 1))[: size - len(header)]
    return header + body


async def fill(storage, clients: int, per_client: int) -> None:
    from storage.ingest import Delivery, ingest

    await storage.directory.add_domain("example.org")
    for c in range(clients):
        account = await storage.directory.add_account(f"user{c}@example.org", PASSWORD)
        for i in range(per_client):
            await ingest(storage, [Delivery(account, "INBOX")], message(i))


async def download(port: int, login: str, count: int, pipeline: int, tls) -> int:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=tls, server_hostname="localhost" if tls else None, limit=1 << 22
    )
    await reader.readline()
    writer.write(f"USER {login}\r\nPASS {PASSWORD}\r\n".encode())
    await reader.readline()
    assert (await reader.readline()).startswith(b"+OK"), "login failed"
    octets = 0
    for start in range(1, count + 1, pipeline):
        batch = range(start, min(start + pipeline, count + 1))
        writer.write(b"".join(b"RETR %d\r\n" % n for n in batch))
        for _ in batch:
            status = await reader.readline()
            assert status.startswith(b"+OK"), status
            octets += len(await reader.readuntil(b"\r\n.\r\n"))
    writer.write(b"QUIT\r\n")
    await reader.readline()
    writer.close()
    return octets


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="total messages")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--pipeline", type=int, default=16)
    parser.add_argument("--tls", action="store_true", help="implicit TLS (needs trustme)")
    args = parser.parse_args()
    per_client = args.messages // args.clients

    with tempfile.TemporaryDirectory() as tmp:
        import argon2

        from storage.backend import open_storage_from_url

        storage = await open_storage_from_url(
            f"sqlite+aiosqlite:///{tmp}/db.sqlite",
            Path(tmp) / "blobs",
            password_hasher=argon2.PasswordHasher.from_parameters(argon2.profiles.CHEAPEST),
        )
        server_tls = client_tls = None
        if args.tls:
            import trustme

            ca = trustme.CA()
            server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ca.issue_cert("localhost", "127.0.0.1").configure_cert(server_tls)
            client_tls = ssl.create_default_context()
            ca.configure_trust(client_tls)
        settings = Settings.model_validate(
            {
                "server": {"data_dir": tmp},
                "auth": {"allow_plaintext": True},
                "pop3": {"listen": ["127.0.0.1:0"], "tls_listen": ["127.0.0.1:0"]},
            }
        )
        t0 = time.perf_counter()
        await fill(storage, args.clients, per_client)
        print(f"filled {args.clients * per_client} messages in {time.perf_counter() - t0:.1f}s")
        service = await start_pop3_service(
            settings, storage, server_tls or ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        )
        port = service.ports[1] if args.tls else service.ports[0]
        try:
            t0 = time.perf_counter()
            octets = await asyncio.gather(
                *(
                    download(port, f"user{c}@example.org", per_client, args.pipeline, client_tls)
                    for c in range(args.clients)
                )
            )
            elapsed = time.perf_counter() - t0
        finally:
            await service.close()
            await storage.close()
    total = args.clients * per_client
    print(
        f"RETR {total} x 5 KB in {elapsed:.2f}s: {total / elapsed:.0f} messages/s, "
        f"{sum(octets) / elapsed / 1e6:.1f} MB/s "
        f"({args.clients} sessions, pipeline {args.pipeline}, {'TLS' if args.tls else 'plain'})"
    )


if __name__ == "__main__":
    asyncio.run(main())
