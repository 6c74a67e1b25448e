"""The data pipeline's kernels in numpy: MLForge's twins, bit for bit.

MLForge (`packages/mlforge`, C++) is optional; without it Reactor Core runs these, and
a test runs both on the same inputs and compares every bit. So each function here
repeats its C++ twin's arithmetic exactly (uint64 wrap-around included) rather than
merely doing "the same thing"; `mlforge/_core.cpp` documents the formulas:

    word hash    fmix64(Horner(bytes + 1, base 0x100000001b3))   word = run of [0-9A-Za-z\\x80-\\xff]
    byte hash    fmix64(byte + 1)
    n-gram       fmix64(Horner(token hashes, base 0x9E3779B97F4A7C15)); a document with
                 fewer than n tokens gives one n-gram over all of them
    MinHash      min over shingles x of ((a*x' + b) mod 2^64) mod (2^61 - 1) & 0xFFFFFFFF,
                 x' = x & 0xFFFFFFFF (datasketch's update_batch)
    band key     fmix64(Horner(band + 1, the band's rows, base 0x9E3779B97F4A7C15))
    cluster      the smallest item index in each connected component of the pairs

Batches use MLForge's layout: one flat array plus `offsets` (int64, n + 1 entries).
Every function is vectorised over the batch except the LSH index's bucket walk, which
is a dict per band.
"""

from __future__ import annotations

import numpy as np

MERSENNE_61 = np.uint64((1 << 61) - 1)
MAX_HASH = np.uint64(0xFFFFFFFF)
WORD_PRIME = np.uint64(0x100000001B3)
GRAM_BASE = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)

# Which bytes belong to a word: ASCII letters and digits, and every byte >= 0x80 (the
# bytes of multi-byte UTF-8 characters).
WORD_BYTES = np.zeros(256, dtype=bool)
for _lo, _hi in ((ord("0"), ord("9")), (ord("a"), ord("z")), (ord("A"), ord("Z")), (0x80, 0xFF)):
    WORD_BYTES[_lo:_hi + 1] = True

# Shingles per MinHash chunk: (chunk, K) uint64 intermediates stay around 16 MiB at K = 128.
_MINHASH_CHUNK = 1 << 14


def fmix64(k: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finalizer over a uint64 array (a new array)."""
    k = k ^ (k >> _S33)
    k = k * _M1
    k = k ^ (k >> _S33)
    k = k * _M2
    return k ^ (k >> _S33)


def _check_offsets(offsets: np.ndarray, n_values: int, name: str = "offsets") -> None:
    if offsets.dtype != np.int64 or offsets.ndim != 1 or len(offsets) < 1:
        raise TypeError(f"`{name}` must be a 1-D int64 array with at least one entry")
    if offsets[0] != 0 or offsets[-1] != n_values or np.any(np.diff(offsets) < 0):
        raise ValueError(f"`{name}` must rise from 0 to the values' length {n_values}")


def _powers(base: np.uint64, n: int) -> np.ndarray:
    """[1, base, base^2, ...] mod 2^64, n entries."""
    out = np.empty(max(n, 1), dtype=np.uint64)
    out[0] = 1
    with np.errstate(over="ignore"):  # numpy warns on scalar wrap-around; it is intended
        for i in range(1, n):  # n is a longest word: small
            out[i] = out[i - 1] * base
    return out[:n]


def token_hashes(data: np.ndarray, offsets: np.ndarray, mode: str = "word") -> tuple[np.ndarray, np.ndarray]:
    """(hashes uint64, offsets int64): each document's word (or byte) hashes."""
    _check_offsets(offsets, len(data))
    n_docs = len(offsets) - 1
    if mode == "byte":
        return fmix64(data.astype(np.uint64) + np.uint64(1)), offsets.copy()
    if mode != "word":
        raise ValueError(f"`mode` must be 'word' or 'byte', got {mode!r}")
    if len(data) == 0:
        return np.zeros(0, dtype=np.uint64), np.zeros(n_docs + 1, dtype=np.int64)
    word = WORD_BYTES[data]
    # A word starts where a word byte follows a non-word byte or opens a document, and
    # ends where one is followed by a non-word byte or closes a document.
    doc_start = np.zeros(len(data) + 1, dtype=bool)
    doc_start[offsets] = True
    prev_word = np.concatenate(([False], word[:-1])) & ~doc_start[:-1]
    next_word = np.concatenate((word[1:], [False])) & ~doc_start[1:]
    starts = np.flatnonzero(word & ~prev_word)
    ends = np.flatnonzero(word & ~next_word) + 1
    if len(starts) == 0:
        return np.zeros(0, dtype=np.uint64), np.zeros(n_docs + 1, dtype=np.int64)
    lengths = ends - starts
    # Horner's rule as a sum: byte j of a word of end e weighs base^(e - 1 - j).
    positions = np.flatnonzero(word)
    word_of = np.repeat(np.arange(len(starts)), lengths)
    exponent = ends[word_of] - 1 - positions
    terms = (data[positions].astype(np.uint64) + np.uint64(1)) * _powers(WORD_PRIME, int(lengths.max()))[exponent]
    hashes = fmix64(np.add.reduceat(terms, np.concatenate(([0], np.cumsum(lengths)[:-1]))))
    doc_of = np.searchsorted(offsets, starts, side="right") - 1
    counts = np.bincount(doc_of, minlength=n_docs)
    return hashes, np.concatenate(([0], np.cumsum(counts))).astype(np.int64)


def ngram_hashes(tokens: np.ndarray, offsets: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(grams uint64, offsets int64): hashes of each document's runs of n tokens."""
    if n < 1:
        raise ValueError(f"`n` must be positive, got {n}")
    _check_offsets(offsets, len(tokens))
    lengths = np.diff(offsets)
    width = np.minimum(lengths, n)  # n, or all of a short document's tokens
    counts = np.where(lengths > 0, lengths - width + 1, 0)
    doc = np.repeat(np.arange(len(lengths)), counts)
    first = np.concatenate(([0], np.cumsum(counts)[:-1]))
    starts = offsets[:-1][doc] + (np.arange(counts.sum()) - first[doc])
    widths = width[doc]
    grams = np.zeros(len(starts), dtype=np.uint64)
    for k in range(n):  # Horner over the window; positions past a short window add nothing
        inside = widths > k
        grams[inside] = grams[inside] * GRAM_BASE + tokens[starts[inside] + k]
    return fmix64(grams), np.concatenate(([0], np.cumsum(counts))).astype(np.int64)


def first_hit(grams: np.ndarray, offsets: np.ndarray, table: np.ndarray) -> np.ndarray:
    """int64 per document: the position of its first n-gram in sorted `table`, or -1."""
    _check_offsets(offsets, len(grams))
    if len(table) > 1 and np.any(table[1:] < table[:-1]):
        raise ValueError("`table` must be sorted")
    out = np.full(len(offsets) - 1, -1, dtype=np.int64)
    if len(table) == 0 or len(grams) == 0:
        return out
    where = np.searchsorted(table, grams).clip(max=len(table) - 1)
    hits = np.flatnonzero(table[where] == grams)
    doc = np.searchsorted(offsets, hits, side="right") - 1
    docs, first = np.unique(doc, return_index=True)  # hits rise, so the first per document
    out[docs] = hits[first] - offsets[docs]
    return out


def _check_out(out: np.ndarray, dtype: type, shape: tuple[int, ...]) -> None:
    """MLForge's rule for `out=`: the exact dtype and shape, C-contiguous, writeable."""
    if not isinstance(out, np.ndarray) or out.dtype != dtype or not out.flags.c_contiguous:
        raise TypeError(f"`out` must be a C-contiguous numpy array of {np.dtype(dtype)}")
    if out.shape != shape:
        raise ValueError(f"`out` must have shape {shape}")
    if not out.flags.writeable:
        raise ValueError("`out` must be writeable")


def minhash(grams: np.ndarray, offsets: np.ndarray, a: np.ndarray, b: np.ndarray, threads: int = 1,
            out: np.ndarray | None = None) -> np.ndarray:
    """(n_docs, K) uint32 MinHash signatures; empty documents are all 0xFFFFFFFF.
    `threads` is MLForge's (documents split over threads); numpy runs in one. `out`:
    the caller's (n_docs, K) uint32 array, filled in place and returned."""
    _check_offsets(offsets, len(grams))
    if len(a) != len(b) or len(a) == 0:
        raise ValueError("`a` and `b` must have the same, positive length")
    n_docs = len(offsets) - 1
    if out is None:
        out = np.empty((n_docs, len(a)), dtype=np.uint32)
    _check_out(out, np.uint32, (n_docs, len(a)))
    out.fill(0xFFFFFFFF)
    x = (grams & MAX_HASH)[:, None]  # (G, 1)
    lo = 0
    while lo < n_docs:  # whole documents per chunk, about _MINHASH_CHUNK shingles each
        hi = max(lo + 1, int(np.searchsorted(offsets, offsets[lo] + _MINHASH_CHUNK, side="right")) - 1)
        hi = min(hi, n_docs)
        docs = np.arange(lo, hi)[offsets[lo + 1:hi + 1] > offsets[lo:hi]]  # non-empty
        if len(docs):
            g0, g1 = offsets[lo], offsets[hi]
            values = ((a[None, :] * x[g0:g1] + b[None, :]) % MERSENNE_61) & MAX_HASH  # (G, K)
            out[docs] = np.minimum.reduceat(values, offsets[docs] - g0, axis=0).astype(np.uint32)
        lo = hi
    return out


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64 bucket keys of each signature's bands."""
    keys = np.repeat(np.arange(1, bands + 1, dtype=np.uint64)[None, :], len(signatures), axis=0)
    for r in range(rows):
        keys = keys * GRAM_BASE + signatures[:, r:bands * rows:rows].astype(np.uint64)
    return fmix64(keys)


class LSHIndex:
    """MLForge's streaming near-duplicate index (see `_core.cpp`), with dicts.

    A document is a duplicate of the first kept document (band 0 first, then the most
    recently kept in each bucket) that shares a band bucket with it and agrees on at
    least `min_agree` signature positions; duplicates are not stored.
    """

    def __init__(self, num_perm: int, bands: int, rows: int, min_agree: int) -> None:
        if num_perm < 1 or bands < 1 or rows < 1 or bands * rows > num_perm:
            raise ValueError(f"need bands * rows <= num_perm, all positive; got bands={bands} rows={rows} "
                             f"num_perm={num_perm}")
        if not 0 <= min_agree <= num_perm:
            raise ValueError(f"`min_agree` must be in [0, num_perm], got {min_agree}")
        self.num_perm, self.bands, self.rows, self.min_agree = num_perm, bands, rows, min_agree
        self.buckets: list[dict[int, list[int]]] = [{} for _ in range(bands)]
        self.signatures = np.zeros((1024, num_perm), dtype=np.uint32)  # kept, by slot; doubled as needed
        self.seq_of: list[int] = []
        self.seen = 0

    @property
    def kept(self) -> int:
        return len(self.seq_of)

    def add(self, signatures: np.ndarray) -> np.ndarray:
        if signatures.dtype != np.uint32 or signatures.ndim != 2 or signatures.shape[1] != self.num_perm:
            raise ValueError(f"`signatures` must be uint32 of shape (n, {self.num_perm})")
        keys = band_keys(signatures, self.bands, self.rows).tolist()
        out = np.full(len(signatures), -1, dtype=np.int64)
        for i, sig in enumerate(signatures):
            seq = self.seen
            self.seen += 1
            checked: set[int] = set()
            for band, key in enumerate(keys[i]):
                for slot in reversed(self.buckets[band].get(key, ())):
                    if slot in checked:
                        continue
                    checked.add(slot)
                    if np.count_nonzero(self.signatures[slot] == sig) >= self.min_agree:
                        out[i] = self.seq_of[slot]
                        break
                if out[i] >= 0:
                    break
            if out[i] >= 0:
                continue
            slot = len(self.seq_of)
            if slot == len(self.signatures):
                self.signatures = np.concatenate((self.signatures, np.zeros_like(self.signatures)))
            self.signatures[slot] = sig
            self.seq_of.append(seq)
            for band, key in enumerate(keys[i]):
                self.buckets[band].setdefault(key, []).append(slot)
        return out


def union_find(n: int, left: np.ndarray, right: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """int64 cluster label of each of `n` items joined by the pairs (left[i], right[i]):
    the smallest index in its connected component (the first seen). `out`: the caller's
    (n,) int64 array, filled in place and returned.

    MLForge runs a union-find; this is its vectorised twin, min-label propagation: each
    pair pulls both ends down to the smaller label, then pointer jumping (a label is an
    item of the same component with a smaller index, so `labels[labels]` is one too)
    until nothing moves. Same labels, O(pairs x log(diameter)) work in numpy."""
    if n < 0:
        raise ValueError(f"`n` must be >= 0, got {n}")
    for name, values in (("left", left), ("right", right)):
        if not isinstance(values, np.ndarray) or values.dtype != np.int64 or values.ndim != 1:
            raise TypeError(f"`{name}` must be a 1-D numpy array of int64")
    if len(left) != len(right):
        raise ValueError("`left` and `right` must be 1-D and the same length")
    bad = np.flatnonzero((left < 0) | (left >= n) | (right < 0) | (right >= n))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"pair {i}: ({left[i]}, {right[i]}) is outside [0, {n})")
    if out is None:
        out = np.empty(n, dtype=np.int64)
    _check_out(out, np.int64, (n,))
    labels = np.arange(n, dtype=np.int64)
    while True:
        low = np.minimum(labels[left], labels[right])
        moved = labels.copy()
        np.minimum.at(moved, left, low)
        np.minimum.at(moved, right, low)
        while True:  # pointer jumping: follow labels to their labels
            jumped = moved[moved]
            if np.array_equal(jumped, moved):
                break
            moved = jumped
        if np.array_equal(moved, labels):
            break
        labels = moved
    out[:] = labels
    return out


def ffd_pack(lengths: np.ndarray, capacity: int) -> np.ndarray:
    """int64 row of each item: longest first (ties in input order), each into the first
    row with room, found in O(log n) by a max-tree over the rows' free space."""
    if capacity < 1:
        raise ValueError(f"`capacity` must be positive, got {capacity}")
    sizes = [int(v) for v in lengths]
    for i, size in enumerate(sizes):
        if size < 0 or size > capacity:
            raise ValueError(f"item {i}: length {size} does not fit in capacity {capacity}")
    leaves = 1
    while leaves < max(len(sizes), 1):
        leaves *= 2
    tree = [capacity] * (2 * leaves)  # leaf r: row r's free space; inner nodes: max of children
    out = np.empty(len(sizes), dtype=np.int64)
    for item in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        need, node = sizes[item], 1
        while node < leaves:  # down, preferring the left (earlier) child
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        out[item] = node - leaves
        tree[node] -= need
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return out
