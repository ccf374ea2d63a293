"""``mailctl dkim ...``: DKIM keys for outbound signing (RFC 6376).

``generate DOMAIN [--selector S] [--bits N]`` stores a new key (RSA, 2048
bits by default) in the directory, where the queue workers of every
instance find it (issue #19), and prints the TXT record to publish;
``show DOMAIN`` prints the record of an existing key again, from the
directory or else from a key file of an older version
(``<queue.dkim_key_dir>/<domain>.<selector>.key``). Exit 1 if the key
exists (generate) or is missing (show).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from typing import Any

from conf.settings import Settings


def _print_record(domain: str, selector: str, value: str) -> None:
    from mtad.outbound.signing import zone_line

    print(f"Publish this TXT record at {selector}._domainkey.{domain}:")
    print()
    print(zone_line(domain, selector, value))
    print()
    print(f"(value: {value})")


def cmd_dkim(args: argparse.Namespace, settings: Settings) -> int:
    """Run one ``mailctl dkim`` action; see the module docstring."""
    from mailctl.cli import with_storage
    from mtad.outbound.signing import find_key, new_key, record_of

    domain = args.domain.lower().rstrip(".")
    selector = args.selector or settings.queue.dkim_selector
    if args.action == "generate" and args.bits < 1024:  # RFC 8301 section 3.2
        print("mailctl dkim: keys shorter than 1024 bits are refused", file=sys.stderr)
        return 2

    async def act(storage: Any) -> int:
        if args.action == "generate":
            pem, value = await asyncio.to_thread(new_key, args.bits)
            await storage.directory.add_dkim_key(domain, selector, pem)  # EXISTS: exit 1
            print(f"key for selector {selector} of {domain} stored in the directory")
            _print_record(domain, selector, value)
            return 0
        stored = await storage.directory.dkim_key(domain, selector)
        if stored is None:
            key_dir = settings.queue.dkim_key_dir  # an older version's key file
            legacy = await asyncio.to_thread(find_key, key_dir, domain, selector)
            stored = None if legacy is None else (legacy.selector, legacy.private_pem)
        if stored is None:
            print(f"mailctl dkim: no key for {domain}", file=sys.stderr)
            return 1
        _print_record(domain, stored[0], record_of(stored[1]))
        return 0

    return with_storage(settings, act)


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
