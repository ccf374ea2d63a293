"""One argon2id password verification: argon2-cffi against libsodium (PyNaCl),
on the very same stored hash (issue #24, storage/sodium_argon2.py).

For each cost a hash is made once with argon2-cffi (as shardmail stores
them), then verified ``--checks`` times by each library, alternating
(A B A B) for ``--rounds`` rounds; printed per library: median CPU ms
(process time, every thread) and wall ms per verification, and the load
average. Never part of the test run::

    python -m bench.argon2_verify_bench --rounds 6 --checks 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argon2
import nacl.pwhash

PASSWORD = b"benchpass"


def timed(check: Callable[[], object], n: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per call of ``check``, over ``n`` calls."""
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        check()
    return (time.process_time() - c0) * 1000 / n, (time.perf_counter() - w0) * 1000 / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--checks", type=int, default=10, help="verifications per round")
    parser.add_argument(
        "--costs",
        default="3:65536:4,2:65536:1",
        help="time:memory_kib:parallelism, comma-separated",
    )
    args = parser.parse_args()
    print(f"# {os.cpu_count()} CPUs, loadavg {os.getloadavg()[0]:.2f}", flush=True)
    for spec in args.costs.split(","):
        t, m, p = (int(x) for x in spec.split(":"))
        stored = argon2.PasswordHasher(time_cost=t, memory_cost=m, parallelism=p).hash(PASSWORD)
        libs: dict[str, Callable[[], object]] = {
            "argon2-cffi": lambda s=stored: argon2.PasswordHasher().verify(s, PASSWORD),
            "libsodium": lambda s=stored: nacl.pwhash.argon2id.verify(s.encode(), PASSWORD),
        }
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in libs}
        for n in range(args.rounds):
            order = list(libs) if n % 2 == 0 else list(libs)[::-1]
            for name in order:
                results[name].append(timed(libs[name], args.checks))
        for name, runs in results.items():
            cpu = statistics.median(r[0] for r in runs)
            wall = statistics.median(r[1] for r in runs)
            print(
                f"t={t} m={m} p={p}  {name:<12} CPU {cpu:6.1f} ms  wall {wall:6.1f} ms "
                f"per verification  (rounds' CPU {min(r[0] for r in runs):.0f}-"
                f"{max(r[0] for r in runs):.0f} ms)",
                flush=True,
            )
    print(f"# loadavg {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
