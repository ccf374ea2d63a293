"""bench/checks_bench.py: its CPU accounting of a process group and the
messages it delivers."""

from __future__ import annotations

import email
import email.policy
import os
import subprocess
import sys
from pathlib import Path

from bench.checks_bench import (
    ATTACHMENT_SIZES,
    CLK_TCK,
    message,
    process_group_cpu_seconds,
)


def _stat(pid: int, comm: str, pgrp: int, ticks: tuple[int, int, int, int]) -> str:
    """A /proc/<pid>/stat line (proc(5)): utime, stime, cutime, cstime are
    fields 14 to 17."""
    middle = " ".join(["S", "1", str(pgrp)] + ["0"] * 8)
    return f"{pid} ({comm}) {middle} {' '.join(map(str, ticks))} 20 0 1 0\n"


def test_group_sums_members_and_their_reaped_children(tmp_path: Path) -> None:
    """Every member of the group counts (utime + stime + cutime + cstime),
    a process of another group does not, a command name with spaces and
    parentheses does not shift the fields, and a non-pid entry is skipped."""
    members = {
        100: ("rspamd: main process", 100, (5, 6, 7, 8)),
        101: ("rspamd: normal (x) worker", 100, (10, 20, 0, 0)),
        102: ("rspamd: controller", 100, (1, 2, 3, 4)),
        200: ("clamd", 200, (1000, 1000, 0, 0)),
    }
    for pid, (comm, pgrp, ticks) in members.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(_stat(pid, comm, pgrp, ticks))
    (tmp_path / "self").mkdir()
    (tmp_path / "101" / "task").mkdir()
    (tmp_path / "300").mkdir()  # exited between listing and reading: no stat
    assert process_group_cpu_seconds(100, tmp_path) == (26 + 30 + 10) / CLK_TCK
    assert process_group_cpu_seconds(200, tmp_path) == 2000 / CLK_TCK
    assert process_group_cpu_seconds(999, tmp_path) == 0


BURN = """
import sys, time
end = time.process_time() + float(sys.argv[1])
while time.process_time() < end:
    pass
"""

LEADER = f"""
import subprocess, sys, time
subprocess.run([sys.executable, "-c", {BURN!r}, "0.3"], check=True)
print("reaped", flush=True)
time.sleep(60)
"""


def test_a_reaped_worker_still_counts() -> None:
    """A group leader whose child burned 0.3 s of CPU and exited: the
    child's CPU is counted (through the leader's cutime/cstime), as a
    rspamd worker that exits mid-round must be."""
    leader = subprocess.Popen(
        [sys.executable, "-c", LEADER], stdout=subprocess.PIPE, start_new_session=True
    )
    try:
        assert leader.stdout is not None
        assert leader.stdout.readline() == b"reaped\n"
        assert os.getpgid(leader.pid) == leader.pid
        assert process_group_cpu_seconds(leader.pid) >= 0.28
    finally:
        leader.kill()
        leader.wait()


def test_messages_same_shape_different_bytes() -> None:
    """Message n has the same text and attachment size in every variant
    (configuration and round), different attachment bytes across
    variants, an attachment within ATTACHMENT_SIZES that decodes back, and
    CRLF lines of at most 78 characters (RFC 5322 section 2.1.1)."""
    sizes = set()
    for n in range(12):
        parts = []
        for variant in ("clamd-0", "rspamd-0", "clamd-1"):
            raw = message(n, variant, "user@bench.example")
            assert all(len(line) <= 78 for line in raw.split(b"\r\n"))
            assert b"\n" not in raw.replace(b"\r\n", b"")
            parsed = email.message_from_bytes(raw, policy=email.policy.default)
            text, attachment = list(parsed.iter_parts())
            parts.append((text.get_content(), attachment.get_content()))
        texts = {p[0] for p in parts}
        blobs = [p[1] for p in parts]
        assert len(texts) == 1
        assert len({len(b) for b in blobs}) == 1
        assert len(set(blobs)) == 3
        assert ATTACHMENT_SIZES[0] <= len(blobs[0]) <= ATTACHMENT_SIZES[1]
        sizes.add(len(blobs[0]))
    assert len(sizes) > 6  # random sizes, not one
