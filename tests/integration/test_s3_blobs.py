"""A site whose blobs are in an S3 bucket (``storage.blob_url``), on a real
S3-compatible server started on loopback (OpenStack Swift's s3api,
tests/swiftserver.py): `mailctl serve` takes mail over SMTP and serves it
byte-exact over IMAP, and the raw messages are objects in the bucket, none
on local disk. Credentials come from the standard environment variables."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import imaplib
import os
import random
import smtplib
import ssl
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from storage.blob.s3 import S3BlobStore, S3Config
from storage.errors import ErrorKind, StorageError
from tests.integration.test_serve import free_port, stop, wait_ready
from tests.swiftserver import ACCESS_KEY, BUCKET, REGION, SECRET_KEY, SwiftServer

PASSWORD = "pw-alice-s3"


def _message(n: int, size: int) -> bytes:
    """A message of about ``size`` bytes: random base64 (lines of random
    length) in a MIME attachment, CRLF line ends."""
    blob = base64.b64encode(os.urandom(size * 3 // 4)).decode()
    lines, at = [], 0
    while at < len(blob):
        step = random.randint(1, 76)
        lines.append(blob[at : at + step])
        at += step
    body = "\r\n".join(lines)
    return (
        f"From: bob@example.net\r\nTo: alice@example.org\r\nSubject: s3 {n}\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@example.net>\r\nMIME-Version: 1.0\r\n"
        f'Content-Type: multipart/mixed; boundary="b{n}"\r\n\r\n'
        f"--b{n}\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
        f"--b{n}\r\nContent-Type: application/octet-stream\r\n"
        f"Content-Transfer-Encoding: base64\r\n\r\n{body}\r\n--b{n}--\r\n"
    ).encode()


def test_mail_over_smtp_is_stored_in_s3_and_served_byte_exact_over_imap(
    tmp_path: Path,
) -> None:
    swift = SwiftServer.shared()  # fails with the daemons' logs if it cannot start
    url = f"s3://{BUCKET}/site-{uuid.uuid4().hex}?endpoint={swift.endpoint}&region={REGION}"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    data = tmp_path / "d"
    site = ["-o", f"server.data_dir={data}", "-o", f"storage.blob_url={url}"]

    def mailctl(*args: str, stdin: str | None = None) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "mailctl", args[0], *site, *args[1:]],
            input=stdin, capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr

    mailctl("domain", "add", "example.org")
    mailctl("account", "add", "alice@example.org", stdin=f"{PASSWORD}\n")
    ports = {
        key: free_port()
        for key in ("smtp.mx_listen", "smtp.submission_listen", "smtp.submissions_listen",
                    "imap.listen", "imap.tls_listen", "pop3.listen", "pop3.tls_listen",
                    "http.listen")
    }  # fmt: skip
    args = [sys.executable, "-m", "mailctl", "serve", *site]
    for key, port in ports.items():
        args += ["-o", f"{key}=['127.0.0.1:{port}']"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env)
    # One small message, one over the multipart threshold (sent in parts).
    sizes = [
        random.randint(2_000, 300_000),
        S3Config.multipart_threshold + random.randint(1, 2**20),
    ]
    sent = [_message(n, size) for n, size in enumerate(sizes)]
    try:
        wait_ready(proc)
        with smtplib.SMTP("127.0.0.1", ports["smtp.mx_listen"], timeout=60) as smtp:
            for message in sent:
                refused = smtp.sendmail("bob@example.net", ["alice@example.org"], message)
                assert refused == {}
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the site's generated self-signed certificate
        imap = imaplib.IMAP4_SSL("127.0.0.1", ports["imap.tls_listen"], ssl_context=ctx)
        try:
            imap.login("alice@example.org", PASSWORD)
            imap.select("INBOX", readonly=True)
            status, found = imap.uid("SEARCH", "ALL")
            assert status == "OK"
            uids = found[0].split()
            assert len(uids) == len(sent)
            fetched = []
            for uid in uids:
                status, parts = imap.uid("FETCH", uid, "(BODY.PEEK[])")
                assert status == "OK"
                fetched.append(parts[0][1])
        finally:
            imap.logout()
    finally:
        code = stop(proc)
    assert code == 0
    for message, raw in zip(sent, fetched, strict=True):
        # The MX adds only trace fields above the message (RFC 5321 section 4.4).
        assert raw.endswith(message)
        assert raw[: -len(message)].startswith((b"Return-Path:", b"Received:"))
    keys = asyncio.run(_bucket_keys(url, env))
    # Each message, and each attachment over storage.attachment_min_bytes
    # (64 KiB) as an object of its own (storage/blob/skeleton.py).
    attachments = [m.split(b"base64\r\n\r\n")[1].rsplit(b"\r\n--b", 1)[0] for m in sent]
    expected = {hashlib.sha256(raw).hexdigest() for raw in fetched} | {
        hashlib.sha256(a).hexdigest() for a in attachments if len(a) > 65536
    }
    assert sorted(expected) == keys
    on_disk = [p for p in data.rglob("*") if p.is_file() and len(p.name) == 64]
    assert on_disk == []


async def _bucket_keys(url: str, env: dict[str, str]) -> list[str]:
    store = S3BlobStore(S3Config.from_url(url, env))
    try:
        return await store.keys()
    finally:
        await store.close()


def test_blob_url_is_checked_at_load_and_takes_blob_dirs_place(tmp_path: Path) -> None:
    """`mailctl check-config` refuses a blob_url that is no s3:// URL, or one
    set beside a different blob_dir, naming the key and without a traceback."""
    from conf.settings import ConfigError, load_settings

    base = [f"server.data_dir={tmp_path}"]
    url = f"s3://{BUCKET}/p?endpoint=http://127.0.0.1:9&region={REGION}"
    settings = load_settings(None, [*base, f"storage.blob_url={url}"])
    assert settings.storage.blob_dir == url
    for bad in (
        ["storage.blob_url=http://127.0.0.1/x"],
        [f"storage.blob_url={url}", f"storage.blob_dir={tmp_path / 'b'}"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "mailctl", "check-config", *(
                a for o in [*base, *bad] for a in ("-o", o))],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode != 0 and "blob_url" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    with pytest.raises(ConfigError, match="blob_url"):
        load_settings(None, [*base, "storage.blob_url=s3://"])


def test_a_shards_blob_url_is_checked_and_opens_its_own_bucket(tmp_path: Path) -> None:
    """``[storage.shards.NAME] blob_url``: a shard's blobs in a bucket (or
    prefix) of its own, checked as the site's; storage opens an S3 store
    for that shard and the site's folder for the others."""
    from argon2 import PasswordHasher, profiles

    from conf.settings import ConfigError, load_settings
    from storage.backend import open_storage
    from storage.blob import FsBlobStore, S3BlobStore

    url = f"s3://{BUCKET}/east-{uuid.uuid4().hex}?endpoint=http://127.0.0.1:9&region={REGION}"
    east = f"sqlite+aiosqlite:///{tmp_path / 'east.db'}"
    base = [f"server.data_dir={tmp_path}", f'storage.shards.east.url="{east}"']
    settings = load_settings(None, [*base, f'storage.shards.east.blob_url="{url}"'])
    assert settings.storage.shards["east"].blob_dir == url
    for bad, message in (
        (['storage.shards.east.blob_url="http://127.0.0.1/x"'], "blob_url"),
        ([f'storage.shards.east.blob_url="{url}"', 'storage.shards.east.blob_dir="/b"'], "one"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_settings(None, [*base, *bad])

    async def open_it() -> None:
        env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        with pytest.MonkeyPatch.context() as mp:
            for name, value in env.items():
                mp.setenv(name, value)
            store = await open_storage(
                settings.storage,
                data_dir=tmp_path,
                password_hasher=PasswordHasher.from_parameters(profiles.CHEAPEST),
            )
        try:
            east_store = store.stores["east"].blobs
            assert isinstance(east_store.inner, S3BlobStore)
            assert east_store.inner.config.prefix == url.split("/", 3)[3].split("?")[0]
            assert isinstance(store.stores["default"].blobs.inner, FsBlobStore)
            assert east_store in store.blob_stores()
        finally:
            await store.close()

    asyncio.run(open_it())


def test_s3_settings_come_from_the_url_else_the_environment() -> None:
    env = {
        "AWS_ACCESS_KEY_ID": "env-key",
        "AWS_SECRET_ACCESS_KEY": "env-secret",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000/",
        "AWS_REGION": "eu-west-3",
    }
    config = S3Config.from_url("s3://bucket/a/b/", env)
    assert (config.bucket, config.prefix, config.endpoint, config.region) == (
        "bucket", "a/b", "http://127.0.0.1:9000", "eu-west-3"
    )  # fmt: skip
    assert config.path_style and config.access_key_id == "env-key"
    config = S3Config.from_url(
        "s3://bucket?endpoint=http://127.0.0.1:1&region=r1&access_key_id=k"
        "&secret_access_key=s&addressing=virtual",
        env,
    )
    assert (config.endpoint, config.region, config.access_key_id, config.path_style) == (
        "http://127.0.0.1:1", "r1", "k", False
    )  # fmt: skip
    aws = S3Config.from_url("s3://bucket/p", {"AWS_ACCESS_KEY_ID": "k",
                                              "AWS_SECRET_ACCESS_KEY": "s"})  # fmt: skip
    assert aws.endpoint == "https://s3.us-east-1.amazonaws.com" and not aws.path_style
    for bad, why in [
        ("s3://bucket/p?endpont=x", "unknown"),
        ("s3://bucket/p?addressing=odd", "addressing"),
    ]:
        with pytest.raises(StorageError, match=why) as err:
            S3Config.from_url(bad, env)
        assert err.value.kind is ErrorKind.INVALID
    with pytest.raises(StorageError, match="AWS_ACCESS_KEY_ID") as err:
        S3Config.from_url("s3://bucket/p", {})
    assert err.value.kind is ErrorKind.INVALID


def test_an_unreachable_bucket_makes_smtp_answer_4xx(tmp_path: Path) -> None:
    """Nothing listens at the endpoint: the MX answers the DATA with a 4xx
    (RFC 5321 section 4.2.5: the sender keeps the message and retries),
    never 5xx, and the site keeps serving."""
    url = f"s3://{BUCKET}/x?endpoint=http://127.0.0.1:{free_port()}&region={REGION}"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    site = ["-o", f"server.data_dir={tmp_path / 'd'}", "-o", f"storage.blob_url={url}"]
    for args, stdin in (
        (["domain", "add", "example.org"], None),
        (["account", "add", "alice@example.org"], f"{PASSWORD}\n"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "mailctl", args[0], *site, *args[1:]],
            input=stdin, capture_output=True, text=True, env=env, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
    ports = {key: free_port() for key in ("smtp.mx_listen", "smtp.submission_listen",
                                          "smtp.submissions_listen", "imap.listen",
                                          "imap.tls_listen", "pop3.listen",
                                          "pop3.tls_listen", "http.listen")}  # fmt: skip
    args = [sys.executable, "-m", "mailctl", "serve", *site]
    for key, port in ports.items():
        args += ["-o", f"{key}=['127.0.0.1:{port}']"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env)
    message = _message(0, random.randint(1_000, 400_000))
    try:
        wait_ready(proc)
        for _ in range(2):
            with smtplib.SMTP("127.0.0.1", ports["smtp.mx_listen"], timeout=120) as smtp:
                with pytest.raises(smtplib.SMTPDataError) as err:
                    smtp.sendmail("bob@example.net", ["alice@example.org"], message)
                assert 400 <= err.value.smtp_code < 500, err.value
                assert smtp.noop()[0] == 250  # the session goes on
    finally:
        code = stop(proc)
    assert code == 0
