// MLForge's kernels: the loops of Reactor Core's data pipeline that Python is too slow for.
//
// Every function here has a twin in reactor_core/data/kernels.py (numpy) that gives the
// same bits; reactor_core's tests run both on the same inputs. So the hash functions are
// spelled out below, not taken from a library: the numpy twin must be able to repeat them.
//
// Layout shared by all kernels: a batch of documents is one flat array plus `offsets`
// (int64, n + 1 entries): document i is values[offsets[i]:offsets[i + 1]]. Arrays come in
// without copies (py::array_t without forcecast refuses the wrong dtype instead of
// converting), and every loop runs with the GIL released so other Python threads (the
// reader, the writer) keep going.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

using u8 = std::uint8_t;
using u32 = std::uint32_t;
using u64 = std::uint64_t;
using i64 = std::int64_t;

constexpr u64 MERSENNE_61 = (u64(1) << 61) - 1;  // datasketch's _mersenne_prime
constexpr u64 MAX_HASH = 0xFFFFFFFFull;          // datasketch's _max_hash: 32-bit values
constexpr u64 WORD_PRIME = 0x100000001b3ull;     // FNV-1a's prime, the word hash's base
constexpr u64 GRAM_BASE = 0x9E3779B97F4A7C15ull; // golden-ratio constant, the n-gram base

// x mod (2^61 - 1) for any 64-bit x, without a division: x = hi * 2^61 + lo and
// 2^61 = 1 (mod p), so x = hi + lo (mod p), and hi + lo < 2p needs one subtraction.
// Equal to x % MERSENNE_61 for every x (the numpy twin uses %), and vectorisable.
inline u64 mod_mersenne61(u64 x) {
  const u64 y = (x & MERSENNE_61) + (x >> 61);
  return y >= MERSENNE_61 ? y - MERSENNE_61 : y;
}

// MurmurHash3's 64-bit finalizer: every input bit reaches every output bit.
inline u64 fmix64(u64 k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdull;
  k ^= k >> 33;
  k *= 0xc4ceb9fe1a85ec53ull;
  k ^= k >> 33;
  return k;
}

// A word byte: ASCII letters and digits, and every byte of a multi-byte UTF-8 character
// (so accented and non-Latin words stay words). Everything else separates words.
inline bool is_word_byte(u8 c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c >= 0x80;
}

template <typename T>
using carray = py::array_t<T, py::array::c_style>;

template <typename T>
carray<T> checked(const py::array& a, const char* name) {
  if (!py::isinstance<carray<T>>(a) || !(a.flags() & py::array::c_style)) {
    throw py::type_error(std::string("`") + name + "` must be a C-contiguous numpy array of " +
                         py::str(py::dtype::of<T>()).cast<std::string>() + ", got " +
                         py::str(a.dtype()).cast<std::string>());
  }
  return py::reinterpret_borrow<carray<T>>(a);
}

void check_offsets(const i64* off, py::ssize_t n_off, py::ssize_t n_values, const char* name) {
  if (n_off < 1) throw py::value_error(std::string("`") + name + "` needs at least one entry (0)");
  if (off[0] != 0) throw py::value_error(std::string("`") + name + "` must start at 0");
  for (py::ssize_t i = 1; i < n_off; ++i)
    if (off[i] < off[i - 1]) throw py::value_error(std::string("`") + name + "` must not decrease");
  if (off[n_off - 1] != n_values)
    throw py::value_error(std::string("`") + name + "` must end at the values' length " + std::to_string(n_values) +
                          ", got " + std::to_string(off[n_off - 1]));
}

// ---------------------------------------------------------------------------------------
// Tokens and n-grams
// ---------------------------------------------------------------------------------------

// A ragged result as Python sees it: (values, offsets) numpy arrays, offsets[i]:offsets[i+1]
// being document i's values (built after the GIL-free loop, the one copy out of C++).
py::tuple ragged(const std::vector<u64>& values, const std::vector<i64>& offsets) {
  carray<u64> v(values.size());
  std::copy(values.begin(), values.end(), v.mutable_data());
  carray<i64> o(offsets.size());
  std::copy(offsets.begin(), offsets.end(), o.mutable_data());
  return py::make_tuple(v, o);
}

// Token hashes of each document's UTF-8 bytes. mode "word": one hash per word (Horner's
// rule over the bytes + 1 in base WORD_PRIME, then fmix64); mode "byte": one per byte,
// fmix64(byte + 1), for character shingles.
py::tuple token_hashes(const py::array& data_in, const py::array& offsets_in, const std::string& mode) {
  auto data = checked<u8>(data_in, "data");
  auto offsets = checked<i64>(offsets_in, "offsets");
  const u8* d = data.data();
  const i64* off = offsets.data();
  const py::ssize_t n_docs = offsets.size() - 1;
  check_offsets(off, offsets.size(), data.size(), "offsets");
  const bool words = mode == "word";
  if (!words && mode != "byte") throw py::value_error("`mode` must be 'word' or 'byte', got '" + mode + "'");

  std::vector<u64> hashes;
  std::vector<i64> out_off(n_docs + 1, 0);
  {
    py::gil_scoped_release release;
    hashes.reserve(words ? data.size() / 4 : data.size());
    for (py::ssize_t i = 0; i < n_docs; ++i) {
      if (words) {
        u64 h = 0;
        bool in_word = false;
        for (i64 j = off[i]; j < off[i + 1]; ++j) {
          const u8 c = d[j];
          if (is_word_byte(c)) {
            h = h * WORD_PRIME + (u64(c) + 1);
            in_word = true;
          } else if (in_word) {
            hashes.push_back(fmix64(h));
            h = 0;
            in_word = false;
          }
        }
        if (in_word) hashes.push_back(fmix64(h));
      } else {
        for (i64 j = off[i]; j < off[i + 1]; ++j) hashes.push_back(fmix64(u64(d[j]) + 1));
      }
      out_off[i + 1] = static_cast<i64>(hashes.size());
    }
  }
  return ragged(hashes, out_off);
}

// Hashes of every run of n consecutive tokens of each document (Horner's rule in base
// GRAM_BASE, then fmix64). A document with fewer than n tokens (but some) gives one hash
// over all of them, so a short prompt still has a fingerprint; an empty one gives none.
py::tuple ngram_hashes(const py::array& tokens_in, const py::array& offsets_in, int n) {
  if (n < 1) throw py::value_error("`n` must be positive, got " + std::to_string(n));
  auto tokens = checked<u64>(tokens_in, "tokens");
  auto offsets = checked<i64>(offsets_in, "offsets");
  const u64* t = tokens.data();
  const i64* off = offsets.data();
  const py::ssize_t n_docs = offsets.size() - 1;
  check_offsets(off, offsets.size(), tokens.size(), "offsets");

  std::vector<u64> grams;
  std::vector<i64> out_off(n_docs + 1, 0);
  {
    py::gil_scoped_release release;
    grams.reserve(tokens.size());
    for (py::ssize_t i = 0; i < n_docs; ++i) {
      const i64 len = off[i + 1] - off[i];
      const i64 width = std::min<i64>(n, len);
      for (i64 s = off[i]; width > 0 && s + width <= off[i + 1]; ++s) {
        u64 g = 0;
        for (i64 j = s; j < s + width; ++j) g = g * GRAM_BASE + t[j];
        grams.push_back(fmix64(g));
      }
      out_off[i + 1] = static_cast<i64>(grams.size());
    }
  }
  return ragged(grams, out_off);
}

// For each document, the position (within the document) of its first n-gram found in
// `table` (sorted uint64), or -1: decontamination's "does it share an n-gram with an
// evaluation set".
carray<i64> first_hit(const py::array& grams_in, const py::array& offsets_in, const py::array& table_in) {
  auto grams = checked<u64>(grams_in, "grams");
  auto offsets = checked<i64>(offsets_in, "offsets");
  auto table = checked<u64>(table_in, "table");
  const u64* g = grams.data();
  const i64* off = offsets.data();
  const u64* tb = table.data();
  const py::ssize_t n_docs = offsets.size() - 1, n_table = table.size();
  check_offsets(off, offsets.size(), grams.size(), "offsets");
  for (py::ssize_t i = 1; i < n_table; ++i)
    if (tb[i] < tb[i - 1]) throw py::value_error("`table` must be sorted");
  carray<i64> out(n_docs);
  i64* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    for (py::ssize_t i = 0; i < n_docs; ++i) {
      o[i] = -1;
      for (i64 j = off[i]; j < off[i + 1]; ++j) {
        if (std::binary_search(tb, tb + n_table, g[j])) {
          o[i] = j - off[i];
          break;
        }
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// MinHash
// ---------------------------------------------------------------------------------------

// The loop itself. The inner loop over permutations is 64-bit multiply-add and a
// division-free modulo: with AVX-512 (vpmullq) the compiler runs 8 permutations per
// instruction, so GCC builds it for x86-64-v4 and AVX2 too and picks one at load time.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MLFORGE_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define MLFORGE_CLONES
#endif

MLFORGE_CLONES
void minhash_docs(const u64* g, const i64* off, py::ssize_t n_docs, const u64* pa, const u64* pb, py::ssize_t k,
                  u32* o) {
  std::vector<u64> mins(k);
  for (py::ssize_t i = 0; i < n_docs; ++i) {
    std::fill(mins.begin(), mins.end(), MAX_HASH);
    for (i64 j = off[i]; j < off[i + 1]; ++j) {
      const u64 x = g[j] & MAX_HASH;
      for (py::ssize_t p = 0; p < k; ++p) {
        const u64 v = mod_mersenne61(pa[p] * x + pb[p]) & MAX_HASH;
        mins[p] = v < mins[p] ? v : mins[p];
      }
    }
    for (py::ssize_t p = 0; p < k; ++p) o[i * k + p] = static_cast<u32>(mins[p]);
  }
}

// (n_docs, K) uint32 signatures: for permutation k, the minimum over the document's
// shingles of ((a_k * x + b_k) mod 2^64) mod (2^61 - 1), low 32 bits, with x the
// shingle hash's low 32 bits: datasketch's MinHash.update_batch formula, uint64
// wrap-around included. An empty document's signature is all 0xFFFFFFFF.
//
// `out`: None, or the caller's C-contiguous uint32 (n_docs, K) array, filled in place and
// returned (a pipeline that reuses one buffer per batch allocates nothing per call).
py::array minhash(const py::array& grams_in, const py::array& offsets_in, const py::array& a_in,
                  const py::array& b_in, int threads, const py::object& out_in) {
  if (threads < 1) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  auto grams = checked<u64>(grams_in, "grams");
  auto offsets = checked<i64>(offsets_in, "offsets");
  auto a = checked<u64>(a_in, "a");
  auto b = checked<u64>(b_in, "b");
  if (a.size() != b.size() || a.size() == 0)
    throw py::value_error("`a` and `b` must have the same, positive length");
  const u64* g = grams.data();
  const i64* off = offsets.data();
  const py::ssize_t n_docs = offsets.size() - 1, k = a.size();
  check_offsets(off, offsets.size(), grams.size(), "offsets");
  carray<u32> out = out_in.is_none() ? carray<u32>({n_docs, k}) : checked<u32>(out_in, "out");
  if (out.ndim() != 2 || out.shape(0) != n_docs || out.shape(1) != k)
    throw py::value_error("`out` must have shape (" + std::to_string(n_docs) + ", " + std::to_string(k) + ")");
  if (!out.writeable()) throw py::value_error("`out` must be writeable");
  u32* o = out.mutable_data();
  const u64* pa = a.data();
  const u64* pb = b.data();
  {
    py::gil_scoped_release release;
    // Documents split across threads in contiguous ranges: each writes its own rows, so
    // the result does not depend on the thread count.
    const py::ssize_t n_threads = std::max<py::ssize_t>(1, std::min<py::ssize_t>(threads, n_docs / 512));
    if (n_threads == 1) {
      minhash_docs(g, off, n_docs, pa, pb, k, o);
    } else {
      std::vector<std::thread> pool;
      for (py::ssize_t t = 0; t < n_threads; ++t) {
        const py::ssize_t lo = n_docs * t / n_threads, hi = n_docs * (t + 1) / n_threads;
        pool.emplace_back(minhash_docs, g, off + lo, hi - lo, pa, pb, k, o + lo * k);
      }
      for (auto& th : pool) th.join();
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// LSH index: banding, candidates, verification
// ---------------------------------------------------------------------------------------

// A band's bucket key: Horner's rule over its rows' values in base GRAM_BASE, seeded with
// the band's number so equal values in different bands fall in different buckets.
inline u64 band_key(const u32* sig, int band, int rows) {
  u64 key = u64(band) + 1;
  for (int r = 0; r < rows; ++r) key = key * GRAM_BASE + sig[band * rows + r];
  return fmix64(key);
}

// u64 -> i64 hash table, open addressing with linear probing: one flat allocation
// instead of a node per entry (std::unordered_map spent most of the index's time in
// malloc). Keys are fmix64 outputs, so their low bits index it directly. Values are
// >= 0; -1 marks an empty cell.
class FlatTable {
 public:
  FlatTable() : keys_(1 << 12), vals_(1 << 12, -1), mask_((1 << 12) - 1) {}

  i64 get(u64 key) const {
    for (size_t i = key & mask_;; i = (i + 1) & mask_) {
      if (vals_[i] < 0) return -1;
      if (keys_[i] == key) return vals_[i];
    }
  }

  // The cell of `key` (-1 in it when new).
  i64& cell(u64 key) {
    if (2 * (size_ + 1) > vals_.size()) grow();
    size_t i = key & mask_;
    for (; vals_[i] >= 0; i = (i + 1) & mask_)
      if (keys_[i] == key) return vals_[i];
    ++size_;
    keys_[i] = key;
    return vals_[i];  // -1 until the caller stores a value
  }

 private:
  void grow() {
    std::vector<u64> keys(keys_.size() * 2);
    std::vector<i64> vals(vals_.size() * 2, -1);
    const size_t mask = vals.size() - 1;
    for (size_t j = 0; j < vals_.size(); ++j) {
      if (vals_[j] < 0) continue;
      size_t i = keys_[j] & mask;
      while (vals[i] >= 0) i = (i + 1) & mask;
      keys[i] = keys_[j];
      vals[i] = vals_[j];
    }
    keys_.swap(keys);
    vals_.swap(vals);
    mask_ = mask;
  }

  std::vector<u64> keys_;
  std::vector<i64> vals_;
  size_t mask_;
  size_t size_ = 0;
};

// Streaming near-duplicate index. Documents arrive in order; each is compared with the
// documents already kept that share at least one band bucket with it, and is a duplicate
// of the first of them (bucket order: band 0 first, then the most recently kept) whose
// signatures agree on at least `min_agree` of K positions (the Jaccard estimate >=
// threshold). A duplicate is not kept, so memory grows with the kept documents only:
// K * 4 bytes of signature plus `bands` bucket entries each.
//
// Clusters are therefore stars around a kept document, not union-find components: a
// chain A~B~C with J(A, C) below the threshold keeps C, and every removed record can
// name the one it duplicates. `union_find` below groups the chain, from verified pairs.
class LSHIndex {
 public:
  LSHIndex(int num_perm, int bands, int rows, int min_agree)
      : k_(num_perm), bands_(bands), rows_(rows), min_agree_(min_agree) {
    if (num_perm < 1 || bands < 1 || rows < 1 || bands * rows > num_perm)
      throw py::value_error("need bands * rows <= num_perm, all positive; got bands=" + std::to_string(bands) +
                            " rows=" + std::to_string(rows) + " num_perm=" + std::to_string(num_perm));
    if (min_agree < 0 || min_agree > num_perm)
      throw py::value_error("`min_agree` must be in [0, num_perm], got " + std::to_string(min_agree));
  }

  // For each row of `signatures` (n, K): -1 if it was kept, else the sequence number
  // (over every document ever added) of the kept document it duplicates.
  carray<i64> add(const py::array& sig_in) {
    auto sigs = checked<u32>(sig_in, "signatures");
    if (sigs.ndim() != 2 || sigs.shape(1) != k_)
      throw py::value_error("`signatures` must have shape (n, " + std::to_string(k_) + ")");
    const py::ssize_t n = sigs.shape(0);
    const u32* s = sigs.data();
    carray<i64> out(n);
    i64* o = out.mutable_data();
    {
      py::gil_scoped_release release;
      std::vector<u64> keys(bands_);
      for (py::ssize_t i = 0; i < n; ++i) {
        const u32* sig = s + i * k_;
        const i64 seq = seen_++;
        o[i] = -1;
        for (int band = 0; band < bands_ && o[i] < 0; ++band) {
          keys[band] = band_key(sig, band, rows_);
          for (i64 slot = heads_.get(keys[band]); slot >= 0; slot = next_[slot * bands_ + band]) {
            if (checked_by_[slot] == seq) continue;  // already compared through another band
            checked_by_[slot] = seq;
            if (agrees(sig, &sigs_[slot * k_])) {
              o[i] = seq_of_[slot];
              break;
            }
          }
        }
        if (o[i] >= 0) continue;  // else the loop visited every band: all keys are computed
        const i64 slot = static_cast<i64>(seq_of_.size());
        seq_of_.push_back(seq);
        checked_by_.push_back(-1);
        sigs_.insert(sigs_.end(), sig, sig + k_);
        for (int band = 0; band < bands_; ++band) {
          i64& head = heads_.cell(keys[band]);
          next_.push_back(head);  // -1 for a new bucket
          head = slot;
        }
      }
    }
    return out;
  }

  i64 seen() const { return seen_; }
  i64 kept() const { return static_cast<i64>(seq_of_.size()); }

 private:
  // Whether at least min_agree positions are equal; gives up once too many differ
  // (an unrelated candidate is usually refused within the first few dozen).
  bool agrees(const u32* x, const u32* y) const {
    int misses_left = k_ - min_agree_;
    for (int p = 0; p < k_; ++p)
      if (x[p] != y[p] && --misses_left < 0) return false;
    return true;
  }

  int k_, bands_, rows_, min_agree_;
  i64 seen_ = 0;
  FlatTable heads_;                                   // band key -> most recent slot (keys are seeded by band)
  std::vector<i64> next_;                            // slot * bands + band -> next slot in the bucket
  std::vector<u32> sigs_;                            // kept signatures, slot-major
  std::vector<i64> seq_of_;                          // slot -> sequence number
  std::vector<i64> checked_by_;                      // slot -> last document compared with it
};

// ---------------------------------------------------------------------------------------
// Clustering: union-find over verified near-duplicate pairs
// ---------------------------------------------------------------------------------------

// Union-find (disjoint sets) with path halving and union by size: near-linear in the
// pairs. Unlike the streaming LSHIndex (a record matches a KEPT one, so clusters are
// stars), this groups chains: A~B and B~C put A, B and C in one cluster.
class DisjointSets {
 public:
  explicit DisjointSets(i64 n) : parent_(n), size_(n, 1) { std::iota(parent_.begin(), parent_.end(), 0); }

  i64 find(i64 x) {
    while (parent_[x] != x) {
      parent_[x] = parent_[parent_[x]];  // path halving: every other node points to its grandparent
      x = parent_[x];
    }
    return x;
  }

  void unite(i64 x, i64 y) {
    x = find(x);
    y = find(y);
    if (x == y) return;
    if (size_[x] < size_[y]) std::swap(x, y);  // the smaller tree goes under the larger: depth O(log n)
    parent_[y] = x;
    size_[x] += size_[y];
  }

 private:
  std::vector<i64> parent_, size_;
};

// Cluster label of each of n items joined by the pairs (left[i], right[i]): the smallest
// item index in its connected component, i.e. the first seen, so labels do not depend on
// the pairs' order or on which root union-by-size picked. `out`: None, or the caller's
// C-contiguous int64 (n,) array, filled in place and returned.
py::array union_find(i64 n, const py::array& left_in, const py::array& right_in, const py::object& out_in) {
  if (n < 0) throw py::value_error("`n` must be >= 0, got " + std::to_string(n));
  auto left = checked<i64>(left_in, "left");
  auto right = checked<i64>(right_in, "right");
  if (left.ndim() != 1 || right.ndim() != 1 || left.size() != right.size())
    throw py::value_error("`left` and `right` must be 1-D and the same length");
  carray<i64> out = out_in.is_none() ? carray<i64>(n) : checked<i64>(out_in, "out");
  if (out.ndim() != 1 || out.size() != n)
    throw py::value_error("`out` must have shape (" + std::to_string(n) + ",)");
  if (!out.writeable()) throw py::value_error("`out` must be writeable");
  const i64* l = left.data();
  const i64* r = right.data();
  const py::ssize_t m = left.size();
  for (py::ssize_t i = 0; i < m; ++i)
    if (l[i] < 0 || l[i] >= n || r[i] < 0 || r[i] >= n)
      throw py::value_error("pair " + std::to_string(i) + ": (" + std::to_string(l[i]) + ", " + std::to_string(r[i]) +
                            ") is outside [0, " + std::to_string(n) + ")");
  i64* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    DisjointSets sets(n);
    for (py::ssize_t i = 0; i < m; ++i) sets.unite(l[i], r[i]);
    std::vector<i64> first(n, -1);  // root -> smallest member (items visited in rising order)
    for (i64 i = 0; i < n; ++i) {
      i64& f = first[sets.find(i)];
      if (f < 0) f = i;
      o[i] = f;
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// First-fit decreasing packing
// ---------------------------------------------------------------------------------------

// Row of each item: items longest first (ties in input order), each into the first row
// with room. A max-tree over the rows' free space finds that row in O(log n).
carray<i64> ffd_pack(const py::array& lengths_in, i64 capacity) {
  auto lengths = checked<i64>(lengths_in, "lengths");
  if (capacity < 1) throw py::value_error("`capacity` must be positive, got " + std::to_string(capacity));
  const i64* len = lengths.data();
  const py::ssize_t n = lengths.size();
  for (py::ssize_t i = 0; i < n; ++i) {
    if (len[i] < 0 || len[i] > capacity)
      throw py::value_error("item " + std::to_string(i) + ": length " + std::to_string(len[i]) +
                            " does not fit in capacity " + std::to_string(capacity));
  }
  carray<i64> out(n);
  i64* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<i64> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](i64 x, i64 y) { return len[x] > len[y]; });
    py::ssize_t size = 1;
    while (size < std::max<py::ssize_t>(n, 1)) size <<= 1;
    std::vector<i64> tree(2 * size, capacity);  // leaves: each row's free space
    i64 rows = 0;
    for (i64 item : order) {
      const i64 need = len[item];
      py::ssize_t node = 1;
      while (node < size) node = tree[2 * node] >= need ? 2 * node : 2 * node + 1;
      const i64 row = node - size;
      rows = std::max(rows, row + 1);
      o[item] = row;
      tree[node] -= need;
      for (node >>= 1; node >= 1; node >>= 1) tree[node] = std::max(tree[2 * node], tree[2 * node + 1]);
    }
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "MLForge kernels (C++17). Each has a numpy twin in reactor_core.data.kernels giving the same bits.";
  m.def("token_hashes", &token_hashes, py::arg("data"), py::arg("offsets"), py::arg("mode") = "word",
        "(hashes uint64, offsets int64): each document's word (or byte) hashes.");
  m.def("ngram_hashes", &ngram_hashes, py::arg("tokens"), py::arg("offsets"), py::arg("n"),
        "(grams uint64, offsets int64): hashes of each document's runs of n tokens.");
  m.def("first_hit", &first_hit, py::arg("grams"), py::arg("offsets"), py::arg("table"),
        "int64 per document: the position of its first n-gram in the sorted `table`, or -1.");
  m.def("minhash", &minhash, py::arg("grams"), py::arg("offsets"), py::arg("a"), py::arg("b"),
        py::arg("threads") = 1, py::arg("out") = py::none(),
        "(n_docs, K) uint32 MinHash signatures, datasketch's permutation formula; `threads` < 1: one per core; "
        "`out`: a uint32 (n_docs, K) array to fill in place.");
  m.def("union_find", &union_find, py::arg("n"), py::arg("left"), py::arg("right"), py::arg("out") = py::none(),
        "int64 cluster label of each of n items joined by the pairs: the smallest index in its component; "
        "`out`: an int64 (n,) array to fill in place.");
  m.def("ffd_pack", &ffd_pack, py::arg("lengths"), py::arg("capacity"),
        "int64 row of each item, first-fit decreasing.");
  py::class_<LSHIndex>(m, "LSHIndex")
      .def(py::init<int, int, int, int>(), py::arg("num_perm"), py::arg("bands"), py::arg("rows"),
           py::arg("min_agree"))
      .def("add", &LSHIndex::add, py::arg("signatures"),
           "int64 per row: -1 if kept, else the sequence number of the kept document it duplicates.")
      .def_property_readonly("seen", &LSHIndex::seen)
      .def_property_readonly("kept", &LSHIndex::kept);
}
