"""MLForge: the native core of Reactor Core's data pipeline (C++17 through pybind11).

Kernels over numpy arrays, each the hot loop of one pipeline stage, each run with the
GIL released and without copying its inputs (a wrong dtype is refused, not converted):

    token_hashes(data, offsets, mode)    UTF-8 bytes -> word (or byte) hashes per document
    ngram_hashes(tokens, offsets, n)     token hashes -> n-gram (shingle) hashes
    minhash(grams, offsets, a, b, out=)  shingles -> (n, K) uint32 MinHash signatures
    LSHIndex(num_perm, bands, rows, min_agree).add(signatures)
                                         streaming near-duplicate index (banding + check)
    first_hit(grams, offsets, table)     first n-gram found in a sorted table (decontamination)
    union_find(n, left, right, out=)     connected components of pairs (near-duplicate clusters)
    ffd_pack(lengths, capacity)          first-fit decreasing rows

`out=` (minhash, union_find) fills the caller's array in place. The other kernels return
new arrays: token and n-gram counts are not known before the loop, and first_hit,
ffd_pack and LSHIndex.add return one int64 per document, small beside their inputs.

Reactor Core reaches these through `reactor_core.data.native`, which falls back to numpy
twins (`reactor_core.data.kernels`) that give the same bits when this package is absent.
"""

from mlforge._core import LSHIndex, ffd_pack, first_hit, minhash, ngram_hashes, token_hashes, union_find

__version__ = "0.2.0"

__all__ = ["LSHIndex", "ffd_pack", "first_hit", "minhash", "ngram_hashes", "token_hashes", "union_find", "__version__"]
