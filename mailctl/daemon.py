"""Running daemons: one process, one event loop, clean shutdown.

Contract with each daemon package (``mtad``, ``imapd``, ``httpapi``): it
exposes ``<pkg>.service.start(settings, storage, tls) -> Service`` where the
service has ``async close()``. ``mailctl serve`` runs every daemon that is
installed on one loop; ``python -m <pkg>`` runs one. SIGTERM and SIGINT
close the services (sessions end, workers stop), then storage.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from conf.settings import ConfigError, Settings, load_settings
from conf.tls import server_context

DAEMONS = ("mtad", "imapd", "httpapi")
log = logging.getLogger("shardmail")


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """``-c FILE`` and repeatable ``-o section.key=value``, as Dovecot's ``-o``."""
    parser.add_argument("-c", "--config", help="configuration file (TOML)")
    parser.add_argument(
        "-o",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one setting (repeatable)",
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    try:
        return load_settings(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.server.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def available_daemons(names: Sequence[str] = DAEMONS) -> list[str]:
    """The daemons of ``names`` whose service module is installed."""
    found = []
    for name in names:
        try:
            importlib.import_module(f"{name}.service")
        except ModuleNotFoundError as exc:
            if exc.name not in (name, f"{name}.service"):
                raise
            continue
        found.append(name)
    return found


async def run_daemons(settings: Settings, names: Sequence[str]) -> None:
    """Start the named daemons, wait for SIGTERM/SIGINT, stop them cleanly."""
    from storage import open_storage

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    tls = await asyncio.to_thread(server_context, settings)
    storage = await open_storage(settings.storage)
    services: list[Any] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        for name in names:
            module = importlib.import_module(f"{name}.service")
            services.append(await module.start(settings, storage, tls))
            log.info("%s started", name)
        print(f"shardmail ready: {' '.join(names)}", file=sys.stderr, flush=True)
        await stop.wait()
        log.info("shutting down")
    finally:
        for service in reversed(services):
            try:
                await service.close()
            except Exception:
                log.exception("error while stopping a service")
        await storage.close()


def daemon_main(name: str, argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m <name>`` and the ``<name>`` console script."""
    parser = argparse.ArgumentParser(prog=name, description=f"shardmail {name}")
    add_config_options(parser)
    args = parser.parse_args(argv)
    settings = settings_from_args(args)
    configure_logging(settings)
    asyncio.run(run_daemons(settings, [name]))
