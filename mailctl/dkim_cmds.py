"""``mailctl dkim ...``: DKIM keys for outbound signing (RFC 6376).

``generate DOMAIN [--selector S] [--bits N]`` writes
``<queue.dkim_key_dir>/<domain>.<selector>.key`` (RSA, 2048 bits by default,
mode 0600) and prints the TXT record to publish; ``show DOMAIN`` prints the
record of an existing key again. Exit 1 if the key exists (generate) or is
missing (show).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from conf.settings import Settings


def _record_of(path: Path) -> str:
    from cryptography.hazmat.primitives import serialization

    from mtad.outbound.signing import txt_record_value

    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return txt_record_value(der)


def _print_record(domain: str, selector: str, value: str) -> None:
    from mtad.outbound.signing import zone_line

    print(f"Publish this TXT record at {selector}._domainkey.{domain}:")
    print()
    print(zone_line(domain, selector, value))
    print()
    print(f"(value: {value})")


def cmd_dkim(args: argparse.Namespace, settings: Settings) -> int:
    """Run one ``mailctl dkim`` action; see the module docstring."""
    from mtad.outbound.signing import generate_key, key_path

    domain = args.domain.lower().rstrip(".")
    selector = args.selector or settings.queue.dkim_selector
    key_dir = Path(settings.queue.dkim_key_dir)
    path = key_path(key_dir, domain, selector)
    if args.action == "generate":
        if args.bits < 1024:  # RFC 8301 section 3.2
            print("mailctl dkim: keys shorter than 1024 bits are refused", file=sys.stderr)
            return 2
        try:
            path, value = generate_key(key_dir, domain, selector, args.bits)
        except FileExistsError:
            print(
                f"mailctl dkim: {path} exists; remove it or pick another --selector",
                file=sys.stderr,
            )
            return 1
        print(f"key written to {path}")
    else:
        if not path.is_file():
            print(f"mailctl dkim: no key {path}", file=sys.stderr)
            return 1
        value = _record_of(path)
    _print_record(domain, selector, value)
    return 0


def add_dkim_arguments(parser: argparse.ArgumentParser) -> None:
    from mtad.outbound.signing import DEFAULT_KEY_BITS

    parser.add_argument("action", choices=("generate", "show"))
    parser.add_argument("domain")
    parser.add_argument("--selector", help="default: queue.dkim_selector")
    parser.add_argument("--bits", type=int, default=DEFAULT_KEY_BITS, help="RSA key size")


def add_dkim_parser(
    command: Callable[[str, Callable[..., int], str], argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Registers ``dkim`` with mailctl's ``command(name, func, help)`` helper."""
    parser = command("dkim", cmd_dkim, "DKIM signing keys for outbound mail")
    add_dkim_arguments(parser)
    return parser
