"""``mailctl account move ADDRESS --to SHARD [--abort]`` and ``mailctl shard
drain NAME [--to SHARD ...]``: online moves (``storage/move.py``).

A move interrupted anyhow (Ctrl-C, SIGKILL, a database outage) is resumed
by running the same command again; ``--abort`` rolls back one that has not
flipped the directory yet.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from conf.settings import Settings
from storage.move import MoveProgress, abort_move, drain_shard, move_account


def _progress() -> Callable[[MoveProgress], None]:
    """One line per step on stdout, flushed (a log or a pipe sees it at once)."""
    start = time.monotonic()

    def show(p: MoveProgress) -> None:
        step = p.state.value if not p.round else f"{p.state.value} round {p.round}"
        done = f": {p.copied} rows copied" if p.copied else ""
        print(f"{p.address}: {step}{done} ({time.monotonic() - start:.1f}s)", flush=True)

    return show


def cmd_account_move(args: argparse.Namespace, settings: Settings) -> int:
    from mailctl.cli import with_storage

    if not args.to and not args.abort:
        print("mailctl: account move: --to SHARD is required", file=sys.stderr)
        return 2

    async def act(storage: Any) -> int:
        if args.abort:
            if await abort_move(storage, args.address):
                print(f"move of {args.address.lower()} rolled back")
            else:
                print(f"no move of {args.address.lower()} in progress")
            return 0
        account = await move_account(storage, args.address, args.to, progress=_progress())
        print(f"account {account.address} is on shard {account.shard}")
        return 0

    return with_storage(settings, act)


def cmd_shard(args: argparse.Namespace, settings: Settings) -> int:
    """``shard drain NAME``: every account of the shard moved, one by one
    (``mailctl/shard_cmds.py`` parses it)."""
    from mailctl.cli import with_storage

    if not args.name:
        print("mailctl: shard drain: the shard NAME is required", file=sys.stderr)
        return 2

    async def act(storage: Any) -> int:
        moved = await drain_shard(storage, args.name, to=args.to or None, progress=_progress())
        print(f"shard {args.name} drained: {len(moved)} accounts moved")
        return 0

    return with_storage(settings, act)
