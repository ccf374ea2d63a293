"""BDAT chunks refused for size: what reading and discarding them costs, and
whether the event loop stays free meanwhile (RFC 3030 section 2).

A chunk over ``server.max_message_size`` is read to its end and dropped
before the 552 (RFC 3030 section 2: the receiver "MUST accept and discard
the associated message data"). This starts an mtad (``python -m mtad``,
the MX only, SPF/DKIM off, an empty-zone dnsmasq for its DMARC lookups)
with a 1 MiB size limit and, for each size in ``--sizes`` (MiB), sends a
transaction whose message is that many octets of random bytes:

- ``one``: a single chunk (``BDAT <size> LAST``), over the limit by itself;
- ``many``: 1 MiB chunks, all pipelined, the last with LAST; the first
  chunk past the limit fails the transaction and the rest are discarded
  too (the path that also exists before this change).

For each it reports the wall time from the first octet to the 552, the
rate, mtad's CPU seconds (utime + stime from /proc), and the worst reply
time of a second session sending NOOP every 5 ms during the discard (the
event loop is shared: a loop held by the discard shows here). The client
sends from a thread with ``socket.sendall`` of one reused buffer.

``--tree`` runs the mtad of another source tree (a ``git archive`` of the
base commit) for a paired A/B; an mtad that closes the connection at the
BDAT line (the base, on ``one``) is reported as such.

    python bench/bdat_discard_bench.py --sizes 64,128,256
    python bench/bdat_discard_bench.py --sizes 64,128,256 --tree /tmp/base
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.smtp_bench import cpu_seconds, drain, free_port, mtad_argv, prepare  # noqa: E402
from tests.dnsserver import Zone, start_dns_server, stop_dns_server  # noqa: E402

MIB = 1024 * 1024
RCPT = "user@bench.example"


def reply(lines: BinaryIO) -> bytes:
    """One whole SMTP reply (its last line), or b"" if the peer closed."""
    while line := lines.readline():
        if line[3:4] != b"-":
            return line.rstrip(b"\r\n")
    return b""


def transaction(port: int, size: int, shape: str) -> tuple[float, bytes]:
    """Sends one over-limit message as ``shape``; the seconds from the first
    chunk octet to the final reply, and that reply."""
    block = random.randbytes(MIB)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=120) as sock,
        sock.makefile("rb") as lines,
    ):
        reply(lines)
        for line in (
            b"EHLO bench.example",
            b"MAIL FROM:<a@bench.example>",
            f"RCPT TO:<{RCPT}>".encode(),
        ):
            sock.sendall(line + b"\r\n")
            reply(lines)
        start = time.perf_counter()
        try:
            if shape == "one":
                sock.sendall(f"BDAT {size} LAST\r\n".encode())
                for _ in range(size // MIB):
                    sock.sendall(block)
                replies = [reply(lines)]
            else:
                for n in range(size // MIB):
                    last = " LAST" if n == size // MIB - 1 else ""
                    sock.sendall(f"BDAT {MIB}{last}\r\n".encode() + block)
                replies = [reply(lines) for _ in range(size // MIB)]
        except OSError:
            replies = [b"closed while sending"]
        return time.perf_counter() - start, replies[-1]


async def probe(port: int, stop: asyncio.Event) -> float:
    """NOOP every 5 ms until ``stop``; the longest reply time seen."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reader.readline()
    worst = 0.0
    try:
        while not stop.is_set():
            start = time.perf_counter()
            writer.write(b"NOOP\r\n")
            await reader.readline()
            worst = max(worst, time.perf_counter() - start)
            await asyncio.sleep(0.005)
    finally:
        writer.close()
    return worst


async def measure(port: int, pid: int, size: int, shape: str) -> str:
    stop = asyncio.Event()
    prober = asyncio.create_task(probe(port, stop))
    cpu = cpu_seconds(pid)
    elapsed, last = await asyncio.to_thread(transaction, port, size * MIB, shape)
    cpu = cpu_seconds(pid) - cpu
    stop.set()
    worst = await prober
    if not last.startswith(b"552"):
        return f"{shape:4} {size:5} MiB: {last.decode(errors='replace')[:60]}"
    return (
        f"{shape:4} {size:5} MiB: {elapsed:6.2f} s, {size / elapsed:7.1f} MiB/s,"
        f" mtad CPU {cpu:5.2f} s ({1000 * cpu / size:.2f} ms/MiB),"
        f" worst NOOP {1000 * worst:.1f} ms"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,128,256", help="MiB, comma-separated")
    parser.add_argument("--tree", type=Path, default=REPO, help="source tree of the mtad to run")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()}; mtad from {args.tree}")
    with tempfile.TemporaryDirectory(prefix="bdat-bench-") as tmp:
        data = Path(tmp) / "data"
        await prepare(data, RCPT, [])
        dns = await asyncio.to_thread(start_dns_server, Zone())
        port = free_port()
        argv = mtad_argv(data, port, dns.port, 4, spf_dkim=False)
        argv += ["-o", f"server.max_message_size={MIB}"]
        env = {**os.environ, "PYTHONPATH": str(args.tree)}
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=args.tree, env=env, stderr=asyncio.subprocess.PIPE
        )
        try:
            assert proc.stderr is not None
            while line := await asyncio.wait_for(proc.stderr.readline(), 60):
                if line.startswith(b"shardmail ready"):
                    break
            drainer = asyncio.create_task(drain(proc.stderr))
            for size in (int(s) for s in args.sizes.split(",")):
                for shape in ("one", "many"):
                    print(await measure(port, proc.pid, size, shape), flush=True)
        finally:
            proc.terminate()
            await proc.wait()
            drainer.cancel()
            stop_dns_server(dns)


if __name__ == "__main__":
    asyncio.run(main())
