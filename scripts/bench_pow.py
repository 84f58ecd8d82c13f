#!/usr/bin/env python3
"""Cost of gtorrent's proof of work on new identities (gtorrent/pow.py), on this machine, one core.

Prints the hash rate of `pow.solve`'s inner loop and, per difficulty, the expected seconds to make one
identity acceptable to a tracker run with `--pow-bits N` (2^N hashes on average) next to the measured
mean over real solves of fresh identities, plus what a Sybil attacker pays for 200 and for 10,000
identities at that rate (the tracker's own check is one hash per announce, whatever N).

Usage: python scripts/bench_pow.py [--bits 16 20 24] [--solves 8] [--seconds 2]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gtorrent import pow  # noqa: E402
from gtorrent.identity import Identity  # noqa: E402


def hash_rate(seconds: float) -> float:
    """Hashes per second of solve's loop (copy the prefixed hash, add the nonce, digest, compare)."""
    prefix = hashlib.blake2b(pow.POW_LABEL + Identity.generate().signing_public, digest_size=32)
    done, counter, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10_000):
            hasher = prefix.copy()
            hasher.update(counter.to_bytes(pow.NONCE_BYTES, "big"))
            int.from_bytes(hasher.digest()[:8], "big")
            counter += 1
        done += 10_000
    return done / (time.perf_counter() - start)


def measured_solve_s(bits: int, solves: int) -> list[float]:
    times = []
    for _ in range(solves):
        key = Identity.generate().signing_public
        start = time.perf_counter()
        nonce = pow.solve(key, bits)
        times.append(time.perf_counter() - start)
        assert pow.work(key, nonce) >= bits
    return times


def human(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.2f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 172_800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[16, 20, 24])
    parser.add_argument("--solves", type=int, default=8, help="real solves per difficulty (fewer above 22 bits)")
    parser.add_argument("--seconds", type=float, default=2.0, help="how long to measure the hash rate")
    args = parser.parse_args()
    rate = hash_rate(args.seconds)
    start = time.perf_counter()
    for _ in range(10_000):
        pow.work(b"k" * 32, b"n" * 8)
    check_us = (time.perf_counter() - start) / 10_000 * 1e6
    print(f"hash rate: {rate / 1e6:.2f} M hashes/s on one core; the tracker's check: {check_us:.2f} µs per announce")
    print()
    print(f"{'bits':>4}  {'expected / identity':>19}  {'measured mean (n)':>20}  {'200 identities':>14}  {'10,000 identities':>17}")
    for bits in args.bits:
        expected = 2**bits / rate
        solves = args.solves if bits <= 22 else max(1, args.solves // 2)
        times = measured_solve_s(bits, solves)
        measured = f"{human(statistics.mean(times))} ({len(times)})"
        print(f"{bits:>4}  {human(expected):>19}  {measured:>20}  {human(200 * expected):>14}  {human(10_000 * expected):>17}")
    print()
    print("A solve is geometric: single identities vary widely around the mean (the standard deviation")
    print("equals the mean), so the measured column is noisy at small n; the expected column is 2^bits / rate.")


if __name__ == "__main__":
    main()
