"""MLForge's kernels against answers worked out by hand or by plain Python.

The bit-for-bit comparison with the numpy twins lives in Reactor Core's tests
(`tests/test_data_pipeline.py`), which import both; these need only mlforge and numpy.
"""

import threading

import numpy as np
import pytest

import mlforge

MASK = (1 << 64) - 1
P61 = (1 << 61) - 1


def fmix64(k: int) -> int:
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & MASK
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & MASK
    return k ^ (k >> 33)


def word_hash(word: bytes) -> int:
    h = 0
    for c in word:
        h = (h * 0x100000001B3 + c + 1) & MASK
    return fmix64(h)


def flat(texts):
    data = b"".join(texts)
    offsets = np.concatenate(([0], np.cumsum([len(t) for t in texts]))).astype(np.int64)
    return np.frombuffer(data, dtype=np.uint8), offsets


def distinct(rng, n):
    """n different 32-bit shingle hashes."""
    values = np.unique(rng.integers(1, 1 << 32, 2 * n, dtype=np.uint64))[:n]
    assert len(values) == n
    return rng.permutation(values)


def perms(k, seed=1):
    rng = np.random.default_rng(seed)
    return rng.integers(1, P61, k, dtype=np.uint64), rng.integers(0, P61, k, dtype=np.uint64)


def test_words_are_runs_of_letters_digits_and_utf8_and_never_cross_documents():
    texts = ["Hello, wörld!  42x", "", "a", "b-c"]
    data, offsets = flat([t.encode() for t in texts])
    hashes, offs = mlforge.token_hashes(data, offsets, "word")
    expected = [[b"Hello", "wörld".encode(), b"42x"], [], [b"a"], [b"b", b"c"]]
    assert offs.tolist() == [0, 3, 3, 4, 6]
    assert hashes.tolist() == [word_hash(w) for doc in expected for w in doc]
    byte_hashes, byte_offs = mlforge.token_hashes(data, offsets, "byte")
    assert byte_offs.tolist() == offsets.tolist()
    assert byte_hashes.tolist() == [fmix64(c + 1) for c in data.tolist()]


def test_ngrams_slide_within_a_document_and_a_short_one_is_one_gram():
    tokens = np.array([1, 2, 3, 4, 7, 8], dtype=np.uint64)
    offsets = np.array([0, 4, 4, 6], dtype=np.int64)  # [1 2 3 4], [], [7 8]
    grams, offs = mlforge.ngram_hashes(tokens, offsets, 3)
    base = 0x9E3779B97F4A7C15

    def g(*ts):
        h = 0
        for t in ts:
            h = (h * base + t) & MASK
        return fmix64(h)

    assert offs.tolist() == [0, 2, 2, 3]
    assert grams.tolist() == [g(1, 2, 3), g(2, 3, 4), g(7, 8)]


def test_minhash_is_datasketchs_formula():
    grams = np.array([5, 1 << 40 | 9, 77], dtype=np.uint64)
    a, b = perms(16)
    sig = mlforge.minhash(grams, np.array([0, 3, 3], dtype=np.int64), a, b)
    assert sig.shape == (2, 16) and sig.dtype == np.uint32
    for k in range(16):
        want = min((((int(a[k]) * (x & 0xFFFFFFFF) + int(b[k])) & MASK) % P61) & 0xFFFFFFFF for x in grams.tolist())
        assert sig[0, k] == want
    assert (sig[1] == 0xFFFFFFFF).all(), "an empty document has the empty signature"


@pytest.mark.parametrize("jaccard", [0.2, 0.5, 0.8, 0.95])
def test_minhash_estimates_jaccard_within_its_statistical_bound(jaccard):
    """Sets of 400 shingles sharing round(J * 400 * 2 / (1 + J)) of them; K = 512: the
    estimate's standard deviation is sqrt(J(1-J)/K) <= 0.022, so 4 sigma is < 0.09."""
    k, size = 512, 400
    shared = round(jaccard * 2 * size / (1 + jaccard))
    truth = shared / (2 * size - shared)
    rng = np.random.default_rng(int(jaccard * 100))
    pool = distinct(rng, 2 * size)
    x = pool[:size]
    y = np.concatenate((pool[:shared], pool[size:2 * size - shared]))
    a, b = perms(k)
    sig = mlforge.minhash(np.concatenate((x, y)), np.array([0, size, 2 * size], dtype=np.int64), a, b)
    estimate = float(np.mean(sig[0] == sig[1]))
    assert abs(estimate - truth) <= 4 * np.sqrt(truth * (1 - truth) / k) + 1e-9


def test_minhash_threads_split_documents_without_changing_a_bit():
    rng = np.random.default_rng(9)
    lengths = rng.integers(0, 40, 3000)
    grams = rng.integers(0, 1 << 63, int(lengths.sum()), dtype=np.uint64)
    offsets = np.concatenate(([0], np.cumsum(lengths))).astype(np.int64)
    a, b = perms(64)
    one = mlforge.minhash(grams, offsets, a, b, threads=1)
    assert np.array_equal(one, mlforge.minhash(grams, offsets, a, b, threads=3))
    assert np.array_equal(one, mlforge.minhash(grams, offsets, a, b, threads=0))


def test_lsh_index_keeps_the_first_and_names_it_for_each_near_copy():
    a, b = perms(64)
    rng = np.random.default_rng(0)
    base = [distinct(rng, 200) for _ in range(50)]
    docs = base + [np.concatenate((base[7][:195], rng.integers(1, 1 << 32, 5, dtype=np.uint64)))]  # J ~ 0.95
    docs.append(base[3].copy())
    offsets = np.concatenate(([0], np.cumsum([len(d) for d in docs]))).astype(np.int64)
    sig = mlforge.minhash(np.concatenate(docs), offsets, a, b)
    index = mlforge.LSHIndex(64, 8, 8, int(np.ceil(0.8 * 64)))
    first = index.add(sig[:30])
    rest = index.add(sig[30:])
    out = np.concatenate((first, rest))
    assert out[:50].tolist() == [-1] * 50
    assert out[50:].tolist() == [7, 3]
    assert index.seen == 52 and index.kept == 50


def test_ffd_pack_never_exceeds_capacity_and_is_first_fit_decreasing():
    rows = mlforge.ffd_pack(np.array([5, 3, 7, 2, 8, 1], dtype=np.int64), 8)
    # longest first: 8 -> row 0; 7 -> row 1; 5 -> row 2; 3 -> row 2; 2 -> row 3; 1 -> row 1
    assert rows.tolist() == [2, 2, 1, 3, 0, 1]
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 2049, 5000).astype(np.int64)
    rows = mlforge.ffd_pack(lengths, 2048)
    fill = np.bincount(rows, weights=lengths)
    assert fill.max() <= 2048
    assert len(fill) <= np.ceil(lengths.sum() / 2048) * 11 / 9 + 1  # FFD's bound
    with pytest.raises(ValueError, match="item 1: length 9 does not fit in capacity 8"):
        mlforge.ffd_pack(np.array([1, 9], dtype=np.int64), 8)


def test_wrong_dtypes_and_offsets_are_refused_not_copied():
    data, offsets = flat([b"abc"])
    with pytest.raises(TypeError, match="`data` must be a C-contiguous numpy array of uint8, got int32"):
        mlforge.token_hashes(data.astype(np.int32), offsets)
    with pytest.raises(ValueError, match="`offsets` must end at the values' length 3, got 2"):
        mlforge.token_hashes(data, np.array([0, 2], dtype=np.int64))
    with pytest.raises(ValueError, match="bands \\* rows <= num_perm"):
        mlforge.LSHIndex(16, 5, 4, 10)
    # a strided view is refused, not silently copied
    with pytest.raises(TypeError, match="`data` must be a C-contiguous numpy array of uint8"):
        mlforge.token_hashes(np.frombuffer(b"a b c d", dtype=np.uint8)[::2], np.array([0, 4], dtype=np.int64))
    with pytest.raises(TypeError, match="`signatures` must be a C-contiguous numpy array of uint32"):
        mlforge.LSHIndex(32, 4, 8, 26).add(np.zeros((8, 32), dtype=np.uint32)[::2])


def components(n, pairs):
    """Plain-Python oracle: the smallest member of each item's connected component."""
    adjacent = [[] for _ in range(n)]
    for x, y in pairs:
        adjacent[x].append(y)
        adjacent[y].append(x)
    label = [-1] * n
    for start in range(n):  # rising: the first item reached labels its component
        if label[start] >= 0:
            continue
        label[start], todo = start, [start]
        while todo:
            for y in adjacent[todo.pop()]:
                if label[y] < 0:
                    label[y] = start
                    todo.append(y)
    return label


def pairs_of(edges):
    left, right = (np.array(side, dtype=np.int64) for side in zip(*edges)) if edges else (
        np.zeros(0, np.int64), np.zeros(0, np.int64))
    return left, right


@pytest.mark.parametrize("n, edges, labels", [
    (5, [(0, 1), (1, 2), (2, 3)], [0, 0, 0, 0, 4]),              # a chain: one cluster, however long
    (5, [(3, 2), (2, 1), (1, 0)], [0, 0, 0, 0, 4]),              # the same chain, pairs reversed
    (8, [(3, 7), (3, 0), (5, 3)], [0, 1, 2, 0, 4, 0, 6, 0]),     # a star around 3: labelled by its first member
    (6, [(4, 4), (5, 1), (1, 5), (2, 4)], [0, 1, 2, 3, 2, 1]),   # self and repeated pairs change nothing
    (3, [], [0, 1, 2]),                                          # no pairs: every item alone
    (0, [], []),
])
def test_union_find_labels_each_cluster_by_its_first_member(n, edges, labels):
    left, right = pairs_of(edges)
    assert mlforge.union_find(n, left, right).tolist() == labels


def test_union_find_matches_a_plain_search_and_fills_out_in_place():
    rng = np.random.default_rng(4)
    n = 3000
    left = rng.integers(0, n, 2500, dtype=np.int64)
    right = rng.integers(0, n, 2500, dtype=np.int64)
    out = np.full(n, -7, dtype=np.int64)
    got = mlforge.union_find(n, left, right, out=out)
    assert np.shares_memory(got, out) and got is not None
    assert out.tolist() == components(n, zip(left.tolist(), right.tolist()))
    with pytest.raises(ValueError, match="pair 1: \\(2, 9\\) is outside \\[0, 5\\)"):
        mlforge.union_find(5, np.array([0, 2], dtype=np.int64), np.array([1, 9], dtype=np.int64))
    with pytest.raises(TypeError, match="`left` must be a C-contiguous numpy array of int64, got int32"):
        mlforge.union_find(5, np.array([0], dtype=np.int32), np.array([1], dtype=np.int64))
    with pytest.raises(ValueError, match="`out` must have shape \\(5,\\)"):
        mlforge.union_find(5, *pairs_of([(0, 1)]), out=np.zeros(4, dtype=np.int64))


def test_minhash_fills_the_callers_array_in_place():
    rng = np.random.default_rng(2)
    grams = rng.integers(0, 1 << 63, 900, dtype=np.uint64)
    offsets = np.array([0, 100, 100, 900], dtype=np.int64)
    a, b = perms(64)
    out = np.zeros((3, 64), dtype=np.uint32)
    got = mlforge.minhash(grams, offsets, a, b, out=out)
    assert np.shares_memory(got, out)
    assert np.array_equal(out, mlforge.minhash(grams, offsets, a, b))
    assert (out[1] == 0xFFFFFFFF).all()  # the empty document, written over the zeros
    with pytest.raises(ValueError, match="`out` must have shape \\(3, 64\\)"):
        mlforge.minhash(grams, offsets, a, b, out=np.zeros((3, 32), dtype=np.uint32))
    with pytest.raises(TypeError, match="`out` must be a C-contiguous numpy array of uint32, got int64"):
        mlforge.minhash(grams, offsets, a, b, out=np.zeros((3, 64), dtype=np.int64))
    with pytest.raises(TypeError, match="`out` must be a C-contiguous numpy array of uint32"):
        mlforge.minhash(grams, offsets, a, b, out=np.zeros((64, 3), dtype=np.uint32).T)
    frozen = np.zeros((3, 64), dtype=np.uint32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="`out` must be writeable"):
        mlforge.minhash(grams, offsets, a, b, out=frozen)


def test_minhash_releases_the_gil_while_it_runs():
    """The main thread watches the kernel's `out` from Python while another thread runs
    the kernel. With the GIL held through the loop, Python cannot run until the kernel
    returns, so it could only ever see `out` untouched or complete; seeing rows written
    while the last is not (many times over) proves the loop runs without the GIL. No
    clock is read: the kernel's own progress marks its start and end."""
    rng = np.random.default_rng(0)
    n_docs, per_doc = 4000, 1000  # a few hundred ms of MinHash
    grams = rng.integers(1, 1 << 63, n_docs * per_doc, dtype=np.uint64)
    offsets = np.arange(0, n_docs * per_doc + 1, per_doc, dtype=np.int64)
    a, b = perms(256)

    def watch() -> int:
        """Steps of a Python loop taken while the kernel was mid-way through `out`."""
        out = np.zeros((n_docs, 256), dtype=np.uint32)  # a real document's row is never all zero
        started, errors = threading.Event(), []

        def run():
            started.set()
            try:
                mlforge.minhash(grams, offsets, a, b, threads=1, out=out)  # rows are written in order
            except BaseException as err:  # pragma: no cover - reported below
                errors.append(err)

        worker = threading.Thread(target=run)
        worker.start()
        started.wait()
        steps_during = 0
        while worker.is_alive() and not out[-1].any():
            if out[0].any():  # the kernel has started and not finished
                steps_during += 1
        worker.join()
        assert not errors and out[-1].any()
        return steps_during

    # With the GIL held this is 0 every time; released, a loaded machine could still
    # starve this thread through one run, so it gets three.
    steps = [watch()]
    while steps[-1] <= 100 and len(steps) < 3:
        steps.append(watch())
    assert steps[-1] > 100, steps
