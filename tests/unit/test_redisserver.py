"""tests/redisserver.py: a private redis-server per test session, never the
machine's own (port 6379), that tests can stop and start again."""

from __future__ import annotations

import socket

import pytest

from tests.redisserver import DEFAULT_PORT, RedisServer


def ping(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"PING\r\n")
        return s.recv(64)


def test_start_pause_resume_stop() -> None:
    server = RedisServer.start()
    try:
        assert server.port != DEFAULT_PORT
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        assert ping(server.port) == b"+PONG\r\n"
        server.pause()
        with pytest.raises(ConnectionRefusedError):
            ping(server.port)
        server.resume()
        assert ping(server.port) == b"+PONG\r\n"
        # No persistence: nothing is written to its directory.
        assert not list(server.root.glob("*.rdb")) and not list(server.root.glob("*.aof"))
    finally:
        server.stop()
    assert not server.root.exists()
