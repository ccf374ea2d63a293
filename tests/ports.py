"""Port numbers for the servers the tests start.

Contract: :func:`free_port` returns a port that

- is free for TCP and UDP on every address given (127.0.0.1 by default) when
  picked;
- was never returned before in this process, so two listeners of one test
  (an HTTP API and its metrics endpoint, say) never get the same number;
- lies below the kernel's ephemeral range (``ip_local_port_range``), so no
  outgoing connection on the machine can take it between the pick and the
  server's bind. Binding port 0 and closing, the usual trick, hands out a
  number from that very range: the next ``connect()`` of any process, or a
  listener another server binds to port 0, may get it first.

Under pytest-xdist each worker picks from a slice of its own
(``PYTEST_XDIST_WORKER``), so two workers never pick the same number. The
one race left is another process binding the same number by name in the
meantime; the tests' own servers all pick here.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

# Below 20000 lie the well-known and registered ports of services a test
# machine may run (PostgreSQL 5432, Redis 6379, ...).
LOWEST = 20000

_handed_out: set[int] = set()
# Not the module-level generator, which tests may seed.
_rng = random.SystemRandom()


def _ephemeral_low() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return max(low, LOWEST + 1000)


def _bindable(port: int, addresses: tuple[str, ...]) -> bool:
    for address in addresses:
        for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            with socket.socket(family, kind) as sock:
                try:
                    sock.bind((address, port))
                except OSError:
                    return False
    return True


def _range() -> tuple[int, int]:
    """This process's slice of ``LOWEST`` .. the ephemeral range (inclusive)."""
    low, high = LOWEST, _ephemeral_low() - 1
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if worker.startswith("gw") and worker[2:].isdigit() and count > 1:
        width = (high - low + 1) // count
        low += int(worker[2:]) * width
        high = low + width - 1
    return low, high


def free_port(addresses: tuple[str, ...] = ("127.0.0.1",)) -> int:
    """A port free on every one of ``addresses``, new to this process."""
    low, high = _range()
    for _ in range(1000):
        port = _rng.randint(low, high)
        if port not in _handed_out and _bindable(port, addresses):
            _handed_out.add(port)
            return port
    raise RuntimeError(f"no free port in {low}-{high} on {addresses}")


def free_ports(n: int, addresses: tuple[str, ...] = ("127.0.0.1",)) -> list[int]:
    """``n`` distinct ports, each as :func:`free_port` gives them."""
    return [free_port(addresses) for _ in range(n)]
