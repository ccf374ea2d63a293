"""SRS addresses (delivery/srs.py): what a forward makes, a bounce reverses,
across random addresses, case changes on the way, forged and aged ones."""

from __future__ import annotations

import random
import string
import time
from pathlib import Path

import pytest

from delivery.address import parse_mailbox
from delivery.srs import DAY_SECONDS, Srs, SrsError, is_srs_address

LOCAL_CHARS = string.ascii_letters + string.digits + "!#$%&'*+/=?^_`{|}~-."


def _local() -> str:
    text = "".join(random.choices(LOCAL_CHARS, k=random.randint(1, 40))).strip(".")
    return text.replace("..", ".") or "x"


def _domain() -> str:
    labels = [
        "".join(random.choices(string.ascii_lowercase + string.digits, k=random.randint(1, 12)))
        for _ in range(random.randint(2, 4))
    ]
    return ".".join(labels)


def _srs(domain: str = "fwd.example") -> Srs:
    return Srs(domain, (random.randbytes(32),))


def _now() -> float:
    return random.uniform(1.6e9, 2.2e9)


def test_forward_then_reverse_gives_the_sender_back() -> None:
    srs = _srs()
    for _ in range(500):
        sender = f"{_local()}@{_domain()}"
        now = _now()
        rewritten = srs.forward(sender, now)
        assert rewritten.startswith("SRS0=") and rewritten.endswith("@fwd.example")
        assert is_srs_address(rewritten) and not is_srs_address(sender)
        parse_mailbox(rewritten)  # a valid path (SRS local parts may pass 64 octets)
        # Some relays lower- or upper-case a local part: the hash is case-blind.
        for seen in (rewritten, rewritten.lower(), rewritten.upper()):
            back = srs.reverse(seen, now + random.uniform(0, 20 * DAY_SECONDS))
            assert back is not None and back.lower() == sender.lower()
        assert srs.reverse(rewritten, now) == sender


def test_forged_damaged_and_old_addresses_are_refused() -> None:
    srs = _srs()
    now = _now()
    rewritten = srs.forward("alice@origin.example", now)
    local, _, domain = rewritten.rpartition("@")
    tag, hashed, rest = local.split("=", 2)
    forged_hash = "".join(random.choice(string.ascii_letters) for _ in hashed)
    if forged_hash.lower() == hashed.lower():
        forged_hash = "zzzz" if hashed.lower() != "zzzz" else "yyyy"
    with pytest.raises(SrsError):
        srs.reverse(f"{tag}={forged_hash}={rest}@{domain}", now)
    with pytest.raises(SrsError):  # the encoded sender changed, the hash kept
        srs.reverse(rewritten.replace("=alice@", "=mallory@"), now)
    with pytest.raises(SrsError):  # another site's key
        _srs().reverse(rewritten, now)
    with pytest.raises(SrsError):  # 22 days later (max_age_days 21)
        srs.reverse(rewritten, now + 22 * DAY_SECONDS)
    assert srs.reverse(rewritten, now + 21 * DAY_SECONDS) == "alice@origin.example"
    for broken in (
        "SRS0=abcd@fwd.example",
        "SRS0=x@fwd.example",
        "SRS1=abcd=x@fwd.example",
        "SRS0=abcd=!!=origin.example=alice@fwd.example",
    ):
        with pytest.raises(SrsError):
            srs.reverse(broken, now)
    assert srs.reverse("alice@fwd.example", now) is None
    assert srs.reverse("srs0alice@fwd.example", now) is None  # no separator: no SRS


def test_a_second_forwarder_keeps_the_first_and_bounces_walk_back() -> None:
    first, second, third = _srs("one.example"), _srs("two.example"), _srs("three.example")
    now = _now()
    sender = f"{_local()}@{_domain()}"
    hop1 = first.forward(sender, now)
    hop2 = second.forward(hop1, now)
    assert hop2.startswith("SRS1=") and "=one.example==" in hop2 and hop2.endswith("@two.example")
    hop3 = third.forward(hop2, now)  # SRS1 again: re-signed, still naming the first
    assert hop3.startswith("SRS1=") and "=one.example==" in hop3 and hop3.endswith("@three.example")
    # A bounce to hop3 goes straight to the first forwarder, then to the sender.
    assert third.reverse(hop3, now) == hop1
    assert second.reverse(hop2, now) == hop1
    assert first.reverse(hop1, now) == sender
    with pytest.raises(SrsError):
        second.reverse(hop3.replace("@three.example", "@two.example"), now)


def test_rotated_keys_still_reverse() -> None:
    old, new = random.randbytes(32), random.randbytes(32)
    now = _now()
    made = Srs("fwd.example", (old,)).forward("bob@origin.example", now)
    assert Srs("fwd.example", (new, old)).reverse(made, now) == "bob@origin.example"
    with pytest.raises(SrsError):
        Srs("fwd.example", (new,)).reverse(made, now)


def test_time_stamps_wrap_around_their_cycle() -> None:
    srs = _srs()
    cycle = 1024 * DAY_SECONDS
    start = (random.randint(1_000, 3_000) * 1024 + 1020) * DAY_SECONDS  # 4 days before a wrap
    made = srs.forward("carol@origin.example", start)
    assert srs.reverse(made, start + 10 * DAY_SECONDS) == "carol@origin.example"
    with pytest.raises(SrsError):
        srs.reverse(made, start + cycle - 30 * DAY_SECONDS)


async def test_the_primary_domain_is_read_once_per_ttl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ``srs.domain`` each forward asks for the site's first local
    domain: read from the directory once, then kept PRIMARY_TTL seconds
    (a real SQLite directory; the clock moved past the TTL)."""
    from argon2 import PasswordHasher
    from argon2.profiles import CHEAPEST

    from conf.settings import Settings
    from delivery import srs
    from storage import open_storage_from_url

    storage = await open_storage_from_url(
        f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}",
        tmp_path / "blobs",
        password_hasher=PasswordHasher.from_parameters(CHEAPEST),
    )
    try:
        first = _domain()
        await storage.directory.add_domain(first)
        reads = 0
        real = storage.directory.list_domains

        async def counted(*args: object, **kw: object) -> object:
            nonlocal reads
            reads += 1
            return await real(*args, **kw)

        monkeypatch.setattr(storage.directory, "list_domains", counted)
        settings = Settings()
        calls = random.randint(5, 30)
        for _ in range(calls):
            made = await srs.srs_of(settings, storage)
            assert made is not None and made.domain == first
        assert reads == 1
        now = time.monotonic()
        monkeypatch.setattr(srs.time, "monotonic", lambda: now + srs.PRIMARY_TTL + 1)
        assert (await srs.srs_of(settings, storage)).domain == first  # type: ignore[union-attr]
        assert reads == 2
    finally:
        await storage.close()
