"""DKIM signing and ARC sealing of outbound mail run in the content pool's
worker processes (mtad/outbound/signing.py, issue #23): the fields are the
bytes the signing on the event loop's thread made, they verify with dkimpy
against the published key, and a pool that fails or runs past its limit
leaves the delivery for a later attempt: never sent unsigned, never bounced."""

from __future__ import annotations

import multiprocessing
import random
import re
from collections.abc import Iterator
from pathlib import Path

import dkim
import dkim.crypto
import pytest

from mtad.outbound import signing
from mtad.outbound.signing import (
    DkimKey,
    DkimSigner,
    SigningUnavailable,
    arc_seal_sync,
    generate_key,
    new_key,
    rsassa_pkcs1_v1_5_sign,
    sign_sync,
)
from storage import contentpool
from storage.errors import ErrorKind
from tests.integration.outbound.sink import SinkServer
from tests.unit.test_outbound_worker import (  # noqa: F401 (fixtures)
    SENDER,
    enqueue,
    inbox,
    port,
    world,
)

DOMAIN = "example.net"
SELECTOR = "shardmail"
AUTHSERV_ID = "mx.example.net"


@pytest.fixture
def key_dir(tmp_path: Path) -> tuple[Path, str]:
    """A key file as ``mailctl dkim generate`` made it, and its TXT record."""
    directory = tmp_path / "dkim"
    _path, record = generate_key(directory, DOMAIN, SELECTOR)  # 2048 bits
    return directory, record


@pytest.fixture
def working_pool() -> Iterator[contentpool.ContentPool]:
    # Room for the spawned worker to start on a loaded machine.
    pool = contentpool.configure(1, time_limit=20.0, startup_allowance=60.0)
    yield pool
    contentpool.configure(0)


@pytest.fixture
def hopeless_pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # No job finishes in a microsecond, and no size allowance is added.
    monkeypatch.setattr(signing, "SIGN_SECONDS_PER_MB", 0.0)
    contentpool.configure(1, time_limit=1e-6, startup_allowance=0)
    yield
    contentpool.configure(0)


def _dnsfunc(record: str):
    def lookup(name: bytes, timeout: int = 5) -> bytes:
        assert name == f"{SELECTOR}._domainkey.{DOMAIN}.".encode()
        return record.encode()

    return lookup


def _random_message(rng: random.Random, forwarded: bool) -> bytes:
    """Real bytes of random sizes: 8-bit octets, trailing blanks, folded
    and repeated fields, which relaxed canonicalization must treat alike."""
    lines = []
    for _ in range(rng.randrange(1, 400)):
        raw = rng.randbytes(rng.randrange(0, 120)).replace(b"\r", b"").replace(b"\n", b"")
        lines.append(raw + b" " * rng.randrange(0, 3))
    head = [
        f"From: Alice <alice@{DOMAIN}>",
        f"To: r{rng.randrange(10**6)}@d.test",
        f"Subject: test {rng.randrange(10**9)}\r\n  folded  part",
        "Date: Mon, 01 Jan 2024 00:00:00 +0000",
        f"Message-ID: <{rng.randrange(10**12)}@{DOMAIN}>",
        "Received: from a by b; Mon, 01 Jan 2024 00:00:00 +0000",
        "Received: from c by d; Mon, 01 Jan 2024 00:00:01 +0000",
    ]
    if forwarded:
        head.insert(0, f"Authentication-Results: {AUTHSERV_ID}; spf=pass smtp.mailfrom=o.test")
    return "\r\n".join(head).encode() + b"\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"


def _today(message: bytes, key: DkimKey, arc_authserv_id: str) -> bytes:
    """What signing on the event loop's thread made before issue #23, RSA
    by dkimpy's Python code included."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dkim, "RSASSA_PKCS1_v1_5_sign", dkim.crypto.RSASSA_PKCS1_v1_5_sign)
        signed = sign_sync(message, key)
        return arc_seal_sync(signed, key, arc_authserv_id) if arc_authserv_id else signed


def _timestamps(signed: bytes, message: bytes) -> list[bytes]:
    return re.findall(rb"\bt=(\d+)", signed[: len(signed) - len(message)])


@pytest.mark.parametrize("bits", [1024, 2048, 3072])
def test_openssl_rsa_gives_dkimpys_signature(bits: int) -> None:
    """RSASSA-PKCS1-v1_5 is deterministic (RFC 8017 section 8.2.1): OpenSSL's
    bytes are dkimpy's, for random keys and digests of both hashes."""
    import hashlib

    pem, _record = new_key(bits)
    private = dkim.crypto.parse_pem_private_key(pem)
    for name in ("sha256", "sha1"):
        for _ in range(5):
            digest = hashlib.new(name, random.randbytes(random.randrange(0, 5000)))
            expected = dkim.crypto.RSASSA_PKCS1_v1_5_sign(digest, private)
            assert rsassa_pkcs1_v1_5_sign(digest, private) == expected
    # dkim.sign goes through it (signing.py put it in dkimpy's place).
    assert dkim.RSASSA_PKCS1_v1_5_sign is rsassa_pkcs1_v1_5_sign


def test_a_key_openssl_refuses_is_signed_by_dkimpys_code() -> None:
    """A key whose CRT coefficient is wrong fails OpenSSL's key check;
    dkimpy's own code then signs with it, as before (same bytes)."""
    import hashlib

    pem, _record = new_key(1024)
    private = dkim.crypto.parse_pem_private_key(pem)
    private["coefficient"] += random.randrange(1, 1000)
    digest = hashlib.sha256(random.randbytes(100))
    expected = dkim.crypto.RSASSA_PKCS1_v1_5_sign(digest, private)
    assert rsassa_pkcs1_v1_5_sign(digest, private) == expected


async def test_pool_signatures_are_byte_identical_and_verify(
    key_dir: tuple[Path, str], working_pool: contentpool.ContentPool
) -> None:
    directory, record = key_dir
    key = signing.find_key(directory, DOMAIN, SELECTOR)
    assert key is not None
    signer = DkimSigner(directory, SELECTOR)
    rng = random.Random()
    compared = 0
    for n in range(8):
        forwarded = n % 2 == 1
        message = _random_message(rng, forwarded)
        authserv = AUTHSERV_ID if forwarded else ""
        # The t= tags carry the second of signing (RFC 6376 section 3.5,
        # RFC 8617 section 4.1.3); RSA PKCS#1 v1.5 is deterministic, so
        # within one second the two ways give the same bytes.
        for _attempt in range(5):
            pooled = await signer.sign(message, SENDER, arc_authserv_id=authserv)
            inline = _today(message, key, authserv)
            if _timestamps(pooled, message) == _timestamps(inline, message):
                break
        assert pooled == inline
        assert pooled.endswith(message)
        compared += 1
        assert dkim.verify(pooled, dnsfunc=_dnsfunc(record))
        if forwarded:
            assert pooled.count(b"ARC-Seal:") == 1
            cv, _results, comment = dkim.arc_verify(pooled, dnsfunc=_dnsfunc(record))
            assert cv == dkim.CV_Pass, comment
        else:
            assert b"ARC-Seal:" not in pooled
    assert compared == 8
    # The work ran in the pool's spawned worker, not in this process.
    assert multiprocessing.active_children()


async def test_a_pool_past_its_limit_raises_a_temporary_error(
    key_dir: tuple[Path, str], hopeless_pool: None
) -> None:
    directory, _record = key_dir
    message = _random_message(random.Random(), False)
    with pytest.raises(SigningUnavailable) as caught:
        await DkimSigner(directory, SELECTOR).sign(message, SENDER)
    assert caught.value.kind is ErrorKind.TEMPORARY


async def test_a_delivery_whose_signing_fails_waits_and_then_leaves_signed(
    world,  # noqa: F811
    port: int,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings, storage, runner, clock = world
    _path, record = generate_key(settings.queue.dkim_key_dir, DOMAIN, SELECTOR, 1024)
    monkeypatch.setattr(signing, "SIGN_SECONDS_PER_MB", 0.0)
    async with SinkServer("127.0.0.2", port) as sink:
        try:
            contentpool.configure(1, time_limit=1e-6, startup_allowance=0)
            qid = await enqueue(storage, ["x@d.test"])
            await runner.drain()
            # Not sent unsigned, not bounced, not given up: still queued.
            assert sink.transactions == 0 and sink.received == []
            entry = await storage.queue.get(qid)
            assert entry.status != "done"
            assert entry.recipients[0].status not in ("delivered", "failed")
            assert await inbox(storage) == []
            assert runner.stats.errors == 1

            # The pool works again; the attempt's lease runs out and the
            # entry is taken up again.
            contentpool.configure(1, time_limit=20.0, startup_allowance=60.0)
            clock.now += settings.queue.lease_seconds + 1
            await runner.drain(timeout=120)
        finally:
            contentpool.configure(0)
    [got] = sink.received
    assert got.data.startswith(b"DKIM-Signature:")
    assert dkim.verify(got.data, dnsfunc=_dnsfunc(record))
    entry = await storage.queue.get(qid)
    assert entry.recipients[0].status == "delivered"
    assert await inbox(storage) == []  # no bounce, no delay warning
