"""Big-mailbox latency: SELECT, SEARCH, the API's search and folder pages on 100,000 messages.

One account's INBOX is filled with ``--messages`` realistic messages of
about 4 KB (several paragraphs drawn from a Zipf-weighted vocabulary,
named senders, a few HTML alternatives and attachments, 3% unseen) through
the import path (``mailctl.importer.import_messages``: the single ingest,
many messages in flight, no SMTP). Then the real daemons run in processes
of their own (``python -m imapd``, ``python -m httpapi``) and each query
below runs ``--queries`` times, one at a time, from one client:

==================  =====================================================
select              imaplib ``SELECT INBOX``
uid_search_body     ``UID SEARCH BODY <word>`` (a word in about 1-5%)
search_subject      ``SEARCH SUBJECT <word>``
search_from         ``SEARCH FROM <name>`` (one sender of 400)
search_unseen       ``SEARCH UNSEEN``
sort_date           ``SORT (DATE) UTF-8 ALL`` (RFC 5256)
sort_subject        ``SORT (SUBJECT) UTF-8 ALL`` (base-subject extraction)
thread_references   ``THREAD REFERENCES UTF-8 ALL``
api_search          ``GET /v1/search?q=<word>`` (first page, 50)
api_page_1          ``GET /v1/folders/<inbox>/messages?limit=50``
api_page_100        the same, page 100 (its cursor fetched beforehand)
==================  =====================================================

Reported: p50 and p95 in milliseconds per query. ``--backend`` picks
SQLite (a data directory), PostgreSQL (a throwaway ``tests.pgserver``
server) or both, one after the other. The throwaway PostgreSQL server is
sized as README's Production section recommends for a mail database
(``shared_buffers`` a quarter of this host's memory, ``random_page_cost``
1.1); ``--pg-server test`` keeps the test suite's settings (64 MB, 4.0)
instead. The report names the server's settings either way, also for a
server given by ``--storage-url``. Filling takes minutes: ``--keep
DIR`` keeps a SQLite data directory (and ``--storage-url`` names a filled
PostgreSQL database) to be measured again without filling; ``--fill-workers
N`` imports in N processes at once (each through the same import path).
Never part of the test run::

    python -m bench.search_bench --messages 100000 --backend both
    python -m bench.search_bench --backend sqlite --keep /tmp/search-100k
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import http.client
import imaplib
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bigmsg_bench import tree_cpu_seconds
from bench.dovecot_peer import free_port
from bench.imap_bench import stop_process

DOMAIN = "example.org"
LOGIN = f"big@{DOMAIN}"
PASSWORD = "bench password"
SEED = 20261205
VOCABULARY = 3000  # distinct body words; Zipf-weighted, so a few are common
SENDERS = 400
UNSEEN_SHARE = 0.03

# English letter frequencies (per mille): words made of them have trigrams as
# varied as a real language's, which is what a trigram index works with.
_LETTERS = "etaoinshrdlcumwfgypbvkjxqz"
_LETTER_WEIGHTS = (127, 91, 82, 75, 70, 67, 63, 61, 60, 43, 40, 28, 28, 24, 24, 22, 20, 20, 19,
                   15, 10, 8, 2, 2, 1, 1)
_FIRST = "Anna Bruno Clara David Emma Felix Greta Hugo Ines Jonas Karla Leon Mia Nora Otto".split()
_LAST = "Keller Novak Rossi Berger Silva Moreau Jansen Lindqvist Kowalski Dubois Weber".split()


def vocabulary(rng: random.Random) -> list[str]:
    words: set[str] = set()
    while len(words) < VOCABULARY:
        length = min(12, max(2, round(rng.gauss(6, 2))))
        words.add("".join(rng.choices(_LETTERS, weights=_LETTER_WEIGHTS, k=length)))
    return sorted(words)


class Corpus:
    """Deterministic messages and the query terms that fit them."""

    def __init__(self) -> None:
        rng = random.Random(SEED)
        self.words = vocabulary(rng)
        rng.shuffle(self.words)
        # Zipf weights: the word of rank r is drawn with weight 1/r.
        self.weights = [1.0 / (r + 1) for r in range(len(self.words))]
        self.senders = [
            (f"{rng.choice(_FIRST)} {rng.choice(_LAST)}{n}", f"s{n}.{rng.choice(_LAST).lower()}")
            for n in range(SENDERS)
        ]

    def body_words(self) -> list[str]:
        """Query words of four letters or more from the rarer half of the
        vocabulary (ranks 1500 and up: each in roughly 1-4% of bodies), as
        people search for a word that picks some mail out."""
        return [w for w in self.words[1500:] if len(w) >= 4]

    def subject_words(self) -> list[str]:
        return [w for w in self.words[:40] if len(w) >= 4]

    def sender_names(self) -> list[str]:
        return [name for name, _ in self.senders]

    def message(self, n: int) -> tuple[bytes, tuple[str, ...], dt.datetime]:
        rng = random.Random(SEED * 1_000_003 + n)
        name, local = self.senders[rng.randrange(SENDERS)]
        when = dt.datetime(2024, 1, 1, tzinfo=dt.UTC) + dt.timedelta(minutes=7 * n)
        subject = " ".join(rng.choices(self.words[:200], k=rng.randint(3, 8)))
        paragraphs = []
        size = 0
        target = rng.randint(2500, 4500)
        while size < target:
            words = rng.choices(self.words, weights=self.weights, k=rng.randint(20, 70))
            text = " ".join(words).capitalize() + "."
            paragraphs.append(text)
            size += len(text) + 4
        body = "\r\n\r\n".join(_wrap(p) for p in paragraphs)
        header = (
            f"Return-Path: <{local}@example.net>\r\n"
            f"Received: from mx{n % 7}.example.net (mx{n % 7}.example.net [192.0.2.{n % 250}])"
            f"\r\n\tby mail.{DOMAIN} with ESMTPS id {n:08x}; {_date(when)}\r\n"
            f"From: {name} <{local}@example.net>\r\n"
            f"To: Big Box <{LOGIN}>\r\n"
            f"Subject: {subject}\r\n"
            f"Date: {_date(when)}\r\n"
            f"Message-ID: <{n}.{local}@example.net>\r\n"
            "MIME-Version: 1.0\r\n"
        )
        if n % 10 == 0:  # an HTML alternative now and then
            boundary = f"=_alt{n}"
            raw = (
                header + f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n\r\n'
                f"--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
                f"--{boundary}\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
                f"<html><body><p>{paragraphs[0]}</p></body></html>\r\n--{boundary}--\r\n"
            )
        else:
            raw = header + "Content-Type: text/plain; charset=utf-8\r\n\r\n" + body + "\r\n"
        flags = () if rng.random() < UNSEEN_SHARE else ("\\Seen",)
        return raw.encode(), flags, when


def _wrap(text: str, width: int = 76) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    lines.append(line)
    return "\r\n".join(lines)


def _date(when: dt.datetime) -> str:
    return when.strftime("%a, %d %b %Y %H:%M:%S +0000")


# ---------------------------------------------------------------- filling
def overrides(data_dir: Path, storage_url: str) -> list[str]:
    items = [f'server.data_dir="{data_dir}"']
    if storage_url:
        items.append(f'storage.url="{storage_url}"')
    return items


async def fill(data_dir: Path, storage_url: str, count: int, corpus: Corpus,
               workers: int = 1) -> None:
    """Creates the account and imports ``count`` messages, unless it has them already.

    ``workers`` > 1: that many processes import at once (message ``n`` in
    process ``n % workers``), each through the same import path; the UIDs
    then follow arrival order, not ``n``."""
    from conf.settings import load_settings
    from storage import StorageError, open_storage, password_hasher

    settings = load_settings(None, overrides(data_dir, storage_url))
    storage = await open_storage(
        settings.storage, data_dir=data_dir, password_hasher=password_hasher(settings.auth)
    )
    try:
        try:
            account = await storage.directory.get_account(LOGIN)
        except StorageError:
            if DOMAIN not in {d.name for d in await storage.directory.list_domains()}:
                await storage.directory.add_domain(DOMAIN)
            account = await storage.directory.add_account(LOGIN, PASSWORD)
        mail = storage.mail(account)
        inbox = await mail.get_mailbox(account.id, "INBOX")
        have = (await mail.status(account.id, inbox.id)).messages
    finally:
        await storage.close()
    if have >= count:
        print(f"# {have} messages already there", flush=True)
    else:
        started = time.perf_counter()
        if workers > 1:
            await asyncio.to_thread(_fill_processes, data_dir, storage_url, have, count, workers)
        else:
            await fill_part(data_dir, storage_url, corpus, range(have, count))
        done = count - have
        took = time.perf_counter() - started
        print(f"# imported {done} messages in {took:.0f} s ({done / took:.0f} msg/s)",
              flush=True)
        if storage_url.startswith("postgresql"):
            await _analyze(storage_url)
    await _wait_for_fts(data_dir, storage_url)


async def _pg_connect(storage_url: str) -> Any:
    """An asyncpg connection to the database of a ``postgresql+asyncpg``
    storage URL."""
    import asyncpg

    return await asyncpg.connect(storage_url.replace("postgresql+asyncpg://", "postgresql://", 1))


async def _analyze(storage_url: str) -> None:
    """ANALYZE after a bulk import, as autovacuum would within a minute or
    two of it: the queries are timed against the planner's statistics of
    the filled tables, not of empty ones."""
    started = time.perf_counter()
    conn = await _pg_connect(storage_url)
    try:
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    print(f"# ANALYZE in {time.perf_counter() - started:.0f} s", flush=True)


def _fill_processes(data_dir: Path, storage_url: str, have: int, count: int,
                    workers: int) -> None:
    """Runs ``workers`` processes of :func:`fill_part`, each over its share."""
    parts = [
        subprocess.Popen([sys.executable, "-m", "bench.search_bench", "--fill-part",
                          f"{k}/{workers}/{have}/{count}", "--keep", str(data_dir),
                          "--storage-url", storage_url],
                         cwd=Path(__file__).resolve().parent.parent)
        for k in range(workers)
    ]
    if any(p.wait() != 0 for p in parts):
        raise SystemExit("a fill worker failed")


async def fill_part(data_dir: Path, storage_url: str, corpus: Corpus, numbers: range) -> None:
    """Imports messages ``numbers`` of the corpus into the bench account."""
    from conf.settings import load_settings
    from mailctl.importer import SourceMessage, import_messages
    from storage import open_storage, password_hasher

    settings = load_settings(None, overrides(data_dir, storage_url))
    storage = await open_storage(
        settings.storage, data_dir=data_dir, password_hasher=password_hasher(settings.auth)
    )
    try:
        account = await storage.directory.get_account(LOGIN)

        def source() -> Iterator[SourceMessage]:
            for n in numbers:
                raw, flags, when = corpus.message(n)
                yield SourceMessage(raw, flags, when)

        await import_messages(storage, account, "INBOX", len(numbers), source(), concurrency=64)
    finally:
        await storage.close()


async def _wait_for_fts(data_dir: Path, storage_url: str) -> None:
    """On SQLite, until the background full-text indexer has caught up
    (queries must measure the index, not the queue of unindexed mail)."""
    if storage_url:
        return
    from storage.sql.fts import FtsIndexer

    db_file = str(data_dir / "shardmail.db")
    conn = sqlite3.connect(db_file)
    pending = conn.execute("SELECT count(*) FROM fts_pending").fetchone()[0]
    conn.close()
    if not pending:
        return

    async def drain() -> None:
        async def clear(seq: int | None, rowid: int | None) -> None:
            with contextlib.closing(sqlite3.connect(db_file, timeout=30)) as c, c:
                if seq is not None:
                    c.execute("DELETE FROM fts_pending WHERE seq <= ?", (seq,))
                if rowid is not None:
                    c.execute("DELETE FROM fts_deleted WHERE rowid <= ?", (rowid,))

        indexer = FtsIndexer(db_file, clear, batch=5000)
        try:
            while await indexer.run_once():
                pass
        finally:
            await indexer.close()

    started = time.perf_counter()
    await drain()
    print(f"# indexed {pending} queued messages in {time.perf_counter() - started:.0f} s",
          flush=True)


# ---------------------------------------------------------------- daemons
def start_daemon(name: str, data_dir: Path, storage_url: str, extra: list[str]) -> (
        subprocess.Popen[bytes]):
    cmd = [sys.executable, "-m", name]
    for item in [*overrides(data_dir, storage_url), 'server.log_level="warning"', *extra]:
        cmd += ["-o", item]
    logfile = data_dir / f"{name}.log"
    with open(logfile, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if b"shardmail ready" in logfile.read_bytes():
            return proc
        time.sleep(0.1)
    stop_process(proc)
    raise RuntimeError(f"{name} did not start:\n" + logfile.read_text()[-3000:])


def start_imapd(data_dir: Path, storage_url: str, port: int) -> subprocess.Popen[bytes]:
    return start_daemon("imapd", data_dir, storage_url, [
        f"imap.listen=['127.0.0.1:{port}']",
        f"imap.tls_listen=['127.0.0.1:{free_port()}']",
        f"pop3.listen=['127.0.0.1:{free_port()}']",
        f"pop3.tls_listen=['127.0.0.1:{free_port()}']",
        "auth.allow_plaintext=true",
    ])


def start_httpapi(data_dir: Path, storage_url: str, port: int) -> subprocess.Popen[bytes]:
    return start_daemon("httpapi", data_dir, storage_url, [
        f"http.listen=['127.0.0.1:{port}']",
        "http.rate_limit_per_user=0",
        "http.rate_limit_per_ip=0",
    ])


# ---------------------------------------------------------------- queries
Timings = dict[str, list[float]]


# Query names to run (``--only``); None: all of them.
ONLY: set[str] | None = None


def wanted(name: str) -> bool:
    return ONLY is None or name in ONLY


# The imapd process while its queries run: each IMAP query's CPU of it
# and its content workers is reported beside the wall clock (issue #24;
# the machine is shared: CPU is the steadier figure).
IMAPD_PID: int | None = None


def timed(timings: Timings, name: str, call: Callable[..., Any], *args: object) -> Any:
    cpu = tree_cpu_seconds(IMAPD_PID) if IMAPD_PID is not None else 0.0
    started = time.perf_counter()
    result = call(*args)
    timings.setdefault(name, []).append((time.perf_counter() - started) * 1000)
    if IMAPD_PID is not None:
        spent = (tree_cpu_seconds(IMAPD_PID) - cpu) * 1000
        timings.setdefault(f"{name} (imapd CPU)", []).append(spent)
    return result


def imap_queries(port: int, corpus: Corpus, queries: int, timings: Timings) -> None:
    rng = random.Random(7)
    imap = imaplib.IMAP4("127.0.0.1", port)
    imap.login(LOGIN, PASSWORD)
    try:
        for _ in range(queries):
            typ, data = timed(timings, "select", imap.select, "INBOX")
            assert typ == "OK", data
            # The words are drawn whether or not their query runs (--only),
            # so every run asks the same words.
            word = rng.choice(corpus.body_words())
            if wanted("uid_search_body"):
                typ, data = timed(timings, "uid_search_body", imap.uid, "SEARCH", "BODY", word)
                assert typ == "OK" and data[0], (word, data)
            word = rng.choice(corpus.subject_words())
            if wanted("search_subject"):
                typ, data = timed(timings, "search_subject", imap.search, None, "SUBJECT", word)
                assert typ == "OK" and data[0], (word, data)
            name = rng.choice(corpus.sender_names())
            if wanted("search_from"):
                typ, data = timed(timings, "search_from", imap.search, None, "FROM", f'"{name}"')
                assert typ == "OK" and data[0], (name, data)
            if wanted("search_unseen"):
                typ, data = timed(timings, "search_unseen", imap.search, None, "UNSEEN")
                assert typ == "OK" and data[0], data
            if wanted("sort_date"):
                typ, data = timed(timings, "sort_date", imap.sort, "(DATE)", "UTF-8", "ALL")
                assert typ == "OK" and data[0], data
            if wanted("sort_subject"):
                typ, data = timed(timings, "sort_subject", imap.sort, "(SUBJECT)", "UTF-8", "ALL")
                assert typ == "OK" and data[0], data
            if wanted("thread_references"):
                typ, data = timed(timings, "thread_references", imap.thread, "REFERENCES",
                                  "UTF-8", "ALL")
                assert typ == "OK" and data[0], data
    finally:
        imap.logout()


class Api:
    """A keep-alive HTTP client for the JSON API."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.headers: dict[str, str] = {}

    def call(self, method: str, path: str, body: object = None) -> dict[str, object]:
        payload = json.dumps(body).encode() if body is not None else None
        headers = dict(self.headers)
        if payload is not None:
            headers["Content-Type"] = "application/json"
        self.conn.request(method, path, body=payload, headers=headers)
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{method} {path}: {resp.status} {data[:300]!r}")
        return json.loads(data)  # type: ignore[no-any-return]

    def login(self) -> None:
        token = self.call("POST", "/v1/login", {"address": LOGIN, "password": PASSWORD})["token"]
        self.headers["Authorization"] = f"Bearer {token}"


def api_queries(port: int, corpus: Corpus, queries: int, timings: Timings) -> None:
    rng = random.Random(11)
    api = Api(port)
    api.login()
    folders = api.call("GET", "/v1/folders")["folders"]
    inbox = next(f["id"] for f in folders if f["name"] == "INBOX")  # type: ignore[index]
    page_path = f"/v1/folders/{inbox}/messages?limit=50"
    cursor = None
    for _ in range(99):  # walk to page 100 once, untimed
        page = api.call("GET", page_path + (f"&cursor={cursor}" if cursor else ""))
        cursor = page["next_cursor"]
        assert cursor, "fewer than 100 pages"
    page_100 = f"{page_path}&cursor={cursor}"
    for _ in range(queries):
        word = rng.choice(corpus.body_words())
        query = "/v1/search?" + urllib.parse.urlencode({"q": word})
        if wanted("api_search"):
            found = timed(timings, "api_search", api.call, "GET", query)
            assert found["messages"], word
        first = timed(timings, "api_page_1", api.call, "GET", page_path)
        assert len(first["messages"]) == 50
        hundredth = timed(timings, "api_page_100", api.call, "GET", page_100)
        assert len(hundredth["messages"]) == 50


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(backend: str, timings: Timings) -> None:
    print(f"\n{backend}: p50 / p95 ms over {len(next(iter(timings.values())))} queries")
    for name, values in timings.items():
        print(f"  {name:<16} {statistics.median(values):9.1f} {percentile(values, 0.95):9.1f}")
    print(f"  (load average {' '.join(f'{x:.1f}' for x in os.getloadavg())})")


def sized_settings() -> dict[str, str]:
    """postgresql.conf for a mail database as README's Production section
    recommends: ``shared_buffers`` about a quarter of the host's memory,
    ``random_page_cost`` 1.1 (SSD)."""
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return {"shared_buffers": f"{memory // 4 // 2**20}MB", "random_page_cost": "1.1"}


async def server_settings(storage_url: str) -> str:
    """The settings of the PostgreSQL server behind ``storage_url`` that
    decide big-mailbox plans, as one line for the report."""
    conn = await _pg_connect(storage_url)
    try:
        names = ("shared_buffers", "random_page_cost", "effective_cache_size", "work_mem")
        values = [await conn.fetchval(f"SHOW {name}") for name in names]
    finally:
        await conn.close()
    return ", ".join(f"{name} {value}" for name, value in zip(names, values, strict=True))


def measure(data_dir: Path, storage_url: str, corpus: Corpus, args: argparse.Namespace,
            backend: str) -> None:
    started = time.perf_counter()
    asyncio.run(fill(data_dir, storage_url, args.messages, corpus, args.fill_workers))
    print(f"# {backend}: ready after {time.perf_counter() - started:.0f} s", flush=True)
    if storage_url:
        backend += f" ({asyncio.run(server_settings(storage_url))})"
    imap_port, http_port = free_port(), free_port()
    imapd = start_imapd(data_dir, storage_url, imap_port)
    httpapi = start_httpapi(data_dir, storage_url, http_port)
    timings: Timings = {}
    global IMAPD_PID
    try:
        IMAPD_PID = imapd.pid
        imap_queries(imap_port, corpus, args.queries, timings)
        IMAPD_PID = None
        api_queries(http_port, corpus, args.queries, timings)
    finally:
        stop_process(imapd)
        stop_process(httpapi)
    report(backend, timings)


def run_sqlite(corpus: Corpus, args: argparse.Namespace) -> None:
    if args.keep:
        measure(Path(args.keep), "", corpus, args, "SQLite")
        return
    tmp = Path(tempfile.mkdtemp(prefix="search-bench-"))
    try:
        measure(tmp / "data", "", corpus, args, "SQLite")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_postgresql(corpus: Corpus, args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="search-bench-pg-"))
    if args.storage_url:
        try:
            measure(Path(args.keep) if args.keep else tmp / "data", args.storage_url, corpus,
                    args, "PostgreSQL")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    from tests.pgserver import PgServer

    server = PgServer.start(settings=sized_settings() if args.pg_server == "sized" else None)
    try:
        url = asyncio.run(server.create_database())
        measure(tmp / "data", url, corpus, args, "PostgreSQL")
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--keep", help="a data directory kept between runs (filled once)")
    parser.add_argument("--storage-url", default="",
                        help="a PostgreSQL database to use (filled if short of messages)")
    parser.add_argument("--only", default="",
                        help="comma-separated query names to time (default: all); "
                             "SELECT and the API's pages always run")
    parser.add_argument("--pg-server", choices=("sized", "test"), default="sized",
                        help="the throwaway PostgreSQL server's settings: as README's "
                             "Production section recommends (default), or the test suite's")
    parser.add_argument("--fill-workers", type=int, default=1,
                        help="processes importing at once while filling (default 1)")
    parser.add_argument("--fill-part", help=argparse.SUPPRESS)  # k/workers/first/end
    args = parser.parse_args()
    if args.fill_part:
        k, workers, first, end = (int(x) for x in args.fill_part.split("/"))
        asyncio.run(fill_part(Path(args.keep), args.storage_url, Corpus(),
                              range(first + k, end, workers)))
        return
    if args.only:
        global ONLY
        ONLY = {name.strip() for name in args.only.split(",")}
    corpus = Corpus()
    if args.backend in ("sqlite", "both"):
        run_sqlite(corpus, args)
    if args.backend in ("postgresql", "both"):
        run_postgresql(corpus, args)


if __name__ == "__main__":
    main()
