"""The data pipeline (issue #25): kernels on both backends, `reactor data` end to end.

Both backends run wherever MLForge is installed and must agree bit for bit; the numpy
backend alone is checked against planted answers, so a machine without MLForge still
tests what it runs.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from reactor_core.cli import app
from reactor_core.data import kernels, pipeline
from reactor_core.data.dedup import (Deduplicator, bands_rows, lsh_params, pack_texts, permutations, shingles,
                                     signatures)
from reactor_core.data.native import backend
from reactor_core.data.pipeline import clean, clean_batch
from reactor_core.data.pipeline_config import DedupConfig, PipelineConfig
from reactor_core.data.sources import SourceLine

EVAL_SUITE = Path(__file__).parents[2] / "jarvis-prime/src/jarvis_prime/eval_data/jarvis_suite.json"
WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact be have do say get make go know take see come think look "
         "want give use find tell ask seem feel try leave call good new first last long great little own other old "
         "right big high different small large next early young important few public bad same able").split()

BACKENDS = ["python", pytest.param("native", marks=pytest.mark.skipif(
    importlib.util.find_spec("mlforge") is None, reason="MLForge is not installed"))]


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def chat(user: str, reply: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


def near_copy(rng: random.Random, text: str) -> str:
    """`text` capitalised, punctuated and one word longer: word-3-gram Jaccard ~0.98
    with the original (a copy LSH at threshold 0.8 misses with probability ~1e-6)."""
    return text.capitalize().replace(" ", ", ", 1) + " " + rng.choice(WORDS) + "."


def corpus(seed: int, n: int) -> tuple[list[dict], dict[int, int]]:
    """n records; every 10th is a near copy of one of the 8 before it (planted: its
    index -> the original's)."""
    rng = random.Random(seed)
    records, planted = [], {}
    for i in range(n):
        if i % 10 == 9:
            j = rng.randrange(i - 9, i - 1)
            reply = near_copy(rng, records[j]["messages"][1]["content"])
            records.append(chat(records[j]["messages"][0]["content"], reply))
            planted[i] = j
        else:
            records.append(chat(f"question {i}: {sentence(rng, 8)}", sentence(rng, 60)))
    return records, planted


def write_jsonl(path: Path, records: list, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


# --------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------


def test_native_and_python_kernels_agree_bit_for_bit():
    mlforge = pytest.importorskip("mlforge")
    rng = random.Random(3)
    texts = ["", "!!!", "Hello, wörld — 42x  foo_bar", "a", "日本語 テキスト"] + \
            [sentence(rng, rng.randrange(0, 40)) for _ in range(300)]
    data, offsets = pack_texts(texts)
    for mode in ("word", "byte"):
        ours, theirs = kernels.token_hashes(data, offsets, mode), mlforge.token_hashes(data, offsets, mode)
        assert all(np.array_equal(x, y) for x, y in zip(ours, theirs)), mode
    tokens, token_offsets = mlforge.token_hashes(data, offsets, "word")
    for n in (1, 3, 8):
        ours, theirs = kernels.ngram_hashes(tokens, token_offsets, n), mlforge.ngram_hashes(tokens, token_offsets, n)
        assert all(np.array_equal(x, y) for x, y in zip(ours, theirs)), n
    grams, gram_offsets = mlforge.ngram_hashes(tokens, token_offsets, 3)
    a, b = permutations(128, 1)
    sig_py, sig_c = kernels.minhash(grams, gram_offsets, a, b), mlforge.minhash(grams, gram_offsets, a, b)
    assert np.array_equal(sig_py, sig_c)
    table = np.sort(grams[::7])
    assert np.array_equal(kernels.first_hit(grams, gram_offsets, table), mlforge.first_hit(grams, gram_offsets, table))
    # the index: the same verdicts, fed in uneven batches, on a corpus with planted near copies
    records, _ = corpus(5, 400)
    sigs = signatures(["\n".join(m["content"] for m in r["messages"]) for r in records], DedupConfig(), mlforge)
    bands, rows = lsh_params(0.8, 128)
    py_index, c_index = kernels.LSHIndex(128, bands, rows, 103), mlforge.LSHIndex(128, bands, rows, 103)
    cuts = [0, 1, 57, 200, 400]
    py = np.concatenate([py_index.add(sigs[lo:hi]) for lo, hi in zip(cuts, cuts[1:])])
    c = np.concatenate([c_index.add(sigs[lo:hi]) for lo, hi in zip(cuts, cuts[1:])])
    assert np.array_equal(py, c) and (py >= 0).sum() == 40
    lengths = np.array([rng.randrange(1, 300) for _ in range(2000)], dtype=np.int64)
    assert np.array_equal(kernels.ffd_pack(lengths, 512), mlforge.ffd_pack(lengths, 512))


@pytest.mark.parametrize("name", BACKENDS)
def test_signatures_estimate_jaccard_and_the_index_finds_the_planted_copies(name):
    k = backend(name)
    rng = random.Random(1)
    base = sentence(rng, 200)
    words = base.split()
    config = DedupConfig(ngram=1, num_perm=256)
    # word sets with a known Jaccard: the same 200 words, 0..100 of them replaced by unseen ones
    for replaced in (0, 20, 60, 100):
        other = words[replaced:] + [f"new{i}" for i in range(replaced)]
        x, y = set(words), set(other)
        truth = len(x & y) / len(x | y)
        sig = signatures([base, " ".join(other)], config, k)
        estimate = float(np.mean(sig[0] == sig[1]))
        assert abs(estimate - truth) <= 4 * np.sqrt(max(truth * (1 - truth), 1e-4) / 256), (replaced, estimate, truth)
    records, planted = corpus(2, 300)
    dedup = Deduplicator(DedupConfig(exact=False), k)
    texts = ["\n".join(m["content"] for m in r["messages"]) for r in records]
    verdicts = dedup.add([f"f:{i}" for i in range(300)], list(range(300)), signatures(texts, DedupConfig(), k))
    found = {i: int(v.duplicate_of[2:]) for i, v in enumerate(verdicts) if v is not None}
    assert found == planted


def test_lsh_parameters_are_datasketchs_leaning_to_recall():
    from datasketch.lsh import _optimal_param

    for threshold in (0.5, 0.8, 0.9):
        assert lsh_params(threshold, 128, 0.5) == _optimal_param(threshold, 128, 0.5, 0.5)
        assert lsh_params(threshold, 128) == _optimal_param(threshold, 128, 0.1, 0.9)
    assert lsh_params(0.8, 128) == (14, 9)
    assert bands_rows(DedupConfig(bands=4, rows=8)) == (4, 8)
    with pytest.raises(ValueError, match="bands"):
        DedupConfig(bands=20, rows=8)


def test_shingles_ignore_case_punctuation_and_spacing():
    same = ["Hello, World!  How are you?", "hello world how are you"]
    grams, offsets = shingles(same, "word", 3, backend("python"))
    assert np.array_equal(grams[offsets[0]:offsets[1]], grams[offsets[1]:offsets[2]])


# --------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict]:
    """A folder of a .jsonl.gz and a .jsonl.zst shard, an Arrow dataset, and what is in them."""
    zstandard = pytest.importorskip("zstandard")
    datasets = pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("shards")
    records, planted = corpus(7, 120)
    shard = root / "shards"
    shard.mkdir()
    lines = [json.dumps(r) for r in records[:60]]
    lines.insert(4, '{"messages": [')                                        # gz line 5: bad JSON
    lines.insert(9, json.dumps({"messages": [{"role": "robot", "content": "beep"}]}))  # gz line 10: unknown role
    lines.insert(12, "")                                                     # blank: skipped silently
    write_jsonl(shard / "a.jsonl.gz", lines, gzip.open)
    with open(shard / "b.jsonl.zst", "wb") as raw, zstandard.ZstdCompressor().stream_writer(raw) as f:
        for r in records[60:100]:
            f.write((json.dumps(r) + "\n").encode())
        f.write((json.dumps(records[2]) + "\n").encode())                  # zst line 41: exact copy of a gz record
        f.write((json.dumps(chat("Who are you?", "I am JARVIS, call me at +1 415-555-0132.")) + "\n").encode())
    datasets.Dataset.from_list(records[100:]).save_to_disk(str(root / "arrow"))
    return root, {"records": records, "planted": planted}


def run_cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def test_clean_end_to_end_over_gz_zst_shards_and_arrow(shards, tmp_path):
    root, truth = shards
    out = tmp_path / "clean.jsonl"
    run_cli("data", "clean", str(root / "shards"), str(root / "arrow"), "--output", str(out),
            "--decontaminate", str(EVAL_SUITE))
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    report = [json.loads(line) for line in (tmp_path / "clean.report.jsonl").read_text().splitlines()]
    summary = json.loads((tmp_path / "clean.summary.json").read_text())
    by_kind: dict[str, list[dict]] = {}
    for r in report:
        by_kind.setdefault(r["kind"], []).append(r)
    gz, zst = str(root / "shards" / "a.jsonl.gz"), str(root / "shards" / "b.jsonl.zst")
    assert [r["source"] for r in by_kind["bad_json"]] == [f"{gz}:5"]
    assert [r["source"] for r in by_kind["unknown_role"]] == [f"{gz}:10"]
    assert by_kind["exact_duplicate"] == [{"source": f"{zst}:41", "kind": "exact_duplicate",
                                           "reason": f"repeats {gz}:3", "duplicate_of": f"{gz}:3"}]
    assert [r["source"] for r in by_kind["contaminated"]] == [f"{zst}:42"]  # "Who are you?" is in the suite
    # every planted near copy is removed and names its original, across the three files
    n_planted = len(truth["planted"])
    assert len(by_kind["near_duplicate"]) == n_planted
    assert len(kept) == 120 - n_planted
    assert summary["read"] == 124 and summary["kept"] == len(kept)
    assert summary["removed"] == {"bad_json": 1, "unknown_role": 1, "exact_duplicate": 1, "contaminated": 1,
                                  "near_duplicate": n_planted}
    assert [i["path"] for i in summary["inputs"]] == [gz, zst] + sorted(
        str(p) for p in (root / "arrow").glob("*.arrow"))
    assert all(len(i["sha256"]) == 64 for i in summary["inputs"])
    # the rest, in input order, exactly as written
    assert kept == [r for i, r in enumerate(truth["records"]) if i not in truth["planted"]]


@pytest.mark.parametrize("name", BACKENDS)
def test_backends_and_worker_processes_write_the_same_files(shards, tmp_path, name):
    root, _ = shards
    inputs = [root / "shards", root / "arrow"]
    clean(inputs, tmp_path / "one.jsonl", PipelineConfig(backend=name, batch_size=16))
    clean(inputs, tmp_path / "two.jsonl.gz", PipelineConfig(backend=name, batch_size=16, workers=2))
    reference = tmp_path / "ref.jsonl"
    clean(inputs, reference, PipelineConfig(backend="python", batch_size=50))
    assert (tmp_path / "one.jsonl").read_bytes() == gzip.open(tmp_path / "two.jsonl.gz").read() == reference.read_bytes()
    assert (tmp_path / "one.report.jsonl").read_bytes() == (tmp_path / "two.report.jsonl").read_bytes()


def test_the_datasets_map_example_keeps_what_reactor_data_clean_keeps(shards, tmp_path):
    import importlib.util as iu

    datasets = pytest.importorskip("datasets")
    spec = iu.spec_from_file_location("clean_with_datasets", Path(__file__).parents[1] / "examples/clean_with_datasets.py")
    example = iu.module_from_spec(spec)
    spec.loader.exec_module(example)
    root, truth = shards
    records = truth["records"] + [truth["records"][5], chat("Who are you?", "I am JARVIS.")]
    config = PipelineConfig(decontaminate={"paths": [str(EVAL_SUITE)]})
    rows = list(example.clean_dataset(datasets.Dataset.from_list(records), config, "mem"))
    clean([write_jsonl(tmp_path / "all.jsonl", records)], tmp_path / "out.jsonl", config)
    expected = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [record for _, record, _ in rows if record is not None] == expected
    assert rows[-2][2] == "exact_duplicate" and rows[-1][2] == "contaminated"


def test_the_pipeline_streams_and_never_holds_the_corpus(monkeypatch):
    """An endless generator of records: the run must account for the first batch after
    reading a bounded number of lines, whatever follows."""
    rng = random.Random(0)
    pulled = 0

    def endless(_files):
        nonlocal pulled
        while True:
            pulled += 1
            yield SourceLine("gen.jsonl", pulled, json.dumps(chat("q", sentence(rng, 30))).encode())

    class Enough(Exception):
        pass

    def stop(summary):
        assert summary.read == 64 and pulled <= 64 + 1
        raise Enough

    monkeypatch.setattr(pipeline, "iter_lines", endless)
    monkeypatch.setattr(pipeline, "data_files", lambda inputs: [])
    with pytest.raises(Enough):
        clean(["gen.jsonl"], None, PipelineConfig(batch_size=64), on_batch=stop)


def test_filters_and_pii_scrub():
    rng = random.Random(4)
    loop = "I will check that for you. " * 10
    lines = [SourceLine("x.jsonl", i + 1, json.dumps(r).encode()) for i, r in enumerate([
        chat("hi", loop),                                                    # repetitive
        chat("long " * 60, "ok"),                                            # too long
        chat("mail", "write to jane.doe@example.org or 4111 1111 1111 1111 (not 4111 1111 1111 1112), "
                     "server 10.0.0.1, key sk-abcdefghijklmnop1234, call +1 415-555-0132, v2.10.15 on 2024-01-15"),
        {"prompt": "p", "chosen": "c", "rejected": "r"},                     # not chat: no messages
        chat("q", sentence(rng, 10)),
    ])]
    result = clean_batch(lines, PipelineConfig(filters={"max_chars": 300}))
    assert [(r.source, r.kind) for r in result.removed] == [("x.jsonl:1", "repetitive"), ("x.jsonl:2", "too_long"),
                                                            ("x.jsonl:4", "bad_format")]
    scrubbed = json.loads(result.lines[0])
    assert scrubbed["messages"][1]["content"] == ("write to [EMAIL] or [CARD] (not 4111 1111 1111 1112), server [IP], "
                                                  "key [SECRET], call [PHONE], v2.10.15 on 2024-01-15")
    assert result.pii == {"email": 1, "card": 1, "ip": 1, "secret": 1, "phone": 1}
    prefs = clean_batch([SourceLine("p.jsonl", 1, json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}).encode())],
                        PipelineConfig(kind="preference"))
    assert prefs.sources == ["p.jsonl:1"] and not prefs.removed


def test_the_same_question_about_different_images_is_no_duplicate(tmp_path):
    from reactor_testing import png_bytes

    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(png_bytes(i if i < 2 else 0))
    records = [{"messages": [{"role": "user", "content": [{"type": "image", "path": f"{i}.png"},
                                                          {"type": "text", "text": "What colour is the square?"}]},
                             {"role": "assistant", "content": "It is red."}]} for i in range(3)]
    summary = clean([write_jsonl(tmp_path / "v.jsonl", records)], tmp_path / "out.jsonl")
    assert summary.kept == 2 and summary.removed == {"exact_duplicate": 1}  # 2.png has 0.png's bytes


def test_cli_errors_name_the_file_and_the_field(tmp_path):
    result = CliRunner().invoke(app, ["data", "clean", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o.jsonl")])
    assert result.exit_code == 1 and "missing.jsonl: no such file or folder" in result.output
    bad = tmp_path / "pipeline.yaml"
    bad.write_text("dedup:\n  threshold: 1.5\n")
    data = write_jsonl(tmp_path / "d.jsonl", [chat("q", "a")])
    result = CliRunner().invoke(app, ["data", "clean", str(data), "-o", str(tmp_path / "o.jsonl"), "--config", str(bad)])
    assert result.exit_code != 0 and "dedup.threshold" in result.output and "pipeline.yaml" in result.output
    result = run_cli("data", "inspect", str(data), "--json")
    assert json.loads(result.output)["kept"] == 1


def test_pack_writes_rows_that_never_exceed_the_length(tmp_path, tiny_llama_dir):
    rng = random.Random(6)
    data = write_jsonl(tmp_path / "d.jsonl", [chat(sentence(rng, 5), sentence(rng, rng.randrange(3, 60)))
                                              for _ in range(40)] + ["{oops"])
    result = run_cli("data", "pack", str(data), "--tokenizer", str(tiny_llama_dir), "--max-seq-length", "256",
                     "--window", "16", "--output", str(tmp_path / "rows.jsonl.gz"))
    rows = [json.loads(line) for line in gzip.open(tmp_path / "rows.jsonl.gz", "rt")]
    assert f"40 examples -> {len(rows)} rows of 256 tokens" in result.output and "1 skipped" in result.output
    assert sorted(s for r in rows for s in r["sources"]) == sorted(f"{data}:{i}" for i in range(1, 41))
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) <= 256
        assert row["position_ids"].count(0) == len(row["sources"])
    # first-fit decreasing within each window of 16: no two rows of a window could have been one
    assert len(rows) < 40
    histogram = json.loads(run_cli("data", "inspect", str(data), "--tokenizer", str(tiny_llama_dir), "--json").output)
    assert sum(histogram["tokens_histogram"].values()) == 40 and histogram["read"] == 41


# --------------------------------------------------------------------------------------
# A recipe's data_pipeline
# --------------------------------------------------------------------------------------


def test_a_recipe_cleans_its_data_and_the_lineage_says_how(tiny_llama_dir, tmp_path):
    import hashlib

    from reactor_core import Trainer
    from reactor_core.training.config import ConfigError, load_config

    from reactor_testing import config_for, write_chat_data

    data = write_chat_data(tmp_path / "train.jsonl", n=24)
    with open(data, "a") as f:
        f.write(data.read_text().splitlines()[0] + "\n")                     # line 25: exact copy of line 1
        f.write(json.dumps(chat("Who are you?", "I am JARVIS.")) + "\n")     # line 26: in the eval suite
    pipeline_config = {"decontaminate": {"paths": [str(EVAL_SUITE)]}}
    config = config_for(tiny_llama_dir, tmp_path / "out", max_steps=2, num_samples=0, data_pipeline=pipeline_config)
    result = Trainer(config, progress=False).train(data)
    manifest = json.loads((result.model_dir / "prime.json").read_text())
    entry = manifest["lineage"]["data"][0]
    cleaned = tmp_path / "out/data/train.clean.jsonl"
    assert entry["path"] == str(cleaned) and entry["sha256"] == hashlib.sha256(cleaned.read_bytes()).hexdigest()
    assert entry["examples"] == 24
    assert entry["pipeline"]["inputs"] == [{"path": str(data), "sha256": hashlib.sha256(data.read_bytes()).hexdigest()}]
    assert entry["pipeline"]["removed"] == {"exact_duplicate": 1, "contaminated": 1}
    assert entry["pipeline"]["config"]["decontaminate"]["paths"] == [str(EVAL_SUITE)]
    assert manifest["lineage"]["training_config"]["data_pipeline"]["dedup"]["threshold"] == 0.8
    # a pipeline that cannot fit the method fails when the recipe loads, naming the key
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(f"model_name: {tiny_llama_dir}\nmethod: dpo\ndata_pipeline:\n  kind: chat\n")
    with pytest.raises(ConfigError, match="data_pipeline.kind` must be 'preference' for `method: dpo`"):
        load_config(recipe)
    recipe.write_text(f"model_name: {tiny_llama_dir}\ndata_pipeline:\n  dedup:\n    treshold: 0.5\n")
    with pytest.raises(ConfigError, match="treshold"):
        load_config(recipe)
