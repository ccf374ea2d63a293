"""``mailctl queue ...``: inspect and steer the outbound queue.

``list [--all]``, ``show ID``, ``retry ID|--all``, ``delete ID``, ``hold ID``,
``release ID|--account ADDRESS``, ``stats``, ``suppressions``, ``unsuppress ADDRESS``. Every
action sees every shard's partition of the queue; an ID is ``NUMBER`` in the
default shard's partition and ``SHARD:NUMBER`` in another's. ``list`` and
``stats`` show the partitions that answer and name those that do not (exit
1). Exit status as every mailctl command: 0 done, 1 the operation failed
(e.g. no such entry, message on stderr), 2 usage error.

Mail held for a sending limit (delivery/limits.py) shows its reason on the
``held:`` line of ``list``; ``release --account ADDRESS`` releases every
entry held for that account's limit and clears the account's flag (kept in
the database beside the queue: running daemons see it at once), so that
its next messages are sent again.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from collections.abc import Callable

from conf.settings import Settings
from delivery import limits
from storage.errors import StorageError
from storage.sql.queue import QueueRef, state_of

ACTIONS = (
    "list",
    "show",
    "retry",
    "delete",
    "hold",
    "release",
    "stats",
    "suppressions",
    "unsuppress",
)
NEEDS_ID = ("show", "delete", "hold")


def _when(value: dt.datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def entry_state(entry, now: dt.datetime | None = None) -> str:
    """One word for an entry: held, error, done, delivering (leased), queued."""
    now = now or dt.datetime.now(dt.UTC)
    leased = bool(entry.lease_owner and entry.lease_until and entry.lease_until > now)
    return state_of(entry.status, entry.held, leased)


def format_list(entries) -> str:
    """The ``queue list`` table: one line per entry, then its recipients."""
    if not entries:
        return "queue is empty"
    lines = [f"{'ID':>6}  {'STATE':<10} {'TRIES':>5}  {'NEXT ATTEMPT (UTC)':<19}  SENDER"]
    for e in entries:
        sender = e.sender or "<>"
        state, due = entry_state(e), _when(e.next_attempt)
        lines.append(f"{e.id:>6}  {state:<10} {e.attempts:>5}  {due:<19}  {sender}")
        if e.error:
            label = "held" if e.held and e.status == "queued" else "error"
            lines.append(f"{'':>8}{label}: {e.error}")
        for r in e.recipients:
            reply = f"  ({r.last_reply})" if r.last_reply and r.status != "delivered" else ""
            lines.append(f"{'':>8}{r.status:<9} {r.address}{reply}")
    return "\n".join(lines)


def format_stats(stats) -> str:
    """The ``queue stats`` table: one line per partition that answered."""
    lines = [
        f"{'PARTITION':<12} {'QUEUED':>7} {'DELIVERING':>10} {'HELD':>6} {'ERROR':>6} "
        f"{'DONE':>7}  OLDEST (UTC)"
    ]
    for name, s in sorted(stats.items()):
        if not isinstance(s, StorageError):
            lines.append(
                f"{name:<12} {s.queued:>7} {s.delivering:>10} {s.held:>6} {s.error:>6} "
                f"{s.done:>7}  {_when(s.oldest)}"
            )
    return "\n".join(lines)


def _report_unavailable(answers) -> int:
    """Names each partition that answered with an error on stderr; 1 if any."""
    failed = {n: a for n, a in answers.items() if isinstance(a, StorageError)}
    for name, error in sorted(failed.items()):
        print(f"mailctl: queue partition {name}: {error}", file=sys.stderr)
    return 1 if failed else 0


def format_entry(entry, header: bytes | None) -> str:
    lines = [
        f"id:            {entry.id}",
        f"state:         {entry_state(entry)}",
        f"sender:        {entry.sender or '<>'}",
        f"created:       {_when(entry.created)}",
        f"attempts:      {entry.attempts}",
        f"next attempt:  {_when(entry.next_attempt)}",
        f"expires:       {_when(entry.expires)}",
        f"held:          {'yes' if entry.held else 'no'}",
        f"lease:         {entry.lease_owner or '-'} until {_when(entry.lease_until)}",
        f"blob:          {entry.blob_key}",
    ]
    if entry.error:
        lines.append(f"error:         {entry.error}")
    lines.append("recipients:")
    for r in entry.recipients:
        extra = f" [{r.feedback} bounce]" if r.feedback else ""
        lines.append(f"  {r.address}: {r.status}{extra}")
        if r.last_reply:
            lines.append(f"    last reply: {r.last_reply}")
    if header is not None:
        lines.append("message header:")
        text = header.decode("utf-8", "replace").rstrip("\r\n")
        lines.extend("  " + line for line in text.split("\r\n"))
    return "\n".join(lines)


def cmd_queue(args: argparse.Namespace, settings: Settings) -> int:
    """Run one ``mailctl queue`` action; see the module docstring."""
    from mailctl.cli import with_storage
    from mtad.outbound.dsn import original_header

    if args.action in NEEDS_ID and args.id is None:
        print(f"mailctl queue {args.action}: an entry ID is required", file=sys.stderr)
        return 2
    try:
        ref = None if args.id is None else QueueRef.parse(args.id)
    except StorageError as exc:
        print(f"mailctl queue {args.action}: {exc}", file=sys.stderr)
        return 2
    if args.action == "retry" and args.id is None and not args.all:
        print("mailctl queue retry: give an entry ID or --all", file=sys.stderr)
        return 2
    if args.action == "release" and (args.id is None) == (args.account is None):
        print("mailctl queue release: give an entry ID or --account", file=sys.stderr)
        return 2
    if args.action == "unsuppress" and not args.address:
        print("mailctl queue unsuppress: an address is required", file=sys.stderr)
        return 2

    async def act(storage) -> int:
        q = storage.queue
        if args.action == "list":
            answers = await q.list_by_partition(include_done=args.all)
            entries = [m for a in answers.values() if isinstance(a, list) for m in a]
            print(format_list(sorted(entries, key=lambda m: (m.created, m.id))))
            return _report_unavailable(answers)
        elif args.action == "stats":
            answers = await q.stats()
            print(format_stats(answers))
            return _report_unavailable(answers)
        elif args.action == "show":
            entry = await q.get(ref)
            try:
                header = original_header(await storage.blobs.get(entry.blob_key))
            except Exception:
                header = None
            print(format_entry(entry, header))
        elif args.action == "retry":
            count = await q.retry_now(None if args.all else ref)
            print(f"{count} queue entr{'y' if count == 1 else 'ies'} due now")
        elif args.action == "delete":
            await q.delete(ref)
            print(f"queue entry {ref} deleted")
        elif args.action == "hold":
            await q.hold(ref)
            print(f"queue entry {ref} held")
        elif args.action == "release" and args.account is not None:
            return await release_account(storage, args.account)
        elif args.action == "release":
            await q.release_hold(ref)
            print(f"queue entry {ref} released")
        elif args.action == "suppressions":
            rows = await q.list_suppressions()
            if not rows:
                print("no bounces recorded")
            for s in rows:
                state = "suppressed" if s.suppressed else "watching"
                print(
                    f"{s.address}\t{state}\thard={s.hard_bounces}\tsoft={s.soft_bounces}"
                    f"\tlast={s.last_status or '-'}\t{_when(s.updated)}"
                )
        elif args.action == "unsuppress":
            await q.unsuppress(args.address)
            print(f"{args.address.lower()} removed from the suppression list")
        return 0

    async def release_account(storage, address: str) -> int:
        answers = await limits.release_account(storage, address)
        done = [a for a in answers.values() if not isinstance(a, StorageError)]
        count = sum(released for released, _ in done)
        flagged = any(cleared for _, cleared in done)
        print(
            f"{count} queue entr{'y' if count == 1 else 'ies'} of {address.lower()} released"
            + ("; account no longer held" if flagged else "")
        )
        return _report_unavailable(answers)

    return with_storage(settings, act)


def add_queue_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``mailctl queue`` on its subparser."""
    parser.add_argument("action", choices=ACTIONS)
    parser.add_argument("id", nargs="?", help="queue entry ID: NUMBER or SHARD:NUMBER")
    parser.add_argument("--all", action="store_true", help="list: include done; retry: every entry")
    parser.add_argument("--address", help="unsuppress: the address")
    parser.add_argument(
        "--account", help="release: every entry held for this account's sending limit"
    )


def add_queue_parser(
    command: Callable[[str, Callable[..., int], str], argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Registers ``queue`` with mailctl's ``command(name, func, help)`` helper."""
    parser = command("queue", cmd_queue, "inspect and manage the outbound queue")
    add_queue_arguments(parser)
    return parser
