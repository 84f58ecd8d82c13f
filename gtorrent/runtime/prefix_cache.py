"""A prefix KV cache for the runtime and its HR-tree index: pure bookkeeping, no numpy, no ONNX.

Keys: a prompt is cut into CHUNK_TOKENS-token chunks; chunk i's key is the chained hash
h_i = blake2b(h_{i-1} || chunk i's token ids as little-endian uint32, 16-byte digest), h_{-1} = ROOT.
One digest names a whole prefix (every chunk before it), so a prefix is held or not by its last digest.

The cache (`PrefixCache`) holds values (the model's KV state, opaque here) for prefixes that end at a
chunk boundary, each with its size in bytes. Invariants, all under one lock (seed worker threads share
one model and so one cache):
- the bytes of the entries never exceed `max_bytes`; an entry that does not fit after evicting every
  entry not in use is not stored;
- eviction is least recently used first (an acquire or a re-insert counts as a use), and skips entries
  with a non-zero reference count: a state in use is never freed;
- the index (`PrefixTree`, the HR-tree) holds exactly the prefixes the entries cover: a prefix of depth
  d is in the tree iff some entry's path has at least d chunks and starts with it. An entry whose path
  extends a shorter unused entry replaces it (its state covers the shorter one's, sliced).
- a bounded summary (`summary(max_digests)`) is a subset of the tree closed under ancestors: it is made
  of whole entry paths, most recently used first, so a peer never sees a digest without its prefix.
- `stats()` counts are cumulative over the cache's life (one lookup per prefill that used the cache).
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

CHUNK_TOKENS = 10  # the paper's chunk granularity
DIGEST_BYTES = 16
ROOT = bytes(DIGEST_BYTES)  # h_{-1}
_PERSON = b"gtorrent/kv/v1"  # blake2b personalisation: these digests never collide with other uses
DEFAULT_MAX_BYTES = 256 << 20  # the default of `gtorrent seed --kv-cache-mb`


def chunk_hashes(token_ids: Sequence[int], chunk_tokens: int = CHUNK_TOKENS) -> list[bytes]:
    """The chained digests of the whole chunks of `token_ids` (a trailing partial chunk has none)."""
    digests: list[bytes] = []
    previous = ROOT
    for start in range(0, len(token_ids) - chunk_tokens + 1, chunk_tokens):
        chunk = struct.pack(f"<{chunk_tokens}I", *token_ids[start : start + chunk_tokens])
        previous = hashlib.blake2b(previous + chunk, digest_size=DIGEST_BYTES, person=_PERSON).digest()
        digests.append(previous)
    return digests


@dataclass
class _Node:
    children: dict[bytes, _Node] = field(default_factory=dict)
    parent: _Node | None = None
    digest: bytes = ROOT
    entry: bool = False  # an entry's path ends here


class PrefixTree:
    """The HR-tree: the held prefixes as a tree of chunk digests (one edge per chunk). Every leaf ends an
    entry's path, so a node exists iff some entry covers its prefix. Not locked: `PrefixCache` owns it."""

    def __init__(self) -> None:
        self.root = _Node()
        self._nodes: dict[bytes, _Node] = {}  # digest -> node (a chained digest names one path)

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, digest: object) -> bool:
        return digest in self._nodes

    def add(self, path: Sequence[bytes]) -> None:
        node = self.root
        for digest in path:
            child = node.children.get(digest)
            if child is None:
                child = node.children[digest] = _Node(parent=node, digest=digest)
                self._nodes[digest] = child
            node = child
        node.entry = True

    def remove(self, path: Sequence[bytes]) -> None:
        """Unmark the entry ending at `path`'s end and prune the nodes no other entry covers."""
        node = self._nodes[path[-1]]
        node.entry = False
        while node.parent is not None and not node.entry and not node.children:
            del node.parent.children[node.digest]
            del self._nodes[node.digest]
            node = node.parent

    def longest_match(self, digests: Sequence[bytes]) -> int:
        """How many leading chunks of `digests` the tree holds."""
        depth = 0
        node = self.root
        for digest in digests:
            child = node.children.get(digest)
            if child is None:
                break
            node, depth = child, depth + 1
        return depth

    def entry_below(self, digest: bytes) -> bytes:
        """The last digest of some entry whose path passes through `digest` (every leaf ends one)."""
        node = self._nodes[digest]
        while not node.entry:
            node = next(iter(node.children.values()))
        return node.digest

    def entries_on(self, path: Sequence[bytes]) -> list[bytes]:
        """The last digests of entries ending on `path` (a prefix of it, or all of it)."""
        found: list[bytes] = []
        node = self.root
        for digest in path:
            child = node.children.get(digest)
            if child is None:
                break
            node = child
            if node.entry:
                found.append(digest)
        return found

    def paths(self) -> set[tuple[bytes, ...]]:
        """Every held prefix as its digest path (for tests and summaries)."""
        found: set[tuple[bytes, ...]] = set()
        stack: list[tuple[_Node, tuple[bytes, ...]]] = [(self.root, ())]
        while stack:
            node, path = stack.pop()
            if path:
                found.add(path)
            stack.extend((child, (*path, child.digest)) for child in node.children.values())
        return found

    def summary(self) -> PrefixSummary:
        return PrefixSummary(frozenset(self._nodes))


@dataclass(frozen=True)
class PrefixSummary:
    """The compact form of an HR-tree for a group exchange: the set of its nodes' digests. A chained
    digest stands for its whole prefix, so the set alone answers `longest_match` like the tree."""

    digests: frozenset[bytes]

    def longest_match(self, digests: Sequence[bytes]) -> int:
        depth = 0
        for digest in digests:
            if digest not in self.digests:
                break
            depth += 1
        return depth

    def to_bytes(self) -> bytes:
        return b"".join(sorted(self.digests))

    @classmethod
    def from_bytes(cls, data: bytes) -> PrefixSummary:
        if len(data) % DIGEST_BYTES:
            raise ValueError(f"a prefix summary is a multiple of {DIGEST_BYTES} bytes, got {len(data)}")
        return cls(frozenset(data[i : i + DIGEST_BYTES] for i in range(0, len(data), DIGEST_BYTES)))


@dataclass
class _Entry:
    path: tuple[bytes, ...]
    value: Any
    nbytes: int
    refs: int = 0


@dataclass(frozen=True)
class Lease:
    """A cached state in use: `value` covers at least `depth` chunks. Give it back with `release`."""

    depth: int  # chunks of the asked prefix the state covers
    value: Any
    key: bytes


class PrefixCache:
    """Cached states of prompt prefixes at chunk boundaries, bounded by `max_bytes` (module doc)."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.tree = PrefixTree()
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()  # last digest -> entry, oldest use first
        self._lock = threading.Lock()
        self.hits = 0  # acquires that found a prefix
        self.misses = 0
        self.evictions = 0
        self.prompt_tokens = 0  # over every acquire: the prompts' lengths
        self.cached_tokens = 0  # and the tokens their leases covered

    def __len__(self) -> int:
        return len(self._entries)

    def longest_match(self, digests: Sequence[bytes]) -> int:
        with self._lock:
            return self.tree.longest_match(digests)

    def summary(self, max_digests: int | None = None) -> PrefixSummary:
        """The tree's digests; with `max_digests`, at most that many: the whole paths of the most recently
        used entries, newest first (a path that does not fit whole is left out and the next one tried), so
        the summary is closed under ancestors and names only prefixes the cache holds."""
        if max_digests is not None and max_digests < 0:
            raise ValueError(f"max_digests must be >= 0, got {max_digests}")
        with self._lock:
            if max_digests is None or len(self.tree) <= max_digests:
                return self.tree.summary()
            chosen: set[bytes] = set()
            for entry in reversed(self._entries.values()):
                # `chosen` is a union of root paths, so what it lacks of this path is a tail of it
                missing = sum(1 for digest in entry.path if digest not in chosen)
                if len(chosen) + missing <= max_digests:
                    chosen.update(entry.path)
                    if len(chosen) == max_digests:
                        break
            return PrefixSummary(frozenset(chosen))

    def stats(self) -> dict[str, int]:
        """Cumulative counters: lookups (acquires), hits, prompt_tokens (the prompts looked up),
        cached_tokens (of those, taken from the cache), evictions; and the present entries and bytes."""
        with self._lock:
            return {
                "lookups": self.hits + self.misses,
                "hits": self.hits,
                "prompt_tokens": self.prompt_tokens,
                "cached_tokens": self.cached_tokens,
                "evictions": self.evictions,
                "entries": len(self._entries),
                "bytes": self.bytes,
                "max_bytes": self.max_bytes,
            }

    def acquire(
        self, digests: Sequence[bytes], *, prompt_tokens: int | None = None, chunk_tokens: int = CHUNK_TOKENS
    ) -> Lease | None:
        """The deepest cached state covering a prefix of `digests`, held until `release`; None on a miss.
        `prompt_tokens` (default: the whole chunks of `digests`) is the asking prompt's length, for `stats`."""
        with self._lock:
            depth = self.tree.longest_match(digests)
            self.prompt_tokens += len(digests) * chunk_tokens if prompt_tokens is None else prompt_tokens
            if depth == 0:
                self.misses += 1
                return None
            key = self.tree.entry_below(digests[depth - 1])
            entry = self._entries[key]
            entry.refs += 1
            self._entries.move_to_end(key)
            self.hits += 1
            self.cached_tokens += depth * chunk_tokens
            return Lease(depth, entry.value, key)

    def release(self, lease: Lease) -> None:
        with self._lock:
            self._entries[lease.key].refs -= 1

    def covers(self, digests: Sequence[bytes]) -> bool:
        """True if the whole path of `digests` is already held (storing it again would add nothing)."""
        with self._lock:
            return bool(digests) and digests[-1] in self.tree

    def insert(self, path: Sequence[bytes], value: Any, nbytes: int) -> bool:
        """Store `value` (the state after the chunks of `path`, `nbytes` big); False if it does not fit.
        A path already covered is only touched; unused entries on a prefix of it are replaced."""
        if not path:
            return False
        key = path[-1]
        with self._lock:
            if key in self.tree:
                self._entries.move_to_end(self.tree.entry_below(key))
                return True
            superseded = [k for k in self.tree.entries_on(path) if self._entries[k].refs == 0]
            freed = sum(self._entries[k].nbytes for k in superseded)
            if nbytes > self.max_bytes or not self._make_room(nbytes - freed, keep=superseded):
                return False
            for old in superseded:
                self._drop(old)
            self._entries[key] = _Entry(tuple(path), value, nbytes)
            self.tree.add(path)
            self.bytes += nbytes
            return True

    def _make_room(self, nbytes: int, keep: list[bytes]) -> bool:
        """Evict unused entries, least recently used first, until `nbytes` more fit (`keep` are about to
        go anyway). False, evicting nothing, if they cannot."""
        excess = self.bytes + nbytes - self.max_bytes
        if excess <= 0:
            return True
        victims: list[bytes] = []
        for key, entry in self._entries.items():
            if excess <= 0:
                break
            if entry.refs == 0 and key not in keep:
                victims.append(key)
                excess -= entry.nbytes
        if excess > 0:
            return False
        for key in victims:
            self._drop(key)
            self.evictions += 1
        return True

    def _drop(self, key: bytes) -> None:
        entry = self._entries.pop(key)
        self.tree.remove(entry.path)
        self.bytes -= entry.nbytes

    def held_paths(self) -> set[tuple[bytes, ...]]:
        """Every prefix the entries cover, computed from the entries alone (the tree's contract)."""
        with self._lock:
            return {
                entry.path[:depth] for entry in self._entries.values() for depth in range(1, len(entry.path) + 1)
            }

    def tree_paths(self) -> set[tuple[bytes, ...]]:
        with self._lock:
            return self.tree.paths()

    def in_use(self) -> int:
        with self._lock:
            return sum(1 for entry in self._entries.values() if entry.refs)
