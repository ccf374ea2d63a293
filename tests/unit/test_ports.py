"""tests/ports.py: ports for the suite's servers never repeat and never lie
in the range the kernel hands to outgoing connections."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.ports import free_port, free_ports


def test_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = free_ports(200)
    assert len(set(ports)) == len(ports)
    assert all(port < low for port in ports)
    for port in ports[:20]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_a_port_in_use_is_never_handed_out() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        taken = busy.getsockname()[1]
        # A port bound to 0 lies in the ephemeral range; one of ours in use:
        port = free_port()
        with socket.socket() as ours:
            ours.bind(("127.0.0.1", port))
            assert all(p not in (port, taken) for p in free_ports(50))


def test_xdist_workers_pick_from_slices_of_their_own(monkeypatch) -> None:
    import tests.ports as ports

    seen: list[set[int]] = []
    for worker in ("gw0", "gw1", "gw2"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
        low, high = ports._range()
        picked = set(free_ports(30))
        assert all(low <= p <= high for p in picked)
        seen.append(picked)
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
