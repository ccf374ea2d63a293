"""Running daemons: one event loop per process, clean shutdown.

Contract with each daemon package (``mtad``, ``imapd``, ``httpapi``): it
exposes ``<pkg>.service.start(settings, storage, tls) -> Service`` where the
service has ``async close()``, and optionally ``async prepare(settings)``,
run once by the supervisor before any worker starts. This module lives below
the daemons and imports none of them by name. ``mailctl serve`` runs every daemon that is
installed on one loop; ``python -m <pkg>`` runs one. SIGTERM and SIGINT
close the services (sessions end, workers stop), then storage.

With ``server.processes`` above 1 (0: one per CPU) the command becomes a
supervisor: it prepares what the workers share (migrations, the
self-signed certificate, the HTTP token secret), binds every listening
socket once (:func:`runtime.listen.inherit`), forks that many workers that
each run the daemons on those same sockets (the kernel spreads connections
among the processes accepting on them), restarts a worker that dies, and on
SIGTERM/SIGINT stops them all and waits for them.

Each daemon's service module lists the settings it listens on in
``LISTEN_KEYS``. A listener that cannot be bound (a port in use, by another
program or by another shardmail site) stops the command with a message
naming the setting and exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import importlib
import logging
import os
import signal
import sys
import time
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from conf.settings import ConfigError, Settings, load_settings
from conf.tls import server_context
from runtime.listen import ListenError, inherit
from runtime.scrape import start_metrics

DAEMONS = ("mtad", "imapd", "httpapi")
log = logging.getLogger("shardmail")
T = TypeVar("T")


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """``-c FILE`` and repeatable ``-o section.key=value``, as Dovecot's ``-o``."""
    parser.add_argument("-c", "--config", help="configuration file (TOML)")
    add_override_option(parser)


def add_override_option(parser: argparse.ArgumentParser, help: str = "") -> None:
    """Repeatable ``-o section.key=value`` into ``args.overrides``."""
    parser.add_argument(
        "-o",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=help or "override one setting (repeatable)",
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    try:
        return load_settings(args.config, args.overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def configure_logging(settings: Settings) -> None:
    # Several workers write to one log: each line says which process wrote it.
    pid = "[%(process)d] " if worker_count(settings) > 1 else ""
    logging.basicConfig(
        level=settings.server.log_level,
        format=f"%(asctime)s {pid}%(levelname)s %(name)s: %(message)s",
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


def start_blob_gc(settings: Settings, storage: Any) -> asyncio.Task[None] | None:
    """The blob garbage collection loop of this process (``storage/blob/gc.py``:
    the site's instances take turns through a lease); None when
    ``storage.gc_interval_seconds`` is 0."""
    from storage.blob.gc import gc_loop

    interval = settings.storage.gc_interval_seconds
    if interval <= 0:
        return None
    return asyncio.create_task(
        gc_loop(storage, interval, settings.storage.gc_grace_seconds), name="blob-gc"
    )


async def run_daemons(settings: Settings, names: Sequence[str], slot: int = 0) -> None:
    """Start the named daemons and this process's metrics endpoint (worker
    ``slot`` of a supervisor; see :mod:`runtime.scrape`), wait for
    SIGTERM/SIGINT, stop them cleanly."""
    from storage import contentpool, open_storage, password_hasher
    from storage.shared import close_shared_state, shared_state

    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tls = await asyncio.to_thread(server_context, settings)
    storage = await open_storage(
        settings.storage,
        password_hasher=password_hasher(settings.auth),
        redis_url=settings.redis.url,
    )
    # Chosen once, here: the limits every daemon of this process counts in
    # (Redis with [redis] url, shared by the site's instances; else in-process).
    shared_state(storage, settings.redis)
    pool = contentpool.configure(
        settings.server.content_workers, settings.server.content_time_limit_seconds
    )
    services: list[Any] = []
    metrics = await start_metrics(settings, slot)
    gc_task = start_blob_gc(settings, storage)
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
        if gc_task is not None:
            from storage.tasks import stop_task

            await stop_task(gc_task)
        for service in reversed(services):
            try:
                await service.close()
            except Exception:
                log.exception("error while stopping a service")
        for server in metrics:
            server.close()
        pool.close()
        await close_shared_state(storage)
        await storage.close()


# A worker that dies this soon after it started counts as failing to start;
# this many such failures in a row stop the supervisor (a port in use, a
# broken config file): systemd then reports the unit failed.
QUICK_EXIT_SECONDS = 5.0
QUICK_EXITS_BEFORE_GIVING_UP = 3


def run_loop(settings: Settings, main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a new event loop of the kind
    ``server.event_loop`` names (see :class:`conf.settings.ServerSettings`;
    settings refuse "uvloop" when it is not installed, and "auto" then
    takes the standard loop)."""
    if settings.server.event_loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(main)
    return asyncio.run(main)


def worker_count(settings: Settings) -> int:
    """``server.processes``, with 0 meaning one per CPU."""
    return settings.server.processes or os.cpu_count() or 1


def serve(settings: Settings, names: Sequence[str]) -> int:
    """Run the named daemons in this process, or under a supervisor of
    ``worker_count`` worker processes. Returns the exit status."""
    workers = worker_count(settings)
    try:
        if workers == 1:
            run_loop(settings, run_daemons(settings, names))
            return 0
        run_loop(settings, prepare_shared_state(settings, names))
        inherit(listen_addresses(settings, names), share_port=settings.server.share_ports)
    except ListenError as exc:
        print(f"shardmail: {exc}", file=sys.stderr, flush=True)
        return 1
    return supervise(settings, names, workers)


def listen_addresses(settings: Settings, names: Sequence[str]) -> list[tuple[str, str]]:
    """``(setting, address)`` of every listener of the named daemons (each
    service module's ``LISTEN_KEYS``)."""
    found = []
    for name in names:
        module = importlib.import_module(f"{name}.service")
        for key in getattr(module, "LISTEN_KEYS", ()):
            section, _, field = key.partition(".")
            found += [(key, address) for address in getattr(getattr(settings, section), field)]
    return found


async def prepare_shared_state(settings: Settings, names: Sequence[str]) -> None:
    """What every worker would otherwise race to create: the schema
    (migrations), the generated self-signed certificate, the HTTP token
    secret. Runs in the supervisor before it forks."""
    from storage import open_storage, password_hasher

    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    await asyncio.to_thread(server_context, settings)
    storage = await open_storage(
        settings.storage,
        password_hasher=password_hasher(settings.auth),
        redis_url=settings.redis.url,
    )
    await storage.close()
    # Each daemon's service module may export ``prepare(settings)`` for state its
    # workers must find ready (the HTTP token secret); runtime names no daemon.
    for name in names:
        prepare = getattr(importlib.import_module(f"{name}.service"), "prepare", None)
        if prepare is not None:
            await prepare(settings)


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
PR_SET_PDEATHSIG = 1  # prctl(2)


def stop_with_parent(parent: int) -> None:
    """In a worker forked by the supervisor ``parent``: the kernel sends
    it SIGTERM when the supervisor dies, however it dies (a SIGKILL
    included), so no worker is left serving on its own (prctl(2)
    PR_SET_PDEATHSIG, Linux). If the supervisor died before the request
    took effect, stop now."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: systemd's cgroup still stops us
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def supervise(settings: Settings, names: Sequence[str], workers: int) -> int:
    """Fork ``workers`` processes running :func:`run_daemons`; restart any
    that exits while we are not stopping; on SIGTERM/SIGINT send SIGTERM to
    each and wait for all. Returns 0 after a requested stop, 1 if workers
    kept failing to start."""
    children: dict[int, tuple[int, float]] = {}  # pid -> (slot, start time)
    stopping = False

    def spawn(slot: int) -> None:
        # SIGTERM/SIGINT stay blocked across the fork: a stop request that
        # arrives meanwhile is handled once the new pid is in ``children``
        # (so it is told to stop too), and never by the supervisor's own
        # handler running in the child (which would leave it serving).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        parent = os.getpid()
        try:
            pid = os.fork()
            if pid == 0:  # the worker
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                stop_with_parent(parent)
            else:
                children[pid] = (slot, time.monotonic())
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        if pid == 0:
            status = 0
            try:
                run_loop(settings, run_daemons(settings, names, slot))
            except BaseException:
                log.exception("worker %d failed", slot)
                status = 1
            finally:
                logging.shutdown()
                os._exit(status)

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("starting %d worker processes", workers)
    for slot in range(workers):
        spawn(slot)
    quick_exits = 0
    status = 0
    while children:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            break
        if pid not in children:
            continue
        slot, started = children.pop(pid)
        if stopping:
            continue
        code = os.waitstatus_to_exitcode(wait_status)
        log.error("worker %d (pid %d) exited with status %d", slot, pid, code)
        quick_exits = quick_exits + 1 if time.monotonic() - started < QUICK_EXIT_SECONDS else 0
        if quick_exits >= QUICK_EXITS_BEFORE_GIVING_UP:
            log.error("workers keep failing to start; stopping")
            status = 1
            stop(signal.SIGTERM, None)
            continue
        time.sleep(min(1.0, 0.1 * 2**quick_exits))  # do not spin on a crash loop
        if not stopping:
            spawn(slot)
    return status


def daemon_main(name: str, argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m <name>`` and the ``<name>`` console script."""
    parser = argparse.ArgumentParser(prog=name, description=f"shardmail {name}")
    add_config_options(parser)
    args = parser.parse_args(argv)
    settings = settings_from_args(args)
    configure_logging(settings)
    raise SystemExit(serve(settings, [name]))
