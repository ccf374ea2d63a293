"""Typed settings: one TOML file validated at start.

Contract: :func:`load_settings` returns a fully resolved :class:`Settings`
(derived paths filled in) or raises :class:`ConfigError` whose message names
the offending key (``server.max_message_size: ...``). Unknown keys are errors.
Defaults serve a single host; ``conf/example.toml`` lists every key.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

log = logging.getLogger(__name__)

class ConfigError(Exception):
    """A configuration problem; the message names the key and is safe to print."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_listen(values: list[str]) -> list[str]:
    for value in values:
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or not host:
            raise ValueError(f"{value!r} is not host:port")
    return values


class ServerSettings(Section):
    hostname: str = "localhost"  # announced in SMTP greetings, Received headers, IMAP greeting
    # The largest message, in octets, wherever it comes in: SMTP (announced
    # as SIZE, RFC 1870), IMAP APPEND (announced as APPENDLIMIT, RFC 7889)
    # and the HTTP API's sends. One limit, so that what one accepts the
    # others can store and hand back.
    max_message_size: int = Field(default=25 * 1024 * 1024, ge=1)
    data_dir: str = "/var/lib/shardmail"
    log_level: str = "INFO"
    # Worker processes of each daemon command, sharing the listening sockets
    # their supervisor opened, which restarts any that dies; 0: one per CPU.
    # Concurrent connections per IP are counted per process; rate limits and
    # login delays too, unless [redis] url makes them the site's.
    processes: int = Field(default=1, ge=0, le=256)
    # Set SO_REUSEPORT on every listener so separately started instances of
    # one site (the templated systemd units name@N.service) share its ports.
    # Off by default: a second, unrelated server (another data dir) on the
    # same port then fails to start with "address in use" instead of
    # silently taking half of the connections. The workers of one
    # server.processes supervisor share its sockets either way.
    share_ports: bool = False
    # Clients not held to the new-connection rate of each protocol
    # (connect_rate_per_ip): loopback by default, where a site's own proxies,
    # webmail and scripts connect on behalf of many users.
    connect_rate_exempt: list[str] = Field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    # Where GET /metrics (Prometheus text format) is served, apart from every
    # public port; each worker of server.processes adds its slot number to
    # the port. Keep it on loopback or a management network; empty: none.
    metrics_listen: list[str] = Field(default_factory=lambda: ["127.0.0.1:9480"])
    # The asyncio event loop implementation: "uvloop" (libuv, installed as
    # a dependency) or "asyncio" (the standard library's). "auto" takes
    # uvloop when it can be imported.
    event_loop: str = "auto"
    # Worker processes of each server process for CPU-heavy content work
    # (parsing messages over 1 MB, sanitizing large HTML for webmail, DKIM
    # signing of outbound mail), so that work never holds the protocol
    # loop's GIL; 0 runs it in a thread (no time limit). A job past
    # content_time_limit_seconds is abandoned, its workers replaced, and the
    # message degraded (no search text, a plain-text view) instead of
    # refused; a signing job gets 1 s more per MB, and past that its
    # delivery is retried later (mtad/outbound/signing.py).
    content_workers: int = Field(default=1, ge=0, le=64)
    content_time_limit_seconds: float = Field(default=5.0, gt=0, le=600)

    _listen = field_validator("metrics_listen")(classmethod(lambda cls, v: _check_listen(v)))

    @field_validator("event_loop")
    @classmethod
    def _loop(cls, v: str) -> str:
        if v not in {"auto", "asyncio", "uvloop"}:
            raise ValueError("must be auto, asyncio or uvloop")
        if v == "uvloop" and importlib.util.find_spec("uvloop") is None:
            raise ValueError("uvloop is not installed")
        return v

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return v.upper()


class TlsSettings(Section):
    cert_file: str = ""  # empty: a self-signed certificate generated in data_dir/tls
    key_file: str = ""
    min_version: str = "TLSv1.2"

    @field_validator("min_version")
    @classmethod
    def _version(cls, v: str) -> str:
        if v not in {"TLSv1.2", "TLSv1.3"}:
            raise ValueError("must be TLSv1.2 or TLSv1.3")
        return v


def _check_database_url(value: str, *, postgresql: bool = False) -> str:
    """A SQLAlchemy URL (``dialect+driver://...``); ``postgresql``: of PostgreSQL."""
    from sqlalchemy import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(value)
    except ArgumentError:
        raise ValueError(f"{value!r} is not a database URL (dialect+driver://...)") from None
    if postgresql and url.get_backend_name() != "postgresql":
        raise ValueError("replicas are PostgreSQL streaming replicas: postgresql+asyncpg://...")
    return value


# A shard's name is stored in accounts.shard (VARCHAR(64)) and typed on
# `mailctl account add --shard NAME`: short, no space, no separator.
SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class ShardSettings(Section):
    """One mail shard: ``[storage.shards.NAME]``."""

    url: str  # SQLAlchemy async URL; several hosts: ?host=h1:p1&host=h2:p2
    # URLs of streaming replicas of this shard (promotion targets): they are
    # added to url's hosts with target_session_attrs=read-write, so that
    # after a promotion every daemon reconnects to the new primary.
    replicas: list[str] = Field(default_factory=list)
    # Share of new accounts placed here (storage/sql/directory.py placement):
    # the shard with the fewest accounts per unit of weight gets the next; 0: none.
    weight: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    # Where this shard's blobs (raw messages) live; empty: storage.blob_dir.
    # `mailctl account move` copies an account's blobs to the target's.
    blob_dir: str = ""
    # Or an S3-compatible bucket of its own, as storage.blob_url.
    blob_url: str = ""

    _url = field_validator("url")(classmethod(lambda cls, v: _check_database_url(v)))

    @model_validator(mode="before")
    @classmethod
    def _blob_url(cls, data: Any) -> Any:
        return _blob_url_as_dir(data)

    @field_validator("replicas")
    @classmethod
    def _replicas(cls, v: list[str]) -> list[str]:
        return [_check_database_url(url, postgresql=True) for url in v]

    @model_validator(mode="after")
    def _replicas_of_postgresql(self) -> ShardSettings:
        if self.replicas and not self.url.startswith("postgresql"):
            raise ValueError("replicas: only a PostgreSQL shard has streaming replicas")
        return self


# An S3 bucket's name (3 to 63 characters), a prefix, parameters.
_S3_URL = re.compile(r"s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^?#]*)?(\?[^#]*)?")


def _blob_url_as_dir(data: Any) -> Any:
    """``blob_url`` is where the blobs are: it takes blob_dir's place
    (``storage.blob.open_blob_store`` picks the backend by URL)."""
    if not isinstance(data, dict) or not data.get("blob_url"):
        return data
    url = data["blob_url"]
    if not isinstance(url, str) or not _S3_URL.fullmatch(url):
        raise ValueError("blob_url: s3://bucket/prefix?endpoint=...&region=...")
    if data.get("blob_dir") and data["blob_dir"] != url:
        raise ValueError("blob_url and blob_dir: set one of them")
    return {**data, "blob_dir": url}


class StorageSettings(Section):
    # The directory database (domains, accounts, aliases, the account ->
    # shard map, secrets every instance shares); SQLAlchemy async URL; empty:
    # sqlite in data_dir. It is also shard "default" unless
    # [storage.shards.default] names another database.
    url: str = ""
    blob_dir: str = ""  # empty: data_dir/blobs
    # Blobs in an S3-compatible bucket instead of blob_dir:
    # "s3://bucket/prefix?endpoint=http://host:port&region=us-east-1"
    # (storage/blob/s3.py); credentials from AWS_ACCESS_KEY_ID and
    # AWS_SECRET_ACCESS_KEY (or access_key_id=, secret_access_key= here),
    # endpoint and region also from AWS_ENDPOINT_URL and AWS_REGION.
    blob_url: str = ""
    # Blobs up to this many bytes are packed, many per fsync: into the url's
    # database itself (SQLite file, or PostgreSQL's blobs table, where only a
    # delivery's own transaction writes them), else blob_dir/pack.sqlite
    # (SQLite sites only); "auto": 262144; 0: a file each.
    blob_pack_max_bytes: Literal["auto"] | Annotated[int, Field(ge=0)] = "auto"
    # MIME leaf parts whose encoded body is longer than this many bytes are
    # stored once, as blobs of their own shared by every message carrying
    # them (storage/blob/skeleton.py); 0: messages are stored whole.
    attachment_min_bytes: Annotated[int, Field(ge=0)] = 65536
    # Blob garbage collection (storage/blob/gc.py): every serving process
    # tries this often to take the site's GC lease, and the holder deletes
    # the blobs no row refers to; 0: never (``mailctl blobs gc`` still works).
    gc_interval_seconds: Annotated[float, Field(ge=0)] = 3600.0
    # A blob stored (or stored again) this recently is never deleted: an
    # ingest writes its blobs before the rows naming them, so this must
    # exceed the longest ingest (a 25 MB message to a slow database).
    gc_grace_seconds: Annotated[float, Field(ge=0)] = 3600.0
    # Mail shards, name -> [storage.shards.NAME] table (or just its url,
    # the older form `shards = {name = "url"}`).
    shards: dict[str, ShardSettings] = Field(default_factory=dict)
    # How committed changes (IDLE, POP3, WebSocket push) and route changes
    # reach the other instances: "auto", LISTEN/NOTIFY when url is PostgreSQL,
    # Unix sockets between the processes of one host on SQLite; "redis", Redis
    # pub/sub through [redis] url (which must be set).
    events: Literal["auto", "redis"] = "auto"

    @field_validator("shards", mode="before")
    @classmethod
    def _shard_forms(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        for name in v:
            if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
                raise ValueError(
                    f"shard name {name!r}: 1 to 64 letters, digits, '_', '.' or '-'"
                )
        return {name: {"url": s} if isinstance(s, str) else s for name, s in v.items()}

    @model_validator(mode="before")
    @classmethod
    def _blob_url(cls, data: Any) -> Any:
        return _blob_url_as_dir(data)


class AuthSettings(Section):
    allow_plaintext: bool = False  # AUTH/LOGIN/USER before TLS (RFC 3501 6.2.3 LOGINDISABLED)
    # Once an address or login name has failed, every answer to it (success too) waits
    # this long, doubling with each further failure (storage/throttle.py).
    failure_delay_seconds: float = 1.0
    failure_delay_max_seconds: float = 16.0
    max_failures_per_connection: int = 5
    # Threads verifying passwords (argon2), apart from every other work; 0: one per CPU
    # (at least 2). Clients with recent failures may hold all but one of them.
    verify_threads: int = Field(default=0, ge=0)
    # Password checks one client address may have queued or running; more are refused
    # at once as a temporary failure (IMAP NO [UNAVAILABLE], POP3 -ERR [SYS/TEMP]).
    verify_queue_per_ip: int = Field(default=8, ge=1)
    # argon2id cost of new password hashes (RFC 9106 section 4, its second recommended
    # option and argon2-cffi's default); an older hash is upgraded at its owner's next login.
    # Upper bounds: beyond them one login would hold a verification thread for seconds.
    argon2_time_cost: int = Field(default=3, ge=1, le=64)  # passes
    argon2_memory_kib: int = Field(default=65536, ge=8, le=4 * 1024 * 1024)  # KiB; >= 8 per lane
    argon2_parallelism: int = Field(default=4, ge=1, le=255)  # lanes
    # A successful login is remembered this long (keyed HMAC of account and password,
    # dropped when the account's hash changes): the same password again costs no argon2
    # run (storage/authcache.py). 0: every login is verified.
    cache_ttl_seconds: float = Field(default=300.0, ge=0, le=86400)

    @model_validator(mode="after")
    def _argon2_memory_covers_lanes(self) -> AuthSettings:
        if self.argon2_memory_kib < 8 * self.argon2_parallelism:  # RFC 9106 section 3.1
            raise ValueError("argon2_memory_kib must be at least 8 * argon2_parallelism")
        return self


class DnsSettings(Section):
    nameservers: list[str] = Field(default_factory=list)  # empty: /etc/resolv.conf
    port: int = 53
    timeout_seconds: float = 5.0
    # The nameservers validate DNSSEC (a local unbound, say): their AD bit is
    # believed, which turns DANE on for outbound mail (RFC 7672; Postfix's
    # smtp_dns_support_level = dane). Never with a resolver across a network.
    trust_ad: bool = False


class SmtpSettings(Section):
    mx_listen: list[str] = Field(default_factory=lambda: ["0.0.0.0:25"])
    submission_listen: list[str] = Field(default_factory=lambda: ["0.0.0.0:587"])
    submissions_listen: list[str] = Field(default_factory=lambda: ["0.0.0.0:465"])  # RFC 8314
    # DATA past this many octets goes to a file in <data_dir>/spool as it
    # arrives, so a session holds at most this much message text in memory.
    spool_threshold: int = Field(default=1_048_576, ge=4096)
    # A bare LF or CR in DATA on the MX port (RFC 5321 section 2.3.8): "normalize"
    # makes each a CRLF, as Postfix does and submission always does (mail from
    # curl or a script with LF line ends); "reject" refuses the message (550).
    # A "." line beside a bare LF or CR (SMTP smuggling) is refused either way.
    mx_bare_lf: Literal["normalize", "reject"] = "normalize"
    # Who gets mail for postmaster@ a local domain (and the bare <postmaster>,
    # RFC 5321 section 4.5.1) when that domain has no postmaster alias or
    # catch-all: this address; empty: the first account of the first domain added.
    postmaster: str = ""
    # Longest message text line, CRLF included. RFC 5321 section 4.5.3.1.6 sets
    # 1000 as the least a server must take and asks for no limit where possible;
    # mail from real clients has longer lines, so (as Postfix) we take 64 KiB
    # and store them unchanged. Longer lines get 500 with this limit named.
    max_line_length: int = Field(default=65_536, ge=1000)
    max_command_line_length: int = 512  # RFC 5321 section 4.5.3.1.4
    max_recipients: int = 100  # RFC 5321 section 4.5.3.1.8 minimum
    max_connections_per_ip: int = Field(default=20, ge=0)  # concurrent, per process; 0: no limit
    # New connections per client IP (per process), before any TLS handshake
    # or greeting: a token bucket of connect_burst_per_ip refilled at this
    # many per second; 0: no limit. server.connect_rate_exempt is not limited.
    connect_rate_per_ip: float = Field(default=10.0, ge=0)
    connect_burst_per_ip: int = Field(default=20, ge=1)
    max_errors: int = 10
    # Unknown local recipients (550 5.1.1) one connection may try before it is
    # closed with 421; they do not count as errors above (stale list entries).
    max_unknown_recipients: int = Field(default=50, ge=1)
    command_timeout_seconds: float = 300.0  # RFC 5321 section 4.5.3.2.7
    data_timeout_seconds: float = 600.0  # RFC 5321 section 4.5.3.2.6
    # Waiting for a command while no transaction is open (before MAIL, and
    # between messages): shorter than command_timeout_seconds on purpose; a
    # transaction, once MAIL is accepted, keeps the RFC 5321 minimums above.
    before_mail_timeout_seconds: float = Field(default=60.0, gt=0)
    sender_must_match: bool = True  # authenticated users send only as their addresses
    # What counts as theirs: aliases that reach the account, and plus-addresses
    # (RFC 5233 user+detail@domain) of the account and of those aliases.
    sender_aliases: bool = True
    sender_plus_addresses: bool = True
    # Every address in a submitted message's From: header must be theirs too
    # (RFC 6409 section 8.1), else 550 5.7.1 at end of data.
    header_from_must_match: bool = True
    # Messages per rate_window_seconds (a sliding window); 0 disables.
    rate_limit_per_user: int = Field(default=300, ge=0)
    rate_limit_per_ip: int = Field(default=600, ge=0)
    rate_window_seconds: float = Field(default=3600.0, gt=0, allow_inf_nan=False)
    dmarc_reject: bool = True  # refuse DMARC failures under p=reject at end of data
    spf: bool = True
    dkim_verify: bool = True
    # RFC 7489 DMARC from the SPF and DKIM results; skipped when both are off,
    # where it could only fail every message whose domain has a policy.
    dmarc: bool = True
    # A \Seen copy of mail submitted over SMTP in the sender's Sent mailbox.
    # Off: mail clients (Thunderbird, Apple Mail, K-9, mutt's Fcc) save their
    # own, so a server copy doubles it. The HTTP send always keeps one.
    save_sent_copy: bool = False

    _listen = field_validator("mx_listen", "submission_listen", "submissions_listen")(
        classmethod(lambda cls, v: _check_listen(v))
    )


TlsLevel = Literal["none", "may", "encrypt", "verify", "dane", "mta-sts"]


class QueueSettings(Section):
    workers: int = 4
    retry_schedule_seconds: list[int] = Field(
        default_factory=lambda: [300, 600, 1200, 2400, 4800, 9600, 14400]
    )  # last step repeats
    max_lifetime_seconds: int = 5 * 24 * 3600
    delay_warning_seconds: int = 4 * 3600  # 0 disables
    lease_seconds: int = 300
    # SMTP sessions open at once to one destination domain, per process (as
    # Postfix's default_destination_concurrency_limit), idle cached ones included.
    per_domain_concurrency: int = Field(default=20, ge=1)
    # Outbound sessions kept open after a delivery for the next message to
    # the same MX under the same TLS guarantee (mtad/outbound/conncache.py);
    # 0: a session per message. At most 300 s: RFC 5321 section 4.5.3.2.7.
    connection_cache_seconds: float = Field(default=5.0, ge=0, le=300)
    connection_max_messages: int = Field(default=100, ge=1)  # per session
    connection_cache_size: int = Field(default=100, ge=1)  # idle sessions, per process
    connect_timeout_seconds: float = 30.0
    smtp_port: int = 25  # remote port, for tests and smart hosts
    require_tls_domains: list[str] = Field(default_factory=list)
    dkim_selector: str = "shardmail"
    # Key files <domain>.<selector>.key of versions before DKIM keys moved into
    # the directory (`mailctl dkim generate` stores them there now); still used
    # for a domain the directory has no key for. Empty: data_dir/dkim
    dkim_key_dir: str = ""
    # Outbound workers (mtad.outbound):
    command_timeout_seconds: float = 300.0  # RFC 5321 section 4.5.3.2 (per reply)
    poll_interval_seconds: float = 1.0  # how often idle workers look for due entries
    # CA bundle for every verified TLS of the relay (tls_policy "verify",
    # MTA-STS MX certificates and policy fetches); empty: the system store.
    tls_ca_file: str = ""
    # Outbound TLS per destination domain (docs/outbound-tls.md), as Postfix's
    # smtp_tls_policy_maps: none | may | encrypt | verify | dane | mta-sts.
    # A domain not listed gets DANE where dns.trust_ad and the MX has
    # validated TLSA records, else its MTA-STS policy (mta_sts), else may.
    tls_policy: dict[str, TlsLevel] = Field(default_factory=dict)
    mta_sts: bool = True  # RFC 8461 discovery for domains not in tls_policy
    # The HTTPS port of policy fetches: 443 (RFC 8461 sections 3.2-3.3); another
    # only on a test bench, whose remote MXes are not on 25 (smtp_port).
    mta_sts_port: int = Field(default=443, ge=1, le=65535)
    suppress_after_hard_bounces: int = 2  # hard bounces before an address is suppressed; 0 never
    done_retention_seconds: int = 2 * 24 * 3600  # completed entries kept for late DSNs

    @field_validator("tls_policy")
    @classmethod
    def _tls_domains(cls, value: dict[str, str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for domain, level in value.items():
            name = domain.strip().rstrip(".").lower()
            if not name or any(c.isspace() or c in "@[]" for c in name) or name in out:
                raise ValueError(f"{domain!r} is not a domain (or listed twice)")
            out[name] = level
        return out

    @model_validator(mode="after")
    def _tls_coherent(self) -> QueueSettings:
        for domain in self.require_tls_domains:
            level = self.tls_policy.get(domain.strip().rstrip(".").lower())
            if level not in (None, "verify"):
                raise ValueError(
                    f"require_tls_domains: {domain} is also tls_policy {level!r}; it means"
                    ' tls_policy "verify": list it in tls_policy only'
                )
        if self.mta_sts_port != 443 and self.smtp_port == 25:
            raise ValueError(
                "mta_sts_port: policies are fetched on 443 (RFC 8461 sections 3.2-3.3);"
                " another port is for test benches only (smtp_port not 25)"
            )
        if self.mta_sts_port != 443 and not (self.mta_sts or "mta-sts" in self.tls_policy.values()):
            raise ValueError("mta_sts_port: MTA-STS is off (mta_sts = false, no mta-sts policy)")
        if self.connection_cache_seconds == 0 and (
            "connection_max_messages" in self.model_fields_set
            or "connection_cache_size" in self.model_fields_set
        ):
            raise ValueError(
                "connection_max_messages and connection_cache_size do nothing"
                " while connection_cache_seconds is 0 (no session is kept)"
            )
        return self


class SrsSettings(Section):
    """``[srs]``: the Sender Rewriting Scheme for mail an alias forwards to
    another site (delivery/srs.py), so that it passes SPF there (RFC 7208
    section 2.4 checks the reverse-path's domain), and bounces to the
    rewritten addresses come back to the original sender."""

    enabled: bool = True
    # The domain of rewritten reverse-paths: its SPF record must name this
    # site's outbound addresses and its MX must be us. Empty: the first local
    # domain added.
    domain: str = ""
    # Keys, first one signing, all verifying (rotation: put the new one first,
    # keep the old one for max_age_days). Empty: one made by the first instance
    # and kept in the directory, shared by every instance of the site.
    secrets: list[str] = Field(default_factory=list)
    # Bounces to a rewritten address are accepted this many days after it was
    # made (the SRS timestamp has a 1024-day cycle).
    max_age_days: int = Field(default=21, ge=1, le=1000)

    @model_validator(mode="after")
    def _nothing_set_while_off(self) -> SrsSettings:
        if not self.enabled and (self.domain or self.secrets):
            raise ValueError("srs.domain and srs.secrets do nothing while srs.enabled is false")
        if any(len(secret) < 16 for secret in self.secrets):
            raise ValueError("srs.secrets: each secret needs at least 16 characters")
        return self


class LimitsSettings(Section):
    """``[limits]``: what one authenticated account may send (delivery/limits.py),
    counted by every instance together through the shared state ([redis]).
    Over a limit, mail is still accepted (250 / 201) but queued held until
    ``mailctl queue release --account``. 0 turns a limit off."""

    user_messages_per_hour: int = Field(default=500, ge=0)
    user_messages_per_day: int = Field(default=2000, ge=0)
    user_recipients_per_hour: int = Field(default=1000, ge=0)
    user_recipients_per_day: int = Field(default=5000, ge=0)


class ImapSettings(Section):
    listen: list[str] = Field(default_factory=lambda: ["0.0.0.0:143"])
    tls_listen: list[str] = Field(default_factory=lambda: ["0.0.0.0:993"])
    max_line_length: int = 65_536
    # An APPEND literal past this many octets goes to a file in <data_dir>/spool
    # as it arrives, so a session holds at most this much message text in memory.
    spool_threshold: int = Field(default=1_048_576, ge=4096)
    autologout_seconds: int = 1800  # RFC 3501 section 5.4: at least 30 minutes
    # Autologout before authentication: RFC 3501 section 5.4 sets its 30
    # minutes only after login; a client that never logs in is dropped sooner.
    preauth_timeout_seconds: float = Field(default=60.0, gt=0)
    # Concurrent connections per client IP (per process); 0: no limit. Over
    # it: "* BYE [UNAVAILABLE]" (RFC 3501 section 7.1.5, RFC 5530).
    max_connections_per_ip: int = Field(default=50, ge=0)
    # New connections per client IP, as smtp.connect_rate_per_ip.
    connect_rate_per_ip: float = Field(default=10.0, ge=0)
    connect_burst_per_ip: int = Field(default=20, ge=1)
    idle_timeout_seconds: int = 1800

    _listen = field_validator("listen", "tls_listen")(classmethod(lambda cls, v: _check_listen(v)))


class Pop3Settings(Section):
    listen: list[str] = Field(default_factory=lambda: ["0.0.0.0:110"])
    tls_listen: list[str] = Field(default_factory=lambda: ["0.0.0.0:995"])
    idle_timeout_seconds: int = 600  # RFC 1939 section 3: at least 10 minutes
    # Autologout in the AUTHORIZATION state (no maildrop held yet): shorter
    # than RFC 1939 section 3's ten minutes on purpose, so that idle
    # unauthenticated connections cannot pile up.
    preauth_timeout_seconds: float = Field(default=60.0, gt=0)
    max_line_length: int = 512  # RFC 2449 section 4: 255 octets per argument
    apop: bool = False
    lock_seconds: int = 900
    # Concurrent connections per client IP (per process); 0: no limit. Over
    # it: "-ERR [SYS/TEMP]" (RFC 3206 section 4).
    max_connections_per_ip: int = Field(default=20, ge=0)
    # New connections per client IP, as smtp.connect_rate_per_ip.
    connect_rate_per_ip: float = Field(default=10.0, ge=0)
    connect_burst_per_ip: int = Field(default=20, ge=1)

    _listen = field_validator("listen", "tls_listen")(classmethod(lambda cls, v: _check_listen(v)))

    @field_validator("idle_timeout_seconds")
    @classmethod
    def _rfc1939(cls, v: int) -> int:
        if v < 600:
            raise ValueError("RFC 1939 section 3 requires at least 600 seconds")
        return v


class HttpSettings(Section):
    listen: list[str] = Field(default_factory=lambda: ["0.0.0.0:8080"])
    token_lifetime_seconds: int = 7 * 24 * 3600
    # Requests per minute (a sliding window); 0 disables.
    rate_limit_per_user: int = Field(default=600, ge=0)
    rate_limit_per_ip: int = Field(default=1200, ge=0)
    # Reverse proxies (TLS terminators) whose X-Forwarded-For names the real
    # client, for per-IP limits and auth throttling; empty: trust none.
    trusted_proxies: list[str] = Field(default_factory=list)
    # Concurrent connections per client IP (per process), trusted_proxies
    # exempt; 0: no limit. Over it: 503 and the connection closed.
    max_connections_per_ip: int = Field(default=100, ge=0)
    # New connections per client IP, as smtp.connect_rate_per_ip.
    connect_rate_per_ip: float = Field(default=10.0, ge=0)
    connect_burst_per_ip: int = Field(default=20, ge=1)

    _listen = field_validator("listen")(classmethod(lambda cls, v: _check_listen(v)))


class RedisSettings(Section):
    """``[redis]``: state every instance of a site shares (storage/shared.py)."""

    # Login-failure counts and the SMTP and HTTP rate limits, counted once for
    # every instance: redis://HOST:PORT/DB (rediss:// with TLS). Empty: each
    # process counts its own (the embedded default).
    url: str = ""
    # A command slower than this counts as Redis being unreachable.
    timeout_seconds: float = Field(default=0.5, gt=0, le=60)
    # Unreachable Redis: limits are counted in-process (a warning, and the
    # metric shardmail_shared_state_fallbacks_total) and Redis is tried again
    # after this long. Logins and mail go on: Redis is never a reason to refuse.
    retry_seconds: float = Field(default=5.0, gt=0, le=3600)

    @field_validator("url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        if v and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v


class AntivirusSettings(Section):
    """Every message taken in (MX, submission, the HTTP send) is scanned by
    clamd (delivery/checks_clamd.py) when ``enabled``."""

    enabled: bool = False
    clamd_socket: str = "/run/clamav/clamd.ctl"  # an absolute path, or host:port
    # clamd unreachable, too slow or answering an error: 451 4.7.1 (tempfail),
    # or deliver with an "X-Virus-Scanned: no" field (accept).
    on_error: Literal["tempfail", "accept"] = "tempfail"
    # One scan's whole time (connect, send, verdict).
    timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 30.0

    @field_validator("clamd_socket")
    @classmethod
    def _clamd_socket(cls, v: str) -> str:
        if v.startswith("/"):
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("must be an absolute socket path or host:port")
        return v


def _check_http_url(value: str) -> str:
    """An http:// or https:// base URL with a host (a path prefix is kept)."""
    from urllib.parse import urlsplit

    if not value:
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment")
    parts.port  # noqa: B018 - raises ValueError for a bad port
    return value.rstrip("/")


# An LDH label (RFC 1035 section 2.3.1; a leading digit, RFC 1123 section 2.1).
_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
# RFC 1035 section 2.3.4: a name is at most 253 characters as text; an IPv6
# client's query name puts 64 (32 nibbles, RFC 5782 section 2.4) before the zone.
DNSL_ZONE_MAX = 253 - 64


def _check_zones(values: list[str]) -> list[str]:
    """DNS list zone names, lower-cased without a final dot; each once."""
    zones: list[str] = []
    for value in values:
        zone = value.lower().removesuffix(".")
        labels = zone.split(".")
        if (len(labels) < 2 or len(zone) > DNSL_ZONE_MAX
                or not all(_DNS_LABEL.fullmatch(label) for label in labels)):
            raise ValueError(
                f"{value!r} is not a DNS zone name (two or more labels of letters,"
                f" digits and hyphens, at most {DNSL_ZONE_MAX} characters)"
            )
        if zone in zones:
            raise ValueError(f"{zone} is listed twice")
        zones.append(zone)
    return zones


class AntispamSettings(Section):
    """Every message taken in is scored by rspamd (delivery/checks_rspamd.py)
    when ``rspamd_url`` is set; moving mail into or out of Junk teaches its
    controller (delivery/learn.py) when ``controller_url`` is set. The
    built-in engine (no rspamd needed) asks DNS block and allow lists about
    the MX's clients (delivery/checks_dnsbl.py) when ``dnsbl_zones`` is set,
    and, unless rspamd is set, scores MX mail per recipient with header rules
    and each account's Bayes classifier (delivery/spamengine.py)."""

    # rspamd's normal worker (or proxy), which answers /checkv2; empty: off.
    rspamd_url: str = ""
    # rspamd's controller worker, which answers /learnspam and /learnham;
    # empty: moves into and out of Junk teach nothing.
    controller_url: str = ""
    # The controller's (enable_)password, sent in the Password header.
    password: str = ""
    # rspamd unreachable, too slow or answering an error: 451 4.7.1 (tempfail),
    # or deliver with an "X-Spam-Checked: no" field (accept).
    on_error: Literal["tempfail", "accept"] = "tempfail"
    # One rspamd check's whole time (connect, send, verdict); also one learn's.
    timeout_seconds: Annotated[float, Field(gt=0, le=600)] = 15.0
    # DNS block lists (RFC 5782) asked about each MX client's IP through the
    # [dns] resolver, within dns.timeout_seconds; a listed client is refused
    # at the end of DATA (554 5.7.1). Empty: off.
    dnsbl_zones: list[str] = Field(default_factory=list)
    # DNS allow lists: a client listed in one is not refused by the block lists.
    dnswl_zones: list[str] = Field(default_factory=list)
    # The built-in engine (header rules + per-account Bayes, MX mail only),
    # which scores mail whenever rspamd_url is empty; false: off.
    builtin: bool = True
    # Its score at or above which a message goes to the recipient's Junk.
    spam_threshold: Annotated[float, Field(gt=0, le=1000)] = 6.0
    # Spam and ham messages an account must have taught (moves into and out
    # of Junk) each before its Bayes classifier votes: fewer votes wildly.
    bayes_min_learned: Annotated[int, Field(ge=1, le=1_000_000)] = 50

    @property
    def builtin_on(self) -> bool:
        """Whether the built-in engine scores MX mail (no rspamd, not off)."""
        return self.builtin and not self.rspamd_url

    _urls = field_validator("rspamd_url", "controller_url")(
        classmethod(lambda cls, v: _check_http_url(v))
    )
    _zones = field_validator("dnsbl_zones", "dnswl_zones")(
        classmethod(lambda cls, v: _check_zones(v))
    )

    @model_validator(mode="after")
    def _nothing_idle(self) -> AntispamSettings:
        # A setting that would do nothing is refused, not ignored.
        if self.controller_url and not self.rspamd_url:
            raise ValueError("controller_url needs rspamd_url (learning without checking)")
        if self.password and not self.controller_url:
            raise ValueError("password is the controller's: it needs controller_url")
        if self.dnswl_zones and not self.dnsbl_zones:
            raise ValueError("dnswl_zones needs dnsbl_zones (an allow list with no block"
                             " list to let anyone past)")
        if both := set(self.dnswl_zones) & set(self.dnsbl_zones):
            raise ValueError(f"{', '.join(sorted(both))}: in both dnsbl_zones and dnswl_zones")
        if not self.builtin and self.rspamd_url:
            raise ValueError("builtin = false beside rspamd_url: rspamd already replaces the"
                             " built-in engine")
        if not self.builtin_on:
            fields = type(self).model_fields
            if tuned := [k for k in ("spam_threshold", "bayes_min_learned")
                         if getattr(self, k) != fields[k].default]:
                raise ValueError(f"{', '.join(tuned)}: the built-in engine's, which is off"
                                 " (builtin = false or rspamd_url set)")
        return self


# Before server.max_message_size (section, key): mapped to it.
_OLD_SIZE_KEYS = (("smtp", "max_message_size"), ("imap", "max_literal_size"),
                  ("http", "max_message_size"))  # fmt: skip


class Settings(Section):
    server: ServerSettings = Field(default_factory=ServerSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    dns: DnsSettings = Field(default_factory=DnsSettings)
    smtp: SmtpSettings = Field(default_factory=SmtpSettings)
    queue: QueueSettings = Field(default_factory=QueueSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    srs: SrsSettings = Field(default_factory=SrsSettings)
    imap: ImapSettings = Field(default_factory=ImapSettings)
    pop3: Pop3Settings = Field(default_factory=Pop3Settings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    antivirus: AntivirusSettings = Field(default_factory=AntivirusSettings)
    antispam: AntispamSettings = Field(default_factory=AntispamSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)

    @model_validator(mode="before")
    @classmethod
    def _one_size_limit(cls, data: Any) -> Any:
        """The per-protocol size limits of older configurations are
        server.max_message_size now: mapped, with a warning naming the new
        key; two different values are refused (which one would hold?)."""
        if not isinstance(data, dict):
            return data
        found: dict[str, Any] = {}
        for section, key in _OLD_SIZE_KEYS:
            values = data.get(section)
            if isinstance(values, dict) and key in values:
                values = dict(values)
                found[f"{section}.{key}"] = values.pop(key)
                data = {**data, section: values}
        if not found:
            return data
        server = data.get("server")
        server = dict(server) if isinstance(server, dict) else {}
        if "max_message_size" in server:
            found["server.max_message_size"] = server["max_message_size"]
        if len({str(v) for v in found.values()}) > 1:
            raise ValueError(
                f"{', '.join(found)}: one size limit for every protocol now,"
                " set only server.max_message_size"
            )
        for old in found:
            if old != "server.max_message_size":
                log.warning("%s is now server.max_message_size (one limit for all)", old)
        server["max_message_size"] = next(iter(found.values()))
        return {**data, "server": server}

    @model_validator(mode="after")
    def _derive_paths(self) -> Settings:
        data = Path(self.server.data_dir)
        if not self.storage.url:
            self.storage.url = f"sqlite+aiosqlite:///{data / 'shardmail.db'}"
        if not self.storage.blob_dir:
            self.storage.blob_dir = str(data / "blobs")
        if not self.queue.dkim_key_dir:
            self.queue.dkim_key_dir = str(data / "dkim")
        return self

    @model_validator(mode="after")
    def _dane_needs_validation(self) -> Settings:
        dane = [d for d, level in self.queue.tls_policy.items() if level == "dane"]
        if dane and not self.dns.trust_ad:
            raise ValueError(
                f'queue.tls_policy: {", ".join(dane)} = "dane" needs a validating'
                " resolver: set dns.trust_ad = true (RFC 7672 section 2.1)"
            )
        return self

    @model_validator(mode="after")
    def _redis_events_need_redis(self) -> Settings:
        if self.storage.events == "redis" and not self.redis.url:
            raise ValueError('storage.events: "redis" needs [redis] url')
        return self

    @model_validator(mode="after")
    def _shared_ports(self) -> Settings:
        # The supervisor binds each listening port once for its workers: port 0
        # there would be an ephemeral port that no log or client could know.
        if self.server.processes != 1:
            for name in LISTEN_KEYS:
                section, key = name.split(".")
                for value in getattr(getattr(self, section), key):
                    if value.rpartition(":")[2] == "0":
                        raise ValueError(
                            f"{name}: port 0 cannot be shared by server.processes workers"
                        )
        return self

    @property
    def data_dir(self) -> Path:
        return Path(self.server.data_dir)


LISTEN_KEYS = (
    "smtp.mx_listen",
    "smtp.submission_listen",
    "smtp.submissions_listen",
    "imap.listen",
    "imap.tls_listen",
    "pop3.listen",
    "pop3.tls_listen",
    "http.listen",
)


DEFAULT_CONFIG_PATHS = (Path("/etc/shardmail/shardmail.toml"),)
# The environment variable naming the configuration file when no -c is given.
CONFIG_ENV = "SHARDMAIL_CONFIG"


def _parse_override(item: str) -> tuple[list[str], Any]:
    """``section.key=value``; the value is read as TOML, else taken as a string."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def _apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
        node = child
    node[path[-1]] = value


def _format_error(err: ValidationError) -> str:
    lines = []
    for item in err.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        msg = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        lines.append(f"{key}: {msg}")
    return "; ".join(lines)


def load_settings(path: str | Path | None = None, overrides: list[str] | None = None) -> Settings:
    """Read ``path`` (else the file the environment's SHARDMAIL_CONFIG
    names, else the first existing default path, else nothing), apply
    ``-o section.key=value`` overrides, validate. Raises ConfigError, also
    for a named file that does not exist."""
    data: dict[str, Any] = {}
    named = path or os.environ.get(CONFIG_ENV)
    candidates = [Path(named)] if named else [p for p in DEFAULT_CONFIG_PATHS if p.exists()]
    for candidate in candidates[:1]:
        try:
            data = tomllib.loads(candidate.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{candidate}: no such file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{candidate}: {exc}") from None
    for item in overrides or []:
        keys, value = _parse_override(item)
        _apply_override(data, keys, value)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None
