"""bench/capacity_measure.py: the messages it sends and its per-message arithmetic."""

from __future__ import annotations

import email
import email.policy
import random
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from bench.capacity_measure import (
    ATTACH_ABOVE,
    DbStats,
    Snapshot,
    Words,
    capacity_message,
    delivery_cost,
    folder_usage,
)

WORDS = Words(random.Random(7))


@settings(max_examples=40, deadline=None)
@given(size=st.integers(min_value=1500, max_value=120_000), seed=st.integers(0, 2**32))
def test_messages_are_mime_of_the_asked_size(size: int, seed: int) -> None:
    """About ``size`` octets (±10%, a little slack for the last line); a
    plain text message up to ATTACH_ABOVE, above it a multipart one whose
    attachment decodes (RFC 2045 base64) to bytes of the right length."""
    raw = capacity_message(3, "user0@shards.example", size, random.Random(seed), WORDS)
    assert 0.9 * size - 200 <= len(raw) <= 1.1 * size + 200
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["To"] == "user0@shards.example"
    if size * 1.1 <= ATTACH_ABOVE:
        assert msg.get_content_type() == "text/plain"
        return
    if size * 0.9 > ATTACH_ABOVE:
        parts = list(msg.iter_parts())
        assert [p.get_content_type() for p in parts] == ["text/plain", "application/octet-stream"]
        attachment = parts[1].get_content()
        assert len(attachment) > len(raw) // 2  # most of the message, as in real mail
        assert len(set(attachment)) > 200  # random bytes, not a repeated pattern


def _snapshot(cpu: float, written: int, files: int, tables: dict[str, tuple[int, int]]) -> Snapshot:
    db = DbStats(wal_bytes=written // 2, wal_fpi=files, buffers_written=files, tables=tables)
    return Snapshot(cpu, cpu / 2, written, written * 3, (files, files * 5000, files * 8192), db)


def test_delivery_cost_is_per_message() -> None:
    """Each figure is the window's delta over its messages; a table that
    appears during the window counts from zero, and unchanged ones are left out."""
    before = _snapshot(10.0, 1_000, 100, {"messages": (100, 800_000), "domains": (1, 8192)})
    after = _snapshot(
        14.0,
        401_000,
        500,
        {"messages": (500, 4_800_000), "domains": (1, 8192), "change_log": (400, 80_000)},
    )
    cost = delivery_cost(5000, 400, 2.0, before, after)
    assert cost.per_second == 200.0
    assert cost.mtad_cpu_ms == 10.0 and cost.pg_cpu_ms == 5.0
    assert cost.mtad_written_bytes == 1000 and cost.pg_written_bytes == 3000
    assert cost.wal_bytes == 500 and cost.pg_buffers_written_bytes == 8192
    assert cost.blob_files == 1.0 and cost.blob_bytes == 5000
    assert cost.db_rows == {"messages": 1.0, "change_log": 1.0}
    assert cost.db_bytes_by_table == {"messages": 10_000, "change_log": 200}
    assert cost.db_bytes == 10_200


def test_folder_usage_counts_every_file(tmp_path: Path) -> None:
    rng = random.Random()
    sizes = [rng.randint(1, 20_000) for _ in range(rng.randint(3, 12))]
    for n, size in enumerate(sizes):
        folder = tmp_path / f"{n % 3:02x}"
        folder.mkdir(exist_ok=True)
        (folder / f"blob{n}").write_bytes(rng.randbytes(size))
    files, size, allocated = folder_usage(tmp_path)
    assert (files, size) == (len(sizes), sum(sizes))
    assert allocated >= 0
