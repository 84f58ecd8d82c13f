#!/usr/bin/env python3
"""Anonymity of private asks at swarm scale, measured on gtorrent's real tracker table and planner.

A swarm of N relays (default 10,000) is built from real signed PeerRecords (Ed25519 signatures,
verified on the way in by `PeerRecord.from_wire`) accepted by a real `TrackerTable`, and a target
seed that is not a relay. Every simulated ask does what `private.relay_view` and `RouteState.plan` do:
it lists relays as `TrackerClient.listing` does (`TrackerTable.page` under a fresh sample key, paged
up to RELAY_SAMPLE = 1,000 records, with each record's listing age) and plans with the real
`routing.plan_paths` under the default rules (4 paths x 3 hops, k = 3; relays listed at least 30 min;
no two relays of a path, nor a relay and the seed, in one IPv4 /16). Plans of 4 x 4 (the artifact's
L = 4) are drawn too, for comparison. A listing of 1,000 costs as much as ~8 plans, so each listing
carries ASKS_PER_LISTING asks (each a fresh plan; every listing is a uniform draw from the same table,
so the per-ask figures keep their expectation).

Which relays are malicious is only a label, so plans are drawn once and every fraction f is evaluated
on them under several fresh random labellings (exactly round(f N) relays each), averaged.

Figures, per f:

- the paper artifact's values (PlanetServe n = 4, L = 4; constants from its evaluation);
- **confidentiality against relays**: the fraction of asks in which relays obtain the plaintext of at
  least k cloves, subtracted from 1. No relay can read a clove: each clove is sealed to the seed under
  the innermost onion layer, so a relay forwards only ciphertext for the seed, on every path and at
  every f. The count of cloves readable by relays is therefore 0 by construction, and the figure 1.0.
  (In the artifact relays forwarded cloves in the clear, hence its falling curve.)
- **normalized sender entropy, the artifact's position-blind model** (paper-notes §2.6): a path is
  compromised when it holds at least one malicious relay; with cp compromised paths and s malicious
  relays on the plan, each compromised path's predecessor candidate gets 1/(nL - s) and the rest of
  the mass is spread evenly over the (1 - f)N - cp honest nodes; H / log2 N, 1.0 when cp = 0. On
  independent Binomial(L, f) paths this formula reproduces the artifact's numbers to within 0.0001;
- the same under **gtorrent's model**: only a malicious *last* relay ties a circuit to its seed (it
  sees the seed as its successor), so only paths whose last relay is malicious count as compromised;
- **position-aware identification**, the probability per ask that the asker's address is tied to
  the seed: (a) the first and last relay of one path both malicious; (b) across paths: some first
  relay and some last relay malicious (one ask's cells move on all paths at once, so timing links
  them); (c) a malicious seed and any malicious first relay (the seed knows the prompt, the first
  relay the address), next to 1 - (1 - f)^n.

Then the same identification figures with Sybils added to the table: 20, 100 and 200 identities
ground so that their peer ids sort before every honest one (the attack on the old tracker, which
answered with the lowest ids), listed as long as the honest relays, with addresses as spread as
theirs (the worst case for the network rule); and the 200 listed only 10 minutes (the age rule), or
all in one /16 (the network rule). Each figure is set beside a random set of the same size on the
same plans.

Last, guards: askers each make ASKS_PER_ASKER asks to one malicious seed. Without guards every ask
draws fresh first hops (an asker's asks are that many of the plain asks, drawn per asker); with
guards each asker chooses its set once (`guards.choose_guards`, 4 + 4 spares), adds the guards'
records to every ask's relays, and the planner takes the first hops from the front of the set. Printed:
P(identified at least once in those asks), scenario (c) and (b).

Speed: the planner parses every candidate's address for every plan (ipaddress is most of a plan's
cost), so `routing.normalise_endpoint` and its host-to-network helper, pure functions of a string,
are memoised here; no result changes. Keys come from the seeded generator, so a run is reproducible
from --seed. The default run takes about 2-3 minutes on 2 shared cores; --quick about 6 s.

Usage: python scripts/sim_anonymity.py [--relays 10000] [--asks 1500] [--askers 40]
       [--labellings 8] [--seed 2026] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import ipaddress
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gtorrent import routing  # noqa: E402
from gtorrent.discovery import max_pages  # noqa: E402
from gtorrent.guards import GUARD_COUNT, choose_guards, set_size  # noqa: E402
from gtorrent.identity import PEER_ID_LABEL, Identity  # noqa: E402
from gtorrent.private import GUARD_CANDIDATES, RELAY_SAMPLE  # noqa: E402
from gtorrent.protocol import PeerRecord  # noqa: E402
from gtorrent.routing import RelayRules, plan_paths  # noqa: E402
from gtorrent.tracker import DEFAULT_QUERY_LIMIT, MAX_QUERY_LIMIT, TrackerTable  # noqa: E402

F_VALUES = (0.001, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5)
# the paper artifact's evaluation (PlanetServe, n = 4 paths, L = 4 hops, N = 10,000), per f above
ARTIFACT_ENTROPY = (0.9994, 0.9935, 0.9655, 0.9290, 0.8562, 0.7819, 0.5963)
ARTIFACT_CONFIDENTIALITY = (1.000, 0.9997, 0.9776, 0.8807, 0.5430, 0.2461, 0.0215)
PATHS, HOPS, K = 4, 3, 3  # gtorrent's defaults
ARTIFACT_HOPS = 4
SYBIL_COUNTS = (20, 100, 200)  # at N = 10,000; scaled with --relays
GROUND_PREFIX = "22"  # '2' is the first base32 digit after the letters: ids with it sort first
ASKS_PER_ASKER = 100
ASKS_PER_LISTING = 10  # asks planned on each tracker listing (a listing of 1,000 costs ~8 plans' time)
LISTED_S = 2400.0  # how long the relays have been listed when the asks start (over the 30 min rule)
FRESH_SYBIL_S = 600.0  # the "fresh" Sybils' listing age, under the rule
PORT = 7000


def memoise_address_parsing() -> None:
    """Cache the planner's pure string -> address helpers (see the module docstring)."""
    for name in ("normalise_endpoint", "_network_of_host"):
        helper = getattr(routing, name, None)
        if callable(helper) and not hasattr(helper, "cache_info"):
            setattr(routing, name, functools.lru_cache(maxsize=1 << 17)(helper))


# ---------------------------------------------------------------------------------------------- swarm


def public_ipv4(rng: random.Random, network: tuple[int, int] | None = None) -> str:
    """A random globally routable IPv4 address (in `network`, a /16 given by its two octets, if set)."""
    while True:
        a, b = network if network is not None else (rng.randrange(1, 224), rng.randrange(256))
        address = ipaddress.IPv4Address(f"{a}.{b}.{rng.randrange(256)}.{rng.randrange(1, 255)}")
        if address.is_global:
            return str(address)


def new_identity(rng: random.Random, signing_key: Ed25519PrivateKey | None = None) -> Identity:
    """Keys from the seeded generator, so that a run is reproducible (a simulation only: real keys come
    from the OS's CSPRNG)."""
    def x25519() -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(rng.randbytes(32))
    signing = signing_key or Ed25519PrivateKey.from_private_bytes(rng.randbytes(32))
    return Identity(signing, x25519(), x25519())


def grind_identities(count: int, prefix: str, rng: random.Random) -> list[Identity]:
    """Identities whose peer ids start with `prefix`: the cheap test runs on the hash's leading bits
    (peer ids are base32 of SHA-256(label || key), 5 bits a character), the full id only on a hit."""
    digits = "abcdefghijklmnopqrstuvwxyz234567"
    bits = len(prefix) * 5
    want = int("".join(f"{digits.index(c):05b}" for c in prefix), 2)
    found: list[Identity] = []
    while len(found) < count:
        key = Ed25519PrivateKey.from_private_bytes(rng.randbytes(32))
        public = key.public_key().public_bytes_raw()
        digest = hashlib.sha256(PEER_ID_LABEL + public).digest()
        if int.from_bytes(digest[:4], "big") >> (32 - bits) == want:
            identity = new_identity(rng, key)
            assert identity.peer_id.startswith(prefix)
            found.append(identity)
    return found


def signed_record(identity: Identity, endpoint: str, roles: tuple[str, ...], expires: float) -> PeerRecord:
    """A record as a peer announces it, parsed and verified as a tracker receives it."""
    record = PeerRecord.sign(identity, endpoint=endpoint, roles=roles, seq=1, expires=expires)
    return PeerRecord.from_wire(record.to_wire())


@dataclass
class Swarm:
    """One tracker table and the relays in it; relays[i] is relay i in the label arrays."""

    table: TrackerTable
    clock: list[float]  # the table's clock, [now]
    relays: list[PeerRecord]
    seed: PeerRecord
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {r.peer_id: i for i, r in enumerate(self.relays)}


def build_swarm(honest: Sequence[PeerRecord], extra: Sequence[PeerRecord], seed: PeerRecord,
                extra_listed_s: float, rng: random.Random) -> Swarm:
    """A table holding `honest` (listed LISTED_S ago) and `extra` (listed `extra_listed_s` ago)."""
    clock = [0.0]
    table = TrackerTable(clock=lambda: clock[0], rng=random.Random(rng.random()))
    for records, at in ((honest, 0.0), (extra, LISTED_S - extra_listed_s)):
        clock[0] = at
        for record in records:
            table.accept(record)
    clock[0] = LISTED_S
    return Swarm(table, clock, [*honest, *extra], seed)


def make_population(relays: int, sybils: int, rng: random.Random) -> tuple[list[PeerRecord], dict[str, list[PeerRecord]], PeerRecord]:
    """Honest relays, the Sybil variants, and the target seed, all signed and verified."""
    expires = 3000.0  # every record outlives the run's clock (LISTED_S) and is within the TTL limit
    used: set[str] = set()

    def address(network: tuple[int, int] | None = None) -> str:
        while (ip := public_ipv4(rng, network)) in used:
            pass
        used.add(ip)
        return f"tcp://{ip}:{PORT}"

    seed = signed_record(new_identity(rng), address(), ("seed",), expires)
    honest: list[PeerRecord] = []
    while len(honest) < relays:
        identity = new_identity(rng)
        # an honest id that happens to start with the ground prefix (1 in 1,024) is redrawn, so that
        # the ground ids sort before every honest one, as the attack on a lowest-ids tracker needed
        if identity.peer_id.startswith(GROUND_PREFIX):
            continue
        honest.append(signed_record(identity, address(), ("relay",), expires))
    ground = grind_identities(sybils, GROUND_PREFIX, rng)
    one_net = (rng.randrange(11, 100), rng.randrange(256))
    variants = {
        "spread": [signed_record(g, address(), ("relay",), expires) for g in ground],
        "one_network": [signed_record(g, address(one_net), ("relay",), expires) for g in ground],
    }
    return honest, variants, seed


# ---------------------------------------------------------------------------------------------- asks


Listing = tuple[list[PeerRecord], dict[str, float]]  # records, and how long each has been listed (s)


def fetch_listing(swarm: Swarm, rng: random.Random, want: int = RELAY_SAMPLE) -> Listing:
    """The relays an asker lists before a private ask (private.relay_view), paged as TrackerClient.listing
    pages: one fresh sample key, pages of min(want, MAX_QUERY_LIMIT), until `want` records or the end."""
    key, offset = rng.randbytes(16), 0
    limit = max(1, min(want, MAX_QUERY_LIMIT))
    records: dict[str, PeerRecord] = {}
    ages: dict[str, float] = {}
    for _ in range(max_pages(want, limit)):
        page = swarm.table.page(role="relay", limit=limit, sample=key, offset=offset)
        for record, age in zip(page.records, page.listed_s, strict=True):
            records[record.peer_id] = record
            ages[record.peer_id] = age
        if len(records) >= want or page.next is None:
            break
        offset = page.next
    return list(records.values()), ages


def plan_indices(swarm: Swarm, listing: Listing, hops: int, rng: random.Random,
                 guards: list[PeerRecord] | None = None) -> list[list[int]]:
    """Plan one ask with the real planner (default rules) and return it as relay indices."""
    relays, ages = listing
    plan = plan_paths(relays, exclude=set(), paths=PATHS, hops=hops, k=K, strict=True, rng=rng,
                      target=swarm.seed, listed_s=ages, rules=RelayRules(), guards=guards)
    return [[swarm.index[r.peer_id] for r in path] for path in plan.paths]


def draw_plans(swarm: Swarm, listings: list[Listing], asks: int, hops: int, rng: random.Random) -> np.ndarray:
    """`asks` asks, each a fresh plan on one of the listings (in turn). Shape (asks, PATHS, hops)."""
    return np.array([plan_indices(swarm, listings[i % len(listings)], hops, rng) for i in range(asks)], dtype=np.int32)


def draw_guard_asks(swarm: Swarm, askers: int, listings: list[Listing], rng: random.Random) -> np.ndarray:
    """Each asker draws its guard set once as private.relay_view does on its first private ask
    (`guards.choose_guards` for GUARD_CANDIDATES candidates per guard, kept in order while they answer
    their hello; here every relay answers), then plans ASKS_PER_ASKER asks, each on a listing drawn
    from the pool plus the guards' records (which the guards themselves send, not a tracker). Shape
    (askers, asks, PATHS, HOPS)."""
    size = set_size(PATHS)
    plans = []
    for _ in range(askers):
        relays, ages = listings[rng.randrange(len(listings))]
        chosen = choose_guards(relays, [], GUARD_CANDIDATES * size, rng, listed_s=ages, rules=RelayRules())[:size]
        current = [swarm.relays[swarm.index[g.peer_id]] for g in chosen]  # in the order chosen
        held = {g.peer_id for g in current}
        mine = []
        for _ in range(ASKS_PER_ASKER):
            relays, ages = listings[rng.randrange(len(listings))]
            view = [*(r for r in relays if r.peer_id not in held), *current]
            mine.append(plan_indices(swarm, (view, ages), HOPS, rng, guards=current))
        guard_ids = {swarm.index[p] for p in held}
        # the planner's promise, checked: every first hop of every ask is one of the asker's guards
        assert all(path[0] in guard_ids for plan in mine for path in plan), "a first hop is not a guard"
        plans.append(mine)
    return np.array(plans, dtype=np.int32)


# ---------------------------------------------------------------------------------------------- figures


def labellings(total: int, malicious: int, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`count` random labellings of `total` relays with exactly `malicious` of them malicious."""
    out = []
    for _ in range(count):
        labels = np.zeros(total, dtype=bool)
        labels[rng.choice(total, size=malicious, replace=False)] = True
        out.append(labels)
    return out


def normalized_entropy(compromised: np.ndarray, malicious: np.ndarray, slots: int, honest: float, relays: int) -> np.ndarray:
    """The artifact's sender entropy per ask, over log2 N: each of the cp compromised paths' predecessor
    candidates gets 1/(nL - s), the rest is spread over the honest nodes not among them."""
    cp = compromised.astype(float)
    p = 1.0 / np.maximum(slots - malicious, 1)
    rest = np.clip(1.0 - cp * p, 0.0, 1.0)
    spread = np.maximum(honest - cp, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.where(cp > 0, -cp * p * np.log2(p), 0.0) + np.where(rest > 0, -rest * np.log2(rest / spread), 0.0)
    return np.where(cp > 0, h, math.log2(relays)) / math.log2(relays)


def identification(mal: np.ndarray) -> dict[str, np.ndarray]:
    """Per ask, from mal[ask, path, hop]: (a) first and last of one path, (b) some first and some last,
    (c) some first (with a malicious seed)."""
    first, last = mal[:, :, 0], mal[:, :, -1]
    return {"a": (first & last).any(axis=1), "b": first.any(axis=1) & last.any(axis=1), "c": first.any(axis=1)}


def base_figures(plans3: np.ndarray, plans4: np.ndarray, relays: int, labels_per_f: int,
                 rng: np.random.Generator) -> list[dict[str, float]]:
    rows = []
    for f, artifact_h, artifact_c in zip(F_VALUES, ARTIFACT_ENTROPY, ARTIFACT_CONFIDENTIALITY, strict=True):
        malicious = max(1, round(f * relays))
        honest = relays - malicious
        acc: dict[str, list[float]] = {}
        for labels in labellings(relays, malicious, labels_per_f, rng):
            for name, plans in (("l3", plans3), ("l4", plans4)):
                mal = labels[plans]
                slots = plans.shape[1] * plans.shape[2]
                s = mal.sum(axis=(1, 2))
                blind = normalized_entropy(mal.any(axis=2).sum(axis=1), s, slots, honest, relays)
                own = normalized_entropy(mal[:, :, -1].sum(axis=1), s, slots, honest, relays)
                acc.setdefault(f"entropy_artifact_model_{name}", []).append(float(blind.mean()))
                acc.setdefault(f"entropy_gtorrent_model_{name}", []).append(float(own.mean()))
            mal = labels[plans3]
            # cloves whose plaintext a relay holds: none, every clove is sealed to the seed (docstring)
            readable = np.zeros(plans3.shape[:2], dtype=bool)
            acc.setdefault("confidentiality", []).append(1.0 - float((readable.sum(axis=1) >= K).mean()))
            for key, hit in identification(mal).items():
                acc.setdefault(f"identified_{key}", []).append(float(hit.mean()))
        row = {"f": f, "artifact_entropy": artifact_h, "artifact_confidentiality": artifact_c,
               "malicious": float(malicious), **{k: float(np.mean(v)) for k, v in acc.items()},
               "identified_c_formula": 1 - (1 - malicious / relays) ** PATHS}
        rows.append(row)
    return rows


def sybil_figures(name: str, swarm: Swarm, sybils: int, plans: np.ndarray, labels_per_f: int,
                  rng: np.random.Generator) -> dict[str, Any]:
    """The ground ids (the last `sybils` relays) as the malicious set, beside random sets of that size."""
    total = len(swarm.relays)
    ground = np.zeros(total, dtype=bool)
    ground[total - sybils:] = True
    lowest = sorted(swarm.relays, key=lambda r: r.peer_id)[:DEFAULT_QUERY_LIMIT]
    out: dict[str, Any] = {"scenario": name, "sybils": sybils, "relays": total, "f": sybils / total,
                           "ground_in_lowest_ids": int(sum(ground[swarm.index[r.peer_id]] for r in lowest))}
    for who, sets in (("sybil", [ground]), ("random", labellings(total, sybils, labels_per_f, rng))):
        acc: dict[str, list[float]] = {}
        for labels in sets:
            mal = labels[plans]
            acc.setdefault("hop_share", []).append(float(mal.mean()))
            acc.setdefault("owned_paths", []).append(float(mal.all(axis=2).mean()))
            for key, hit in identification(mal).items():
                acc.setdefault(f"identified_{key}", []).append(float(hit.mean()))
        out[who] = {k: float(np.mean(v)) for k, v in acc.items()}
    return out


def guard_figures(plans3: np.ndarray, guard_plans: np.ndarray, relays: int,
                  labels_per_f: int, rng: np.random.Generator) -> list[dict[str, float]]:
    """P(identified at least once in ASKS_PER_ASKER asks) per asker, with and without guards. Without
    guards an asker's asks are ASKS_PER_ASKER of the independent plain asks, drawn anew per asker."""
    askers = guard_plans.shape[0]
    pick = np.stack([rng.choice(len(plans3), size=ASKS_PER_ASKER, replace=len(plans3) < ASKS_PER_ASKER)
                     for _ in range(askers)])
    plain = plans3[pick]  # (askers, asks, paths, hops)
    rows = []
    for f in F_VALUES:
        malicious = max(1, round(f * relays))
        acc: dict[str, list[float]] = {}
        for labels in labellings(relays, malicious, labels_per_f, rng):
            for name, plans in (("plain", plain), ("guards", guard_plans)):
                mal = labels[plans]
                first, last = mal[..., 0].any(axis=2), mal[..., -1].any(axis=2)  # (askers, asks)
                acc.setdefault(f"c_{name}", []).append(float(first.any(axis=1).mean()))
                acc.setdefault(f"b_{name}", []).append(float((first & last).any(axis=1).mean()))
        rows.append({"f": f, **{k: float(np.mean(v)) for k, v in acc.items()},
                     "c_plain_formula": 1 - (1 - malicious / relays) ** (PATHS * ASKS_PER_ASKER),
                     "c_guards_formula": 1 - (1 - malicious / relays) ** GUARD_COUNT})
    return rows


# ---------------------------------------------------------------------------------------------- output


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render(result: dict[str, Any]) -> str:
    n = result["relays"]
    base = table(
        ["f", "artifact H (n=4, L=4)", "artifact conf.", "gtorrent conf. vs relays",
         "H, artifact model, L=3", "H, artifact model, L=4", "H, gtorrent model, L=3", "H, gtorrent model, L=4",
         "id. (a) first+last, one path", "id. (b) any first + any last", "id. (c) seed + any first",
         "1 - (1-f)^4"],
        [[f"{r['f']:g}", f"{r['artifact_entropy']:.4f}", f"{r['artifact_confidentiality']:.4f}",
          f"{r['confidentiality']:.4f}", f"{r['entropy_artifact_model_l3']:.4f}",
          f"{r['entropy_artifact_model_l4']:.4f}", f"{r['entropy_gtorrent_model_l3']:.4f}",
          f"{r['entropy_gtorrent_model_l4']:.4f}", f"{r['identified_a']:.4f}", f"{r['identified_b']:.4f}",
          f"{r['identified_c']:.4f}", f"{r['identified_c_formula']:.4f}"] for r in result["base"]])
    sybil = table(
        ["Sybils (ground ids)", "f", "of the 200 lowest ids", "share of listings", "hop share: Sybil / random",
         "fully owned paths: Sybil / random", "id. (a): Sybil / random", "id. (b): Sybil / random",
         "id. (c): Sybil / random"],
        [[s["scenario"], f"{s['f']:.4f}", str(s["ground_in_lowest_ids"]), f"{s['listing_share']:.4f}",
          f"{s['sybil']['hop_share']:.4f} / {s['random']['hop_share']:.4f}",
          f"{s['sybil']['owned_paths']:.5f} / {s['random']['owned_paths']:.5f}",
          *(f"{s['sybil'][f'identified_{k}']:.4f} / {s['random'][f'identified_{k}']:.4f}" for k in "abc")]
         for s in result["sybils"]])
    guards = table(
        ["f", "(c) no guards", "(c) guards", "1-(1-f)^4", "(b) no guards", "(b) guards"],
        [[f"{g['f']:g}", f"{g['c_plain']:.4f}", f"{g['c_guards']:.4f}", f"{g['c_guards_formula']:.4f}",
          f"{g['b_plain']:.4f}", f"{g['b_guards']:.4f}"] for g in result["guards"]])
    return "\n".join([
        f"N = {n} relays; {result['asks']} asks of 4 x 3 and {result['asks_l4']} of 4 x 4, planned on "
        f"{result['listings']} tracker listings of {result['listing']} relays; {result['labellings']} "
        f"labellings per f; --seed {result['seed']}",
        "", base, "",
        f"Sybils added to the {n} honest relays ({result['sybil_asks']} asks each; f = S / ({n} + S); "
        "beside each figure, a random set of S relays on the same plans):",
        "", sybil, "",
        f"P(identified at least once in {ASKS_PER_ASKER} asks to a malicious seed), {result['askers']} askers:",
        "", guards, "",
        f"runtime {result['runtime_s']:.1f} s",
    ])


def run(relays: int, asks: int, askers: int, labels_per_f: int, seed: int,
        progress: Callable[[str], None]) -> dict[str, Any]:
    started = time.perf_counter()
    memoise_address_parsing()
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    scale = relays / 10_000
    sybil_counts = [max(1, round(s * scale)) for s in SYBIL_COUNTS]
    honest, variants, target = make_population(relays, max(sybil_counts), rng)
    progress(f"records signed and ground: {time.perf_counter() - started:.1f} s")
    listings_per_run = max(1, asks // ASKS_PER_LISTING)
    base_swarm = build_swarm(honest, [], target, LISTED_S, rng)
    listings = [fetch_listing(base_swarm, rng) for _ in range(listings_per_run)]
    plans3 = draw_plans(base_swarm, listings, asks, HOPS, rng)
    plans4 = draw_plans(base_swarm, listings, asks // 2, ARTIFACT_HOPS, rng)
    progress(f"plans: {time.perf_counter() - started:.1f} s")
    result: dict[str, Any] = {
        "relays": relays, "asks": asks, "asks_l4": asks // 2, "sybil_asks": asks // 3, "askers": askers,
        "labellings": labels_per_f, "seed": seed, "listing": len(listings[0][0]), "listings": listings_per_run,
        "base": base_figures(plans3, plans4, relays, labels_per_f, nrng),
    }
    scenarios = [(f"{s}", variants["spread"][:s], LISTED_S, s) for s in sybil_counts]
    most = max(sybil_counts)
    scenarios += [(f"{most}, listed {FRESH_SYBIL_S / 60:g} min", variants["spread"][:most], FRESH_SYBIL_S, most),
                  (f"{most}, all in one /16", variants["one_network"][:most], LISTED_S, most)]
    result["sybils"] = []
    for name, extra, listed, count in scenarios:
        swarm = build_swarm(honest, extra, target, listed, rng)
        pool = [fetch_listing(swarm, rng) for _ in range(max(1, listings_per_run // 3))]
        plans = draw_plans(swarm, pool, asks // 3, HOPS, rng)
        figures = sybil_figures(name, swarm, count, plans, labels_per_f, nrng)
        ground = {r.peer_id for r in extra}
        figures["listing_share"] = float(np.mean([sum(p in ground for p in ages) / len(ages) for _, ages in pool]))
        result["sybils"].append(figures)
    progress(f"sybils: {time.perf_counter() - started:.1f} s")
    guard_plans = draw_guard_asks(base_swarm, askers, listings, rng)
    result["guards"] = guard_figures(plans3, guard_plans, relays, labels_per_f, nrng)
    result["runtime_s"] = time.perf_counter() - started
    progress(f"guards: {result['runtime_s']:.1f} s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--relays", type=int, default=10_000, help="honest relays in the tracker table")
    parser.add_argument("--asks", type=int, default=1_500,
                        help="asks planned with 4 x 3 (half as many with 4 x 4, a third per Sybil case)")
    parser.add_argument("--askers", type=int, default=40, help="askers in the guards comparison (100 asks each)")
    parser.add_argument("--labellings", type=int, default=8, help="random labellings per malicious fraction")
    parser.add_argument("--seed", type=int, default=2026, help="random seed (the whole run is reproducible)")
    parser.add_argument("--quick", action="store_true", help="500 relays, 200 asks, 10 askers, 3 labellings (a test run)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if args.quick:
        args.relays, args.asks, args.askers, args.labellings = 500, 200, 10, 3
    result = run(args.relays, args.asks, args.askers, args.labellings, args.seed,
                 lambda line: print(line, file=sys.stderr, flush=True))
    print(render(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
