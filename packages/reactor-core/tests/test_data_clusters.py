"""Near-duplicate clusters (issue #25): union-find over LSH pairs verified at the threshold.

The streaming default compares a record with KEPT records only, so a chain A~B~C whose
ends are not similar keeps C; `near_mode: cluster` groups the whole chain, and
`reactor data inspect` reports the clusters in either mode.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from reactor_core.cli import app
from reactor_core.data import kernels
from reactor_core.data.dedup import Deduplicator, near_pairs, permutations, signatures
from reactor_core.data.kernels import band_keys
from reactor_core.data.native import backend
from reactor_core.data.pipeline import clean
from reactor_core.data.pipeline_config import DedupConfig, PipelineConfig

BACKENDS = ["python", pytest.param("native", marks=pytest.mark.skipif(
    importlib.util.find_spec("mlforge") is None, reason="MLForge is not installed"))]

# Word shingles (ngram 1) over numbered words, so true Jaccards are known; 512
# permutations put each estimate within ~4 standard deviations of its truth.
CHAIN = DedupConfig(threshold=0.75, num_perm=512, ngram=1)


def words(lo: int, hi: int, prefix: str = "w") -> str:
    return " ".join(f"{prefix}{i}" for i in range(lo, hi))


def jaccard(x: str, y: str) -> float:
    a, b = set(x.split()), set(y.split())
    return len(a & b) / len(a | b)


# A~B and B~C above the threshold, A~C below it: a chain.
A, B, C = words(0, 100), words(10, 110), words(20, 120)


def chat(user: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "noted"}]}


@pytest.mark.parametrize("n, edges, labels", [
    (6, [(0, 1), (1, 2), (2, 3), (3, 4)], [0, 0, 0, 0, 0, 5]),   # a chain
    (7, [(6, 4), (4, 2), (4, 5)], [0, 1, 2, 3, 2, 2, 2]),         # a star around 4, led by its first member 2
    (4, [(1, 1), (3, 1), (1, 3)], [0, 1, 2, 1]),                  # self and repeated pairs
    (2, [], [0, 1]),
])
@pytest.mark.parametrize("name", BACKENDS)
def test_union_find_known_answers(name, n, edges, labels):
    left = np.array([e[0] for e in edges], dtype=np.int64)
    right = np.array([e[1] for e in edges], dtype=np.int64)
    assert backend(name).union_find(n, left, right).tolist() == labels


def test_union_find_backends_give_the_same_labels():
    mlforge = pytest.importorskip("mlforge")
    rng = np.random.default_rng(9)
    for n, m in ((1, 0), (50, 10), (2000, 1500), (2000, 6000)):  # sparse (many clusters) to one giant
        left, right = rng.integers(0, n, m, dtype=np.int64), rng.integers(0, n, m, dtype=np.int64)
        out = np.empty(n, dtype=np.int64)
        ours = kernels.union_find(n, left, right, out=out)
        assert np.shares_memory(ours, out)
        assert np.array_equal(ours, mlforge.union_find(n, left, right)), (n, m)
    chain = np.arange(999, dtype=np.int64)  # a path 0-1-...-999 given back to front: a long diameter
    assert set(kernels.union_find(1000, chain[::-1].copy(), chain[::-1] + 1).tolist()) == {0}
    with pytest.raises(ValueError, match=r"pair 0: \(0, 3\) is outside \[0, 3\)"):
        kernels.union_find(3, np.array([0], dtype=np.int64), np.array([3], dtype=np.int64))
    with pytest.raises(TypeError, match="`out` must be a C-contiguous numpy array of int64"):
        kernels.union_find(3, chain[:0], chain[:0], out=np.zeros(3, dtype=np.int32))


def test_near_pairs_are_every_shared_bucket_pair_that_passes_the_check():
    rng = random.Random(4)
    base = [" ".join(f"t{rng.randrange(400)}" for _ in range(60)) for _ in range(120)]
    texts = base + [" ".join(t.split()[:-3]) for t in base[:40]]  # 40 near copies of the first 40
    config = DedupConfig(ngram=1)
    sigs = signatures(texts, config, kernels)
    bands, rows = 14, 9
    left, right = near_pairs(sigs, bands, rows, config.min_agree)
    keys = band_keys(sigs, bands, rows)
    expected = [(i, j) for i in range(len(sigs)) for j in range(i + 1, len(sigs))
                if (keys[i] == keys[j]).any() and (sigs[i] == sigs[j]).sum() >= config.min_agree]
    assert list(zip(left.tolist(), right.tolist())) == expected
    assert {(i, 120 + i) for i in range(40)} <= set(expected)


@pytest.mark.parametrize("name", BACKENDS)
def test_cluster_mode_groups_a_chain_that_streaming_keeps_apart(name, tmp_path):
    assert jaccard(A, B) > CHAIN.threshold and jaccard(B, C) > CHAIN.threshold > jaccard(A, C)
    data = tmp_path / "chain.jsonl"
    records = [chat(A), chat(words(0, 100, "x")), chat(B), chat(words(0, 100, "y")), chat(C)]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))

    def run(mode: str) -> tuple[list[dict], list[dict]]:
        out = tmp_path / f"{mode}.jsonl"
        dedup = CHAIN.model_copy(update={"near_mode": mode})
        summary = clean([data], out, PipelineConfig(dedup=dedup, backend=name, batch_size=2))
        kept = [json.loads(line) for line in out.read_text().splitlines()]
        report = [json.loads(line) for line in (tmp_path / f"{mode}.report.jsonl").read_text().splitlines()]
        assert summary.kept == len(kept) and summary.removed == {"near_duplicate": len(report)}
        return kept, report

    kept, report = run("stream")  # B repeats A; C is compared with A only, and kept
    assert kept == [records[i] for i in (0, 1, 3, 4)]
    assert [(r["source"], r["duplicate_of"]) for r in report] == [(f"{data}:3", f"{data}:1")]
    kept, report = run("cluster")  # A, B, C are one cluster; A, its first, stays
    assert kept == [records[i] for i in (0, 1, 3)]
    assert [(r["source"], r["duplicate_of"]) for r in report] == [(f"{data}:3", f"{data}:1"),
                                                                  (f"{data}:5", f"{data}:1")]


def test_inspect_reports_clusters_with_sizes_and_members(tmp_path):
    data = tmp_path / "d.jsonl"
    star = [words(0, 100, "s")] + [words(0, 100, "s").replace(f"s{k} ", f"z{k} ") for k in (10, 20, 30)]
    records = [chat(A), chat(star[0]), chat(B), chat(words(0, 100, "x")), chat(C), *map(chat, star[1:]),
               chat(A)]  # the last: an exact duplicate, which never reaches the clusters
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = _yaml(tmp_path, CHAIN)
    result = CliRunner().invoke(app, ["data", "inspect", str(data), "--json", "--config", str(config)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["near_duplicate_clusters"] == {
        "count": 2, "records": 7, "largest": [4, 3],
        "samples": [[f"{data}:2", f"{data}:6", f"{data}:7"], [f"{data}:1", f"{data}:3", f"{data}:5"]]}
    # the streaming counts are unchanged by the report: B and the star's spokes repeat kept records, C does not
    assert summary["removed"] == {"exact_duplicate": 1, "near_duplicate": 4}
    table = CliRunner().invoke(app, ["data", "inspect", str(data), "--config", str(config)])
    assert "near-duplicate clusters" in table.output and f"cluster: {data}:2, {data}:6, {data}:7" in table.output


def _yaml(tmp_path: Path, dedup: DedupConfig) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(json.dumps({"dedup": {"ngram": dedup.ngram, "num_perm": dedup.num_perm,
                                          "threshold": dedup.threshold}}))
    return path


def test_the_cli_takes_the_near_dup_mode_and_refuses_an_unknown_one(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(chat(t)) + "\n" for t in (A, B, C)))
    result = CliRunner().invoke(app, ["data", "clean", str(data), "-o", str(tmp_path / "o.jsonl"), "--json",
                                      "--near-dup-mode", "cluster", "--config", str(_yaml(tmp_path, CHAIN))])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["kept"] == 1
    bad = CliRunner().invoke(app, ["data", "clean", str(data), "-o", str(tmp_path / "o.jsonl"),
                                   "--near-dup-mode", "components"])
    assert bad.exit_code != 0 and "dedup.near_mode" in bad.output


def test_deduplicator_holds_no_signatures_when_streaming():
    config = DedupConfig()
    dedup = Deduplicator(config, kernels)
    sigs = signatures([A, B], config, kernels)
    dedup.add(["f:1", "f:2"], [1, 2], sigs)
    assert dedup.collected == [] and dedup.clusters() is None


@pytest.mark.parametrize("name", BACKENDS)
def test_minhash_out_is_filled_in_place_by_both_backends(name):
    k = backend(name)
    grams, offsets = np.arange(1, 301, dtype=np.uint64), np.array([0, 0, 120, 300], dtype=np.int64)
    a, b = permutations(32, 1)
    out = np.zeros((3, 32), dtype=np.uint32)
    got = k.minhash(grams, offsets, a, b, out=out)
    assert np.shares_memory(got, out) and np.array_equal(out, kernels.minhash(grams, offsets, a, b))
    assert (out[0] == 0xFFFFFFFF).all() and not (out[1:] == 0xFFFFFFFF).all()
    with pytest.raises(TypeError, match="`out` must be a C-contiguous numpy array of uint32"):
        k.minhash(grams, offsets, a, b, out=np.zeros((32, 3), dtype=np.uint32).T)


def test_an_mlforge_without_union_find_is_refused_by_name(monkeypatch):
    """An MLForge built before clustering (0.1) must not fail halfway through a run."""
    import sys
    import types

    old = types.ModuleType("mlforge")
    old.__version__ = "0.1.0"
    for name in ("token_hashes", "ngram_hashes", "first_hit", "minhash", "LSHIndex", "ffd_pack"):
        setattr(old, name, getattr(kernels, name))
    monkeypatch.setitem(sys.modules, "mlforge", old)
    for name in ("auto", "native"):
        with pytest.raises(ImportError, match="MLForge 0.1.0 lacks union_find: reinstall it from packages/mlforge"):
            backend(name)
    assert backend("python") is kernels
