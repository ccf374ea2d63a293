"""A spooled message (IMAP APPEND literal, SMTP DATA file, import) is parsed
in place through a mapping: same result as from bytes, never copied whole."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import pytest

from storage.ingest import _parse_path
from storage.mime import _count_lines, parse_message
from tests.fixtures.mime.large import write_large_message

FIXTURES = sorted((Path(__file__).resolve().parents[1] / "fixtures" / "mime").glob("*.eml"))


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.name)
def test_file_parse_equals_bytes_parse(path: Path) -> None:
    assert _parse_path(path) == parse_message(path.read_bytes())


def test_large_spooled_message_is_not_copied_into_memory(tmp_path: Path) -> None:
    write_large_message(tmp_path)
    path = next(tmp_path.iterdir())
    assert path.stat().st_size > 10_000_000
    tracemalloc.start()
    try:
        parsed = _parse_path(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000, peak
    assert parsed.size == path.stat().st_size


def test_line_count_over_a_mapping_spans_chunks(tmp_path: Path) -> None:
    import mmap

    data = b"x\n" * 1_500_000 + b"tail"
    path = tmp_path / "lines"
    path.write_bytes(data)
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert _count_lines(mapped, 0, len(data)) == _count_lines(data, 0, len(data)) == 1_500_001
        assert _count_lines(mapped, 10, 2_000_001) == _count_lines(data, 10, 2_000_001)
