"""bench/bigmsg_bench.py: its memory sampling and per-session arithmetic,
its messages and its byte-exact check of what comes back."""

from __future__ import annotations

import email
import email.policy
import hashlib
import random
import subprocess
import sys
from pathlib import Path

import pytest

from bench.bigmsg_bench import (
    MB,
    Memory,
    Mismatch,
    RssSampler,
    Sent,
    Spec,
    Status,
    check_fetched,
    children,
    first_difference,
    message,
    read_status,
    read_total,
)


def _status(rss: int, hwm: int, anon: int) -> str:
    """A /proc/<pid>/status excerpt (proc(5)), values in kB."""
    return (
        f"Name:\tpython3\nVmPeak:\t  999999 kB\nVmHWM:\t{hwm:>8} kB\nVmRSS:\t{rss:>8} kB\n"
        f"RssAnon:\t{anon:>8} kB\nRssFile:\t{rss - anon:>8} kB\n"
    )


def test_status_fields_and_per_session_arithmetic(tmp_path: Path) -> None:
    """VmRSS, VmHWM and RssAnon are read by name, not position; the peak
    is VmHWM only when it was reset before the phase; (peak - idle) /
    sessions is in 10^6 octets and never negative, for RssAnon too."""
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "status").write_text(_status(rss=120_000, hwm=250_000, anon=90_000))
    assert read_status(42, tmp_path) == (120_000, 250_000, 90_000)
    (tmp_path / "43").mkdir()
    (tmp_path / "43" / "status").write_text("Name:\tkthreadd\nVmPeak:\t0 kB\n")
    with pytest.raises(RuntimeError):
        read_status(43, tmp_path)

    reset = Memory(100_000, 130_000, 160_000, hwm_reset=True, sessions=3,
                   anon_idle=70_000, anon_sampled=82_000)  # fmt: skip
    assert reset.peak == 160_000
    assert reset.per_session_mb() == pytest.approx(60_000 * 1024 / 1e6 / 3)
    assert reset.anon_per_session_mb() == pytest.approx(12_000 * 1024 / 1e6 / 3)
    lifetime = Memory(idle=100_000, sampled=130_000, hwm=900_000, hwm_reset=False, sessions=3)
    assert lifetime.peak == 130_000  # a lifetime VmHWM says nothing of this phase
    shrunk = Memory(100_000, 100_000, 90_000, hwm_reset=True, sessions=2,
                    anon_idle=70_000, anon_sampled=60_000)  # fmt: skip
    assert shrunk.per_session_mb() == 0 and shrunk.anon_per_session_mb() == 0


def test_workers_are_found_and_summed(tmp_path: Path) -> None:
    """A daemon's children are found by their ppid (a comm with spaces and
    parentheses does not shift the fields); a summed set of processes
    counts one that is gone as 0."""
    stats = {10: ("mtad", 1), 11: ("python3 (worker) x", 10), 12: ("other", 2), 13: ("w", 10)}
    for pid, (comm, ppid) in stats.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(f"{pid} ({comm}) S {ppid} {pid} 0 0\n")
        (tmp_path / str(pid) / "status").write_text(_status(1000 * pid, 2000 * pid, 100 * pid))
    (tmp_path / "self").mkdir()
    assert children(10, tmp_path) == [11, 13]
    assert read_total([11, 13, 99], tmp_path) == Status(24_000, 48_000, 2_400)
    assert read_total([], tmp_path) == Status(0, 0, 0)


GROWER = """
import sys
print("ready", flush=True)
sys.stdin.readline()
block = b"\\x01" * (48 * 1024 * 1024)  # touched: resident
print("grown", flush=True)
del block
print("freed", flush=True)
sys.stdin.readline()
"""


def test_sampler_catches_a_peak_gone_before_the_phase_ends() -> None:
    """A real process that grows by 48 MiB and frees it again inside the
    sampled phase: the reset VmHWM still holds the peak, so the per-session
    figure for two sessions is about 24 MiB whatever the sampling caught."""
    child = subprocess.Popen(
        [sys.executable, "-c", GROWER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline() == b"ready\n"  # its start-up is no part of the phase
        with RssSampler([child.pid], sessions=2) as sampler:
            child.stdin.write(b"go\n")
            child.stdin.flush()
            assert child.stdout.readline() == b"grown\n"
            assert child.stdout.readline() == b"freed\n"
        memory = sampler.memory
        assert memory is not None and memory.hwm_reset
        assert memory.peak - memory.idle >= 47 * 1024
        assert memory.per_session_mb() == pytest.approx(48 * 1024 * 1024 / 1e6 / 2, rel=0.1)
        assert read_status(child.pid).rss < memory.idle + 8 * 1024  # it was given back
        assert memory.anon_idle > 0  # RssAnon read (its 10 ms samples may miss the peak)
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("size", [300_000, 6 * MB])
def test_messages_fit_their_size_and_differ_per_batch(size: int) -> None:
    """A message is a little under its size, never over, parses as MIME
    with one attachment (two from 5 MB) whose base64 decodes to random
    bytes, is the same for the same spec and different for another tag."""
    spec = Spec("fs0", size, 3)
    data = message(spec)
    assert size - 200 <= len(data) <= size
    assert data == message(spec)
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    attachments = [part.get_payload(decode=True) for part in parsed.iter_attachments()]
    assert len(attachments) == (1 if size < 5 * MB else 2)
    assert all(len(a) > size // 10 for a in attachments)
    assert parsed["Message-ID"] == spec.message_id
    assert max(len(line) for line in data.split(b"\r\n")) <= 78  # RFC 5322 section 2.1.1
    other = email.message_from_bytes(message(Spec("s30", size, 3)), policy=email.policy.default)
    assert next(other.iter_attachments()).get_payload(decode=True) != attachments[0]


def test_check_fetched_wants_the_sent_octets_behind_prepended_fields() -> None:
    spec = Spec("fs0", 300_000, 1)
    sent_bytes = message(spec)
    sent = Sent(len(sent_bytes), hashlib.sha256(sent_bytes).digest())
    prefix = (
        b"Return-Path: <bench@sender.example>\r\n"
        b"Received: from bench.example (localhost [127.0.0.1])\r\n\tby mx; Sun, 6 Dec 2026\r\n"
        b"X-Spam-Score: 1.00\r\n"
    )
    assert check_fetched(prefix + sent_bytes, sent, spec) == len(prefix)
    assert check_fetched(sent_bytes, sent, spec) == 0

    flipped = bytearray(prefix + sent_bytes)
    at = random.Random(7).randrange(len(sent_bytes))
    flipped[len(prefix) + at] ^= 0x20
    with pytest.raises(Mismatch, match=f"at offset {at}"):
        check_fetched(bytes(flipped), sent, spec)
    with pytest.raises(Mismatch, match="not a trace field"):
        check_fetched(b"X-Injected: yes\r\n" + sent_bytes, sent, spec)
    with pytest.raises(Mismatch, match="octets back"):
        check_fetched(sent_bytes[:-1], sent, spec)


def test_first_difference() -> None:
    rng = random.Random(5)
    for _ in range(200):
        a = rng.randbytes(rng.randrange(0, 300))
        b = bytearray(a + rng.randbytes(rng.randrange(0, 3)))
        if b and rng.random() < 0.7:
            b[rng.randrange(len(b))] ^= 1
        naive = next(
            (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
        )
        assert first_difference(a, bytes(b)) == naive
