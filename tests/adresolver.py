"""A stand-in validating resolver for DANE tests: it forwards to a dnsmasq
(tests/dnsserver.py) and sets the AD bit on the answers, as a DNSSEC-
validating resolver (unbound, say) does for a signed zone.

dnsmasq sets AD only on answers it validated from a signed upstream zone
(``--dnssec``) or copies it from one (``--proxy-dnssec``); its own records
(``--host-record``, ``--dns-rr``) are never validated, and signing a zone
needs an authoritative server beside it. So the tests put this small UDP
forwarder in front: names under ``insecure`` come back without AD (an
unsigned zone), names in ``servfail`` get SERVFAIL (a validation failure or
a broken zone), everything else with AD. Only 127.0.0.1, a thread of its own,
stopped by :meth:`close`.
"""

from __future__ import annotations

import socket
import threading

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype


class AdResolver:
    def __init__(
        self,
        upstream_port: int,
        *,
        insecure: tuple[str, ...] = (),
        servfail: tuple[str, ...] = (),
    ) -> None:
        self.upstream_port = upstream_port
        self.insecure = tuple(n.lower().rstrip(".") for n in insecure)
        self.servfail = {n.lower().rstrip(".") for n in servfail}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.queries: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="ad-resolver")
        self._thread.start()

    def settings(self, timeout: float = 2.0) -> dict[str, object]:
        """The ``[dns]`` section: this resolver, trusted to validate."""
        return {
            "nameservers": ["127.0.0.1"],
            "port": self.port,
            "timeout_seconds": timeout,
            "trust_ad": True,
        }

    def _answer(self, wire: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            return None
        name = query.question[0].name.to_text(omit_final_dot=True).lower()
        self.queries.append((name, dns.rdatatype.to_text(query.question[0].rdtype)))
        if name in self.servfail:
            response = dns.message.make_response(query)
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()
        response = dns.query.udp(query, "127.0.0.1", port=self.upstream_port, timeout=2)
        if any(name == n or name.endswith("." + n) for n in self.insecure):
            response.flags &= ~dns.flags.AD
        else:
            response.flags |= dns.flags.AD
        return response.to_wire()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                wire, peer = self.sock.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            try:
                answer = self._answer(wire)
            except Exception:
                answer = None
            if answer is not None:
                self.sock.sendto(answer, peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


__all__ = ["AdResolver"]
