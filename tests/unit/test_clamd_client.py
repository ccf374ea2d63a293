"""The clamd client's wire format and its behaviour on hostile peers, against
in-process fake clamds that decode INSTREAM as clamd does (clamd(8)): a
``zINSTREAM\\0`` command, chunks of a 4-octet big-endian length and data, a
zero-length chunk, then one NUL-terminated reply. The real clamd is in
tests/integration/test_antivirus.py."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import struct
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from delivery.checks import Action, CheckStage, Flow, Subject, Verdict, combine
from delivery.checks_clamd import (
    ClamdAddress,
    ClamdCheck,
    ClamdClient,
    ClamdError,
    parse_reply,
)
from delivery.spool import Spooled

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Received:
    command: bytes = b""
    chunks: list[int] = field(default_factory=list)  # each chunk's length
    data: bytearray = field(default_factory=bytearray)
    ended: bool = False


async def read_instream(reader: asyncio.StreamReader, got: Received) -> None:
    """Decodes one INSTREAM request into ``got`` as clamd would."""
    got.command = await reader.readexactly(len(b"zINSTREAM\0"))
    while True:
        (length,) = struct.unpack(">I", await reader.readexactly(4))
        if length == 0:
            got.ended = True
            return
        got.chunks.append(length)
        got.data += await reader.readexactly(length)


@contextlib.asynccontextmanager
async def fake_clamd(handler: Handler) -> AsyncIterator[str]:
    """A TCP server on 127.0.0.1; yields its ``host:port``. Its connections
    and their handlers end with it."""
    tasks: set[asyncio.Task[None]] = set()

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away: what a hostile test wants
        finally:
            writer.transport.abort()

    server = await asyncio.start_server(tracked, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


def answering(reply: bytes, log: list[Received]) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = Received()
        log.append(got)
        await read_instream(reader, got)
        writer.write(reply)
        await writer.drain()
        writer.close()

    return handle


@pytest.mark.parametrize("seed", range(8))
async def test_chunks_reassemble_to_the_message(seed: int) -> None:
    rng = random.Random(seed)
    size = rng.choice([0, 1, rng.randrange(2, 5000), rng.randrange(5000, 600_000)])
    message = rng.randbytes(size)
    chunk_size = rng.choice([1, rng.randrange(2, 100), rng.randrange(100, 300_000)])
    if len(message) > 50_000:
        chunk_size = max(chunk_size, 997)  # keep one-octet chunks to small messages
    log: list[Received] = []
    async with fake_clamd(answering(b"stream: OK\0", log)) as address:
        assert await ClamdClient(address, 30, chunk_size).scan(message) is None
    [got] = log
    assert got.command == b"zINSTREAM\0" and got.ended
    assert bytes(got.data) == message
    assert all(0 < n <= chunk_size for n in got.chunks)
    assert len(got.chunks) == -(-len(message) // chunk_size)


@pytest.mark.parametrize("seed", range(4))
async def test_a_spooled_message_is_streamed_from_its_file(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    before = rng.randbytes(rng.randrange(0, 3000))  # the part of the file already consumed
    body = rng.randbytes(rng.randrange(0, 400_000))
    path = tmp_path / "data.eml"
    path.write_bytes(before + body)
    prefix = rng.randbytes(rng.randrange(0, 2000))
    message = Spooled(prefix, path, len(before), len(before) + len(body))
    chunk_size = rng.randrange(1, 70_000) if body else 7
    log: list[Received] = []
    async with fake_clamd(answering(b"stream: OK\0", log)) as address:
        assert await ClamdClient(address, 30, chunk_size).scan(message) is None
    assert bytes(log[0].data) == prefix + body
    assert all(0 < n <= chunk_size for n in log[0].chunks)


async def test_a_unix_socket_is_used_for_a_path() -> None:
    root = Path(tempfile.mkdtemp(prefix="clamd-"))  # short: a socket path is at most 107 octets
    log: list[Received] = []
    try:
        server = await asyncio.start_unix_server(
            answering(b"stream: Eicar-Test FOUND\0", log), str(root / "s")
        )
        async with server:
            found = await ClamdClient(str(root / "s"), 30).scan(b"x" * 100)
    finally:
        shutil.rmtree(root)
    assert found == "Eicar-Test" and bytes(log[0].data) == b"x" * 100


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (b"stream: OK", None),
        (b"stream: Win.Test.EICAR_HDB-1 FOUND", "Win.Test.EICAR_HDB-1"),
        (b"stream: Bad\r\nName FOUND", "Bad??Name"),
    ],
)
def test_replies(reply: bytes, expected: str | None) -> None:
    assert parse_reply(reply) == expected


@pytest.mark.parametrize(
    "reply",
    [
        b"INSTREAM size limit exceeded. ERROR",
        b"stream: lstat() failed: No such file. ERROR",
        b"",
        b"stream: FOUND",
        b"UNKNOWN COMMAND",
        b"stream: OK but more",
    ],
)
def test_errors_and_nonsense_are_no_verdict(reply: bytes) -> None:
    with pytest.raises(ClamdError):
        parse_reply(reply)


@pytest.mark.parametrize(
    "value", ["relative/path", "host", "host:", ":3310", "host:0", "host:70000", "h:x"]
)
def test_bad_addresses(value: str) -> None:
    with pytest.raises(ValueError):
        ClamdAddress.parse(value)


def test_addresses() -> None:
    assert ClamdAddress.parse("/run/clamav/clamd.ctl").path == "/run/clamav/clamd.ctl"
    assert ClamdAddress.parse("[::1]:3310") == ClamdAddress(host="::1", port=3310)
    assert ClamdAddress.parse("clamd.internal:3310") == ClamdAddress(
        host="clamd.internal", port=3310
    )


async def test_size_limit_mid_stream_is_an_error_not_a_pass() -> None:
    """clamd's StreamMaxLength: it answers and closes while we still send."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(10)
        await reader.readexactly(100_000)
        writer.write(b"INSTREAM size limit exceeded. ERROR\0")
        await writer.drain()
        writer.transport.abort()

    async with fake_clamd(handle) as address:
        with pytest.raises(ClamdError, match="size limit"):
            await ClamdClient(address, 30, 4096).scan(random.randbytes(8_000_000))


async def test_an_answer_before_the_end_of_the_stream_is_no_pass() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(10)
        writer.write(b"stream: OK\0")
        await writer.drain()
        await reader.read()  # keep reading whatever comes
        writer.close()

    async with fake_clamd(handle) as address:
        with pytest.raises(ClamdError):
            await ClamdClient(address, 30, 1024).scan(random.randbytes(4_000_000))


async def test_a_reply_without_end_is_bounded() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_instream(reader, Received())
        with contextlib.suppress(ConnectionError):
            for _ in range(100):
                writer.write(b"A" * 1000)
                await writer.drain()
        writer.close()

    async with fake_clamd(handle) as address:
        with pytest.raises(ClamdError, match="too long"):
            await ClamdClient(address, 30).scan(b"hello")


async def test_nothing_listening_is_an_error() -> None:
    root = Path(tempfile.mkdtemp(prefix="clamd-"))
    try:
        with pytest.raises(ClamdError):
            await ClamdClient(str(root / "absent.sock"), 5).scan(b"x")
    finally:
        shutil.rmtree(root)


def silent() -> Handler:
    """Reads everything and never answers."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    return handle


def dripping() -> Handler:
    """Answers one octet of "stream: OK" at a time, slowly, never ending it."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_instream(reader, Received())
        with contextlib.suppress(ConnectionError):
            for octet in b"stream: OK" * 1000:
                writer.write(bytes([octet]))
                await writer.drain()
                await asyncio.sleep(0.05)
        writer.close()

    return handle


def not_reading() -> Handler:
    """Accepts and never reads: the client's writes back up."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(3600)

    return handle


@pytest.mark.parametrize("hostile", [silent, dripping, not_reading])
async def test_a_stuck_clamd_times_out_and_others_go_on(hostile: Callable[[], Handler]) -> None:
    """The timeout fires on a clamd that never gives a verdict, while scans
    against a healthy clamd, started after it, finish first and correctly."""
    log: list[Received] = []
    order: list[str] = []
    async with fake_clamd(hostile()) as bad, fake_clamd(answering(b"stream: OK\0", log)) as good:

        async def stuck() -> None:
            with pytest.raises(ClamdError, match="no answer"):
                await ClamdClient(bad, 3.0, 65536).scan(random.randbytes(20_000_000))
            order.append("stuck")

        async def healthy(n: int) -> None:
            message = random.randbytes(random.randrange(1, 200_000))
            assert await ClamdClient(good, 30).scan(message) is None
            order.append(f"healthy{n}")

        task = asyncio.ensure_future(stuck())
        await asyncio.sleep(0)  # the stuck scan is under way first
        await asyncio.gather(*(healthy(n) for n in range(5)))
        assert not task.done()
        await task
    assert order[-1] == "stuck" and len(order) == 6
    assert len(log) == 5 and all(got.ended for got in log)


class Fixed:
    def __init__(self, name: str, verdict: Verdict | Exception) -> None:
        self.name = name
        self.verdict = verdict

    async def check(self, subject: Subject) -> Verdict:
        await asyncio.sleep(0)
        if isinstance(self.verdict, Exception):
            raise self.verdict
        return self.verdict


SUBJECT = Subject(Flow.MX, b"Subject: x\r\n\r\nbody\r\n", "a@b.example", ("c@d.example",))


def test_the_most_severe_verdict_wins_and_headers_accumulate() -> None:
    rng = random.Random(5)
    for _ in range(50):
        verdicts = [
            Verdict(rng.choice(list(Action)), (400 + i, "4.0.0", f"v{i}"), f"X-{i}: y\r\n".encode())
            for i in range(rng.randrange(1, 6))
        ]
        combined = combine(verdicts)
        worst = max(v.action for v in verdicts)
        first_worst = next(v for v in verdicts if v.action is worst)
        assert combined.action is worst and combined.reply == first_worst.reply
        assert combined.headers == b"".join(v.headers for v in verdicts)
    assert combine([]).action is Action.ACCEPT


async def test_a_failing_check_is_a_tempfail_never_a_pass() -> None:
    stage = CheckStage([
        Fixed("fine", Verdict(headers=b"X-Fine: yes\r\n")),
        Fixed("broken", RuntimeError("bug")),
    ])
    verdict = await stage.run(SUBJECT)
    assert verdict.action is Action.TEMPFAIL and verdict.reply and verdict.reply[0] == 451
    assert verdict.headers == b"X-Fine: yes\r\n"


async def test_quarantine_is_a_refusal_on_outgoing_flows() -> None:
    stage = CheckStage([Fixed("spam", Verdict(Action.QUARANTINE))])
    assert (await stage.run(SUBJECT)).action is Action.QUARANTINE
    for flow in (Flow.SUBMISSION, Flow.HTTP):
        outgoing = Subject(flow, SUBJECT.message, SUBJECT.mail_from, SUBJECT.recipients)
        verdict = await stage.run(outgoing)
        assert verdict.action is Action.REJECT and verdict.reply and verdict.reply[0] == 550


async def test_clamd_check_verdicts() -> None:
    log: list[Received] = []
    async with fake_clamd(answering(b"stream: Eicar-Sig FOUND\0", log)) as address:
        check = ClamdCheck(ClamdClient(address, 30), "tempfail", "mx.test")
        verdict = await check.check(SUBJECT)
    assert verdict.action is Action.REJECT
    assert verdict.reply == (554, "5.7.1", "Message refused: virus found: Eicar-Sig")
    root = Path(tempfile.mkdtemp(prefix="clamd-"))
    try:
        down = ClamdClient(str(root / "none.sock"), 5)
        verdict = await ClamdCheck(down, "tempfail", "mx.test").check(SUBJECT)
        assert verdict.action is Action.TEMPFAIL and verdict.reply
        assert verdict.reply[:2] == (451, "4.7.1") and not verdict.headers
        verdict = await ClamdCheck(down, "accept", "mx.test").check(SUBJECT)
        assert verdict.action is Action.ACCEPT
        assert verdict.headers == b"X-Virus-Scanned: no, scanner unavailable at mx.test\r\n"
    finally:
        shutil.rmtree(root)
