"""Exact and near-duplicate removal: MinHash signatures, and the index that decides.

Near duplicates are what exact matching misses in exported conversations, scraped
instructions and merged public sets: the same answer with a changed greeting, a
template filled twice. The method is datasketch's, so its numbers carry over:

    text -> lower case -> words (or bytes) -> shingles (runs of `ngram`)    kernels: token_hashes, ngram_hashes
         -> K = num_perm MinHash values, a*x+b mod 2^61-1 (datasketch's)     kernels: minhash
         -> LSH: b bands of r rows; records sharing a band's bucket are
            candidates, and a candidate whose signature agrees on >=
            ceil(threshold * K) positions is a duplicate                    kernels: LSHIndex

The estimate's error: each position agrees with probability J (the true Jaccard), so
the agreeing share has standard deviation sqrt(J(1-J)/K), about 0.035 at J = 0.8 and
K = 128. `bands` and `rows` default to datasketch's way of choosing them (the pair that
minimises the false-positive and false-negative areas under the S-curve), weighted
towards recall because every candidate is checked (`lsh_params`).

`signatures` is a pure function of a batch of texts (a worker process or a cluster map
runs it); `Deduplicator` is the one stateful part and sees every record, in input
order: it keeps the first of each group and says, for each removed record, which kept
record (by `path:line`) it repeats.

Two ways to group (`DedupConfig.near_mode`):

    stream   (default) a record is compared with the KEPT records only, so a group is a
             star around its first record; memory: the kept signatures. A chain A~B~C
             with J(A, C) below the threshold keeps A and C.
    cluster  every candidate pair of the LSH buckets is verified (`near_pairs`) and the
             pairs' connected components found by union-find (kernels: union_find); the
             first record of each component is kept, so the chain is one cluster.
             Memory: every signature and the pair list. `reactor data inspect` reports
             these clusters in either mode.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import Any

import numpy as np

from reactor_core.data.kernels import band_keys
from reactor_core.data.pipeline_config import DedupConfig

EXACT_DUPLICATE = "exact_duplicate"
NEAR_DUPLICATE = "near_duplicate"

MERSENNE_61 = (1 << 61) - 1
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy 2 renamed it


@lru_cache(maxsize=8)
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) uint64, datasketch's: `RandomState(seed)`, a in [1, p), b in [0, p), drawn
    in pairs (a MinHash of datasketch with the same seed uses the same permutations)."""
    gen = np.random.RandomState(seed)
    pairs = np.array([(gen.randint(1, MERSENNE_61, dtype=np.uint64), gen.randint(0, MERSENNE_61, dtype=np.uint64))
                      for _ in range(num_perm)], dtype=np.uint64)
    a, b = pairs.T
    return np.ascontiguousarray(a), np.ascontiguousarray(b)


# LSH's weights on the false-positive and false-negative areas. A candidate is checked
# against the threshold before it counts (`LSHIndex`), so a false positive of the bands
# costs one signature comparison while a false negative is a duplicate kept for good:
# the bands lean towards recall (datasketch, which checks nothing, weighs them 0.5/0.5).
FALSE_POSITIVE_WEIGHT = 0.1


@lru_cache(maxsize=32)
def lsh_params(threshold: float, num_perm: int, fp_weight: float = FALSE_POSITIVE_WEIGHT) -> tuple[int, int]:
    """(bands, rows) minimising `fp_weight` x the false-positive area below the threshold
    plus (1 - fp_weight) x the false-negative area above it: datasketch's `_optimal_param`
    (which `fp_weight=0.5` reproduces). At 0.8 and 128 permutations: 14 x 9; a pair at
    Jaccard 0.8 becomes a candidate with probability 0.87, at 0.5 with 0.03."""
    best, choice = float("inf"), (1, 1)
    lo, hi = np.linspace(0.0, threshold, 201), np.linspace(threshold, 1.0, 201)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = _trapezoid(1 - (1 - lo ** r) ** b, lo)
            fn = _trapezoid((1 - hi ** r) ** b, hi)
            error = fp_weight * fp + (1 - fp_weight) * fn
            if error < best:
                best, choice = error, (b, r)
    return choice


def bands_rows(config: DedupConfig) -> tuple[int, int]:
    if config.bands is not None and config.rows is not None:
        return config.bands, config.rows
    return lsh_params(config.threshold, config.num_perm)


def pack_texts(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 data, int64 offsets): the texts lower-cased and UTF-8 encoded into the
    kernels' flat layout.

    One `lower().encode()` of the texts joined by NUL, then the NULs found and cut out
    in numpy: per-text encoding was a third of the native path's time. (Lower-casing is
    per character, and NUL is uncased, so this equals lowering each text.) Texts that
    hold a NUL themselves are encoded one by one."""
    joined = "\0".join(texts).lower().encode("utf-8")
    data = np.frombuffer(joined, dtype=np.uint8)
    cuts = np.flatnonzero(data == 0)
    if len(cuts) != max(len(texts) - 1, 0):  # a NUL inside a text
        encoded = [text.lower().encode("utf-8") for text in texts]
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        return np.frombuffer(b"".join(encoded), dtype=np.uint8), offsets
    offsets = np.empty(len(texts) + 1, dtype=np.int64)
    offsets[0] = 0
    offsets[1:-1] = cuts - np.arange(len(cuts))
    offsets[-1] = len(data) - len(cuts)
    return np.delete(data, cuts) if len(cuts) else data, offsets


def shingles(texts: Sequence[str], shingle: str, ngram: int, kernels: ModuleType) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 shingle hashes, int64 offsets) of each text."""
    data, offsets = pack_texts(texts)
    tokens, token_offsets = kernels.token_hashes(data, offsets, shingle)
    return kernels.ngram_hashes(tokens, token_offsets, ngram)


def signatures(texts: Sequence[str], config: DedupConfig, kernels: ModuleType, threads: int = 1) -> np.ndarray:
    """(len(texts), num_perm) uint32 MinHash signatures; a text without words gets the
    all-0xFFFFFFFF signature. `threads`: MLForge's threads (< 1: one per core); the
    signatures do not depend on it."""
    grams, offsets = shingles(texts, config.shingle, config.ngram, kernels)
    a, b = permutations(config.num_perm, config.seed)
    return kernels.minhash(grams, offsets, a, b, threads=threads)


def exact_key(canonical: str) -> int:
    """A 63-bit digest of a record's canonical text: what exact duplicates share (63 bits
    so it fits a signed int64 column: Arrow, `datasets`)."""
    return int.from_bytes(hashlib.blake2b(canonical.encode("utf-8"), digest_size=8).digest(), "little") >> 1


# Pairs verified per step of `near_pairs`: (chunk, num_perm) comparisons, 16 MiB at K = 128.
_PAIR_CHUNK = 1 << 17


def near_pairs(sigs: np.ndarray, bands: int, rows: int, min_agree: int) -> tuple[np.ndarray, np.ndarray]:
    """(left, right) int64, left < right, each pair once, in rising order: every two rows of
    `sigs` that share a band bucket and agree on >= `min_agree` positions.

    Band keys are the LSH index's (`kernels.band_keys`, numpy whatever the backend: one
    vectorised pass). A bucket of m records gives m(m-1)/2 candidates, so this suits
    data whose exact duplicates are gone (the Deduplicator removes them first)."""
    n = len(sigs)
    keys = band_keys(sigs, bands, rows)  # (n, bands)
    lefts, rights = [], []
    for band in range(bands):
        order = np.argsort(keys[:, band], kind="stable")
        sorted_keys = keys[order, band]
        # the end of each position's run of equal keys
        run_start = np.flatnonzero(np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1])))
        run_end = np.append(run_start[1:], n)
        end = np.repeat(run_end, np.diff(np.append(run_start, n)))
        after = end - np.arange(n) - 1  # partners later in the run
        if not after.any():
            continue
        pos = np.repeat(np.arange(n), after)
        first = np.cumsum(after) - after
        partner = pos + 1 + (np.arange(len(pos)) - first[pos])
        a, b = order[pos], order[partner]
        lefts.append(np.minimum(a, b))
        rights.append(np.maximum(a, b))
    if not lefts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    pair = np.unique(np.concatenate(lefts).astype(np.int64) * n + np.concatenate(rights))
    left, right = pair // n, pair % n
    agree = np.concatenate([np.count_nonzero(sigs[left[i:i + _PAIR_CHUNK]] == sigs[right[i:i + _PAIR_CHUNK]], axis=1)
                            for i in range(0, len(pair), _PAIR_CHUNK)])
    keep = agree >= min_agree
    return left[keep], right[keep]


@dataclass(frozen=True)
class Clusters:
    """Near-duplicate clusters: `labels[i]` is the first record of record i's cluster
    (records numbered in input order after exact duplicates left), `sources[i]` its
    `path:line`."""

    labels: np.ndarray
    sources: list[str]

    def groups(self) -> list[list[int]]:
        """Clusters of two or more records, largest first (ties: first seen first), members in input order."""
        sizes = np.bincount(self.labels, minlength=len(self.labels))
        heads = [int(h) for h in np.flatnonzero(sizes >= 2)]
        members: dict[int, list[int]] = {h: [] for h in heads}
        for i in np.flatnonzero(sizes[self.labels] >= 2):
            members[int(self.labels[i])].append(int(i))
        return sorted(members.values(), key=lambda g: (-len(g), g[0]))

    def to_dict(self, largest: int = 5, samples: int = 3) -> dict[str, Any]:
        """{"count", "records", "largest": sizes, "samples": [[path:line, ...], ...]}."""
        groups = self.groups()
        return {"count": len(groups), "records": sum(len(g) for g in groups),
                "largest": [len(g) for g in groups[:largest]],
                "samples": [[self.sources[i] for i in g[:samples]] for g in groups[:samples]]}


@dataclass(frozen=True)
class Verdict:
    """Why a record goes, and the kept record it repeats (`path:line`)."""

    kind: str
    duplicate_of: str


class Deduplicator:
    """Exact keys seen and the LSH index, over every record of a run, in input order.

    Streaming (`near_mode: stream`), memory grows with the kept records only: 8 bytes of
    exact key and its source per record, and num_perm * 4 bytes + `bands` bucket entries
    per kept signature. With `near_mode: cluster`, or `collect=True` (inspect's cluster
    report), it also holds every signature until `clusters()`; in cluster mode `add`
    decides exact duplicates only and `near_verdicts()` the rest, at the end.
    """

    def __init__(self, config: DedupConfig, kernels: ModuleType, *, collect: bool = False) -> None:
        self.config = config
        self.kernels = kernels
        self.bands, self.rows = bands_rows(config)
        stream = config.near and config.near_mode == "stream"
        self.index = kernels.LSHIndex(config.num_perm, self.bands, self.rows, config.min_agree) if stream else None
        self.collect = config.near and (collect or config.near_mode == "cluster")
        self.collected: list[np.ndarray] = []  # fresh records' signatures, batch by batch
        self._clusters: Clusters | None = None
        self.exact: dict[int, str] = {}
        self.near_sources: list[str] = []  # sequence number in the index -> path:line

    def add(self, sources: Sequence[str], keys: Sequence[int], sigs: np.ndarray) -> list[Verdict | None]:
        """One verdict per record (None: kept). Exact duplicates never reach the index."""
        verdicts: list[Verdict | None] = [None] * len(sources)
        fresh: list[int] = []
        for i, (source, key) in enumerate(zip(sources, keys)):
            if self.config.exact:
                first = self.exact.setdefault(key, source)
                if first != source:
                    verdicts[i] = Verdict(EXACT_DUPLICATE, first)
                    continue
            fresh.append(i)
        if not self.config.near or not fresh:
            return verdicts
        fresh_sigs = np.ascontiguousarray(sigs[fresh])
        if self.collect:
            self.collected.append(fresh_sigs)
        duplicate_of = self.index.add(fresh_sigs) if self.index is not None else None
        for j, i in enumerate(fresh):
            self.near_sources.append(sources[i])
            if duplicate_of is not None and duplicate_of[j] >= 0:
                verdicts[i] = Verdict(NEAR_DUPLICATE, self.near_sources[duplicate_of[j]])
        return verdicts

    def clusters(self) -> Clusters | None:
        """The near-duplicate clusters of every record added (None unless collecting)."""
        if not self.collect:
            return None
        if self._clusters is None or len(self._clusters.labels) != len(self.near_sources):  # once per state
            sigs = np.concatenate(self.collected) if self.collected else np.zeros((0, self.config.num_perm), np.uint32)
            left, right = near_pairs(sigs, self.bands, self.rows, self.config.min_agree)
            self._clusters = Clusters(self.kernels.union_find(len(sigs), left, right), list(self.near_sources))
        return self._clusters

    def near_verdicts(self) -> dict[int, Verdict]:
        """Cluster mode, after the last `add`: near sequence number -> verdict for every
        record that is not the first of its cluster (in stream mode: none)."""
        if self.config.near_mode != "cluster" or not self.config.near:
            return {}
        clusters = self.clusters()
        assert clusters is not None
        labels = clusters.labels
        return {int(i): Verdict(NEAR_DUPLICATE, self.near_sources[labels[i]])
                for i in np.flatnonzero(labels != np.arange(len(labels)))}
