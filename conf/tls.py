"""TLS contexts for the listeners, and the self-signed certificate of first start.

Contract: :func:`server_context` returns a server-side ``ssl.SSLContext``
from the configured certificate, or, when none is configured, from
``data_dir/tls/{cert,key}.pem``, generating a self-signed pair there on
first use (so ``mailctl serve`` works out of the box). Generation is
blocking; callers on an event loop run it in a thread.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from pathlib import Path

from conf.settings import Settings


def ensure_self_signed(directory: Path, hostname: str) -> tuple[Path, Path]:
    """Create ``cert.pem``/``key.pem`` in ``directory`` if missing; return their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = dt.datetime.now(dt.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(hostname), x509.DNSName("localhost")]
    alt_names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    # Key first, private from birth: never world-readable even for an instant.
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def certificate_paths(settings: Settings) -> tuple[Path, Path]:
    if settings.tls.cert_file and settings.tls.key_file:
        return Path(settings.tls.cert_file), Path(settings.tls.key_file)
    return ensure_self_signed(settings.data_dir / "tls", settings.server.hostname)


def server_context(settings: Settings) -> ssl.SSLContext:
    """A server context with modern defaults (no SSLv3/TLS 1.0/1.1)."""
    cert, key = certificate_paths(settings)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if settings.tls.min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:25`` for IPv6) -> (host, port)."""
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)
