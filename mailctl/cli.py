"""The ``mailctl`` command line.

Every command that reads the configuration takes ``-c FILE`` and
``-o section.key=value``, before the subcommand or after it. Passwords
come from a prompt or from standard input (``--password-stdin``), never
from argv alone, so they stay out of shell history and ``ps``. Exit
status: 0 success, 1 operation failed (message on stderr), 2 usage or
configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from conf.settings import Settings
from mailctl.acl_cmds import add_acl_parser
from mailctl.blob_cmds import add_blobs_parser
from mailctl.dkim_cmds import add_dkim_parser
from mailctl.dmarc_cmds import add_dmarc_parser
from mailctl.move_cmds import cmd_account_move
from mailctl.queue_cmds import add_queue_parser
from mailctl.shard_cmds import add_shard_parser
from mailctl.spam_cmds import add_spam_parser
from mailctl.tlsrpt_cmds import add_tlsrpt_parser
from runtime.daemon import (
    DAEMONS,
    available_daemons,
    configure_logging,
    serve,
    settings_from_args,
)
from storage.errors import StorageError

NO_PASSWORD = "no password given and no terminal to ask for one; use --password-stdin"


def read_password(args: argparse.Namespace) -> str:
    """The new password: one line of standard input with ``--password-stdin``
    or when it is not a terminal, else asked twice at the terminal. Exits
    with one line (status 1) when there is nothing to read it from: standard
    input closed or at its end, or Ctrl-D / Ctrl-C at the prompt."""
    stdin = sys.stdin
    if stdin is None:  # started with standard input closed
        raise SystemExit(NO_PASSWORD)
    if args.password_stdin or not stdin.isatty():
        line = stdin.readline()
        if not line:  # at its end before any line: nobody to ask
            raise SystemExit(NO_PASSWORD)
        password = line.rstrip("\r\n")
    else:
        try:
            password = getpass.getpass("Password: ")
            if getpass.getpass("Repeat password: ") != password:
                raise SystemExit("passwords do not match")
        except (EOFError, KeyboardInterrupt):
            raise SystemExit(NO_PASSWORD) from None
    if not password:
        raise SystemExit("empty password refused")
    return password


def with_storage(
    settings: Settings, action: Callable[..., Awaitable[int | None]], *extra: object
) -> int:
    """Open storage, run ``action(storage, *extra)``, close; map storage errors to exit 1."""
    from storage import open_storage, password_hasher

    async def run() -> int:
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        storage = await open_storage(
            settings.storage,
            password_hasher=password_hasher(settings.auth),
            redis_url=settings.redis.url,  # `account move` tells the daemons through the bus
        )
        try:
            return (await action(storage, *extra)) or 0
        finally:
            await storage.close()

    try:
        return asyncio.run(run())
    except StorageError as exc:
        print(f"mailctl: {exc}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"mailctl: {exc}", file=sys.stderr)
        return 1


# --- serve / check-config -------------------------------------------------


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    names = available_daemons(args.only or DAEMONS)
    if not names:
        print("mailctl: no daemon installed", file=sys.stderr)
        return 1
    configure_logging(settings)
    return serve(settings, names)


# How long check-config waits for one database to answer.
CHECK_CONNECT_TIMEOUT_SECONDS = 10.0


def cmd_check_config(args: argparse.Namespace, settings: Settings) -> int:
    """Validates the settings, then (unless ``--no-connect``) connects to
    each database by role, "directory" then "shard NAME" (a shard's
    replicas as its connections will: see ``storage.backend.failover_url``):
    exit 1 naming each one that does not answer, after trying them all."""
    from storage.backend import DEFAULT_SHARD, failover_url

    print(f"configuration OK (storage {settings.storage.url.split('://')[0]})")
    if args.no_connect:
        return 0
    roles = {"directory": settings.storage.url}
    if DEFAULT_SHARD not in settings.storage.shards:
        print(f"shard {DEFAULT_SHARD}: the directory's database")
    for name, shard in settings.storage.shards.items():
        roles[f"shard {name}"] = failover_url(shard.url, shard.replicas)
    failed = 0
    for role, url in roles.items():
        try:
            print(f"{role}: OK ({asyncio.run(_check_database(url))})")
        except Exception as exc:  # every driver failure: reported, never a traceback
            failed += 1
            print(f"mailctl: {role}: {exc}", file=sys.stderr)
    return 1 if failed else 0


async def _check_database(url: str) -> str:
    """Connects to ``url`` and reads its schema version without writing
    anything (an SQLite file not made yet is created at the first start).
    Returns what was found; raises an exception that names the URL, without
    its password, and says why."""
    import sqlite3

    from sqlalchemy import make_url

    from storage.sql import schema
    from storage.sql.db import Database

    try:
        safe = make_url(url).render_as_string(hide_password=True)
    except Exception as exc:
        raise RuntimeError(f"not a database URL: {exc}") from None
    if url.startswith("sqlite"):
        path = make_url(url).database or ""

        def version() -> int | None:
            if not Path(path).exists():
                return None
            # Read-only: opening through the store would switch the file to WAL.
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
                found = conn.execute("SELECT max(version) FROM schema_version").fetchone()
            return int(found[0] or 0)

        try:
            current = await asyncio.to_thread(version)
        except sqlite3.Error as exc:
            raise RuntimeError(f"cannot read {safe}: {exc}") from None
        if current is None:
            return f"{safe}, not created yet"
        return f"{safe}, schema version {current}"
    db = Database(url)
    try:
        async with asyncio.timeout(CHECK_CONNECT_TIMEOUT_SECONDS), db.read() as conn:
            current = await schema.current_version(conn)
    except Exception as exc:
        cause = exc.__cause__ or exc  # the driver's own words, not the client's
        raise RuntimeError(f"cannot connect to {safe}: {cause or type(cause).__name__}") from None
    finally:
        await db.close()
    return f"{safe}, schema version {current}"


# --- domains, accounts, aliases ---------------------------------------------


def cmd_domain(args: argparse.Namespace, settings: Settings) -> int:
    async def act(storage) -> int:
        d = storage.directory
        if args.action == "add":
            await d.add_domain(args.name)
            print(f"domain {args.name.lower()} added")
        elif args.action == "remove":
            await d.remove_domain(args.name)
            print(f"domain {args.name.lower()} removed")
        else:
            for domain in await d.list_domains():
                print(domain.name)
        return 0

    return with_storage(settings, act)


def _quota(value: str | None) -> int | None:
    if value is None or value.lower() in ("", "none", "unlimited"):
        return None
    units = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
    suffix = value[-1].lower()
    if suffix in units:
        return int(float(value[:-1]) * units[suffix])
    return int(value)


def cmd_account(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "move":
        return cmd_account_move(args, settings)
    password = read_password(args) if args.action in ("add", "passwd") else ""

    async def act(storage) -> int:
        d = storage.directory
        if args.action == "add":
            account = await d.add_account(args.address, password, _quota(args.quota), args.shard)
            print(f"account {account.address} added (shard {account.shard})")
        elif args.action == "passwd":
            await d.set_password(args.address, password)
            print(f"password of {args.address.lower()} changed")
        elif args.action == "remove":
            await d.remove_account(args.address)
            print(f"account {args.address.lower()} removed")
        else:
            for account in await d.list_accounts(args.domain):
                quota = "unlimited" if account.quota_bytes is None else str(account.quota_bytes)
                used = await storage.mail(account).quota_used(account.id)
                print(f"{account.address}\tshard={account.shard}\tquota={quota}\tused={used}")
        return 0

    return with_storage(settings, act)


def cmd_alias(args: argparse.Namespace, settings: Settings) -> int:
    async def act(storage) -> int:
        d = storage.directory
        if args.action == "add":
            await d.add_alias(args.source, args.target)
            print(f"alias {args.source.lower()} -> {args.target} added")
        elif args.action == "remove":
            await d.remove_alias(args.source, args.target)
            print(f"alias {args.source.lower()} removed")
        else:
            for alias in await d.list_aliases():
                print(f"{alias.source}\t{alias.target}")
        return 0

    return with_storage(settings, act)


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    from mailctl.importer import ProgressBar, import_messages, open_source

    async def act(storage) -> int:
        account = await storage.directory.get_account(args.account)
        total, messages = await asyncio.to_thread(open_source, args.kind, Path(args.path))
        bar = ProgressBar(total) if not args.quiet else None
        count = await import_messages(
            storage, account, args.mailbox, total, messages, bar.update if bar else None
        )
        print(f"imported {count} messages into {account.address}/{args.mailbox}")
        return 0

    return with_storage(settings, act)


# --- parser -----------------------------------------------------------------


def _config_options(parser: argparse.ArgumentParser, after_command: bool) -> None:
    """``-c FILE`` and repeatable ``-o section.key=value``, before the
    subcommand or after it. argparse lets a subcommand's values replace the
    main parser's, so those after it go to their own names and
    :func:`_merge_config_options` joins the two."""
    prefix = "sub_" if after_command else ""
    parser.add_argument("-c", "--config", dest=f"{prefix}config", help="configuration file (TOML)")
    parser.add_argument(
        "-o",
        dest=f"{prefix}overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting (repeatable)",
    )


def _merge_config_options(args: argparse.Namespace) -> None:
    """One ``config`` and ``overrides``: a ``-c`` after the subcommand wins,
    and every ``-o`` applies, those after the subcommand last (so they win)."""
    args.config = args.sub_config or args.config
    args.overrides = args.overrides + args.sub_overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailctl", description="shardmail administration")
    _config_options(parser, after_command=False)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func: Callable[..., int], help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        _config_options(p, after_command=True)
        p.set_defaults(func=func)
        return p

    p = command("serve", cmd_serve, "run every daemon (server.processes worker processes)")
    p.add_argument("--only", action="append", choices=DAEMONS, help="run only these daemons")
    p = command("check-config", cmd_check_config, "validate the configuration and exit")
    p.add_argument(
        "--no-connect",
        action="store_true",
        help="only validate; do not connect to the databases",
    )

    p = command("domain", cmd_domain, "manage local domains")
    p.add_argument("action", choices=("add", "list", "remove"))
    p.add_argument("name", nargs="?")

    p = command("account", cmd_account, "manage accounts")
    p.add_argument("action", choices=("add", "list", "passwd", "remove", "move"))
    p.add_argument("address", nargs="?")
    p.add_argument("--quota", help="e.g. 2G, 500M, unlimited")
    p.add_argument("--shard", help="shard for a new account")
    p.add_argument("--to", help="with move: the shard to move the account to (online)")
    p.add_argument("--abort", action="store_true", help="with move: roll back an unfinished move")
    p.add_argument("--domain", help="with list: only this domain")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")

    p = command("alias", cmd_alias, "manage aliases (address or @domain catch-all)")
    p.add_argument("action", choices=("add", "list", "remove"))
    p.add_argument("source", nargs="?")
    p.add_argument("target", nargs="?")

    add_queue_parser(command)  # queue list|show|retry|delete|hold|release|suppressions|unsuppress
    add_dkim_parser(command)  # dkim generate|show DOMAIN
    add_dmarc_parser(command)  # dmarc reports [--domain D] | show REPORT_ID
    add_shard_parser(command)  # shard list [--json] | drain NAME [--to SHARD ...]
    add_blobs_parser(command)  # blobs stats|verify
    add_spam_parser(command)  # spam show|allow|block|remove|threshold ACCOUNT ...
    add_acl_parser(command)  # acl grant|revoke|list OWNER ...
    add_tlsrpt_parser(command)  # tlsrpt send [--now | --day DATE]

    p = command("import", cmd_import, "import an mbox file or a Maildir")
    p.add_argument("kind", choices=("mbox", "maildir"))
    p.add_argument("account")
    p.add_argument("mailbox", nargs="?", default="INBOX")
    p.add_argument("--from", dest="path", required=True, help="mbox file or Maildir folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


REQUIRED = {
    ("domain", "add"): ("name",),
    ("domain", "remove"): ("name",),
    ("account", "add"): ("address",),
    ("account", "passwd"): ("address",),
    ("account", "remove"): ("address",),
    ("account", "move"): ("address",),
    ("alias", "add"): ("source", "target"),
    ("alias", "remove"): ("source",),
    ("shard", "drain"): ("name",),
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    _merge_config_options(args)
    for name in REQUIRED.get((args.command, getattr(args, "action", None)), ()):
        if not getattr(args, name, None):
            parser.error(f"{args.command} {args.action}: {name} is required")
    settings = settings_from_args(args)
    raise SystemExit(args.func(args, settings))


if __name__ == "__main__":
    main()
