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
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType

import numpy as np

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


@dataclass(frozen=True)
class Verdict:
    """Why a record goes, and the kept record it repeats (`path:line`)."""

    kind: str
    duplicate_of: str


class Deduplicator:
    """Exact keys seen and the LSH index, over every record of a run, in input order.

    Memory grows with the kept records only: 8 bytes of exact key and its source per
    record, and num_perm * 4 bytes + `bands` bucket entries per kept signature.
    """

    def __init__(self, config: DedupConfig, kernels: ModuleType) -> None:
        self.config = config
        bands, rows = bands_rows(config)
        self.index = kernels.LSHIndex(config.num_perm, bands, rows, config.min_agree) if config.near else None
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
        if self.index is not None and fresh:
            duplicate_of = self.index.add(np.ascontiguousarray(sigs[fresh]))
            base = len(self.near_sources)
            for j, i in enumerate(fresh):
                self.near_sources.append(sources[i])
                if duplicate_of[j] >= 0:
                    verdicts[i] = Verdict(NEAR_DUPLICATE, self.near_sources[duplicate_of[j]])
            assert len(self.near_sources) == base + len(fresh)
        return verdicts
