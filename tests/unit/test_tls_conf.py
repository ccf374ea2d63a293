"""The self-signed certificate of first start, and listen-address parsing."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

from conf.tls import ensure_self_signed, parse_listen, server_context
from tests.conftest import make_settings


def test_first_start_generates_a_private_key_and_reuses_it(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    ctx = server_context(settings)
    assert isinstance(ctx, ssl.SSLContext)
    cert, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    assert b"BEGIN CERTIFICATE" in cert.read_bytes()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    before = cert.read_bytes()
    ensure_self_signed(tmp_path / "tls", "other.example")
    assert cert.read_bytes() == before


def test_parse_listen() -> None:
    assert parse_listen("0.0.0.0:25") == ("0.0.0.0", 25)
    assert parse_listen("[::1]:993") == ("::1", 993)
