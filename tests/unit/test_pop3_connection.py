"""The POP3 connection's line reader: limits, overlong lines, EOF, back-pressure."""

from __future__ import annotations

import asyncio

import pytest

from imapd.pop3.connection import READ_HIGH_WATER, Connection, LineTooLong


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.paused = False
        self.closing = False

    def write(self, data) -> None:
        self.written += data

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name, default=None):
        return {"peername": ("192.0.2.1", 1100)}.get(name, default)


def connect() -> tuple[Connection, FakeTransport]:
    conn = Connection(lambda c: None)
    transport = FakeTransport()
    conn.connection_made(transport)
    return conn, transport


async def test_lines_across_packets():
    conn, _ = connect()
    for part in (b"US", b"ER a\r", b"\nPASS b\r\nQU", b"IT\n"):
        conn.data_received(part)
    assert [await conn.readline(512) for _ in range(3)] == [b"USER a\r\n", b"PASS b\r\n", b"QUIT\n"]
    assert conn.peer_ip == "192.0.2.1" and not conn.is_tls


async def test_overlong_line_is_dropped_up_to_its_end():
    conn, _ = connect()
    conn.data_received(b"X" * 300)
    conn.data_received(b"Y" * 300)  # still the same line, past the limit
    conn.data_received(b"Z\r\nNOOP\r\n")
    with pytest.raises(LineTooLong):
        await conn.readline(512)
    assert await conn.readline(512) == b"NOOP\r\n"


async def test_line_exactly_at_the_limit():
    conn, _ = connect()
    conn.data_received(b"A" * 510 + b"\r\n" + b"B" * 511 + b"\r\n")
    assert len(await conn.readline(512)) == 512
    with pytest.raises(LineTooLong):
        await conn.readline(512)


async def test_eof_drops_partial_line():
    conn, _ = connect()
    conn.data_received(b"QUIT")
    conn.eof_received()
    with pytest.raises(EOFError):
        await conn.readline(512)


async def test_reader_waits_for_data():
    conn, _ = connect()
    pending = asyncio.create_task(conn.readline(512))
    await asyncio.sleep(0)
    assert not pending.done()
    conn.data_received(b"STAT\r\n")
    assert await pending == b"STAT\r\n"


async def test_pipelined_flood_pauses_reading():
    conn, transport = connect()
    conn.data_received(b"NOOP\r\n" * (READ_HIGH_WATER // 6 + 10))
    assert transport.paused
    while transport.paused:
        await conn.readline(512)
    assert await conn.readline(512) == b"NOOP\r\n"


async def test_drain_waits_for_resume_and_fails_when_closed():
    conn, transport = connect()
    conn.pause_writing()
    waiter = asyncio.create_task(conn.drain())
    await asyncio.sleep(0)
    assert not waiter.done()
    conn.resume_writing()
    await waiter
    transport.closing = True
    with pytest.raises(ConnectionError):
        await conn.drain()
