"""benchmarks/vision.py runs end to end on the tiny vision model (tiny_vision.py): two
questions from the synthetic VQA data, every engine (PrimeModel on llama.cpp,
llama-cpp-python's own MTMD handler, PrimeModel on transformers) answers, and the JSON
has the shape the real run (prime-135m-vision-v1) will be read from. No timing is asserted:
numbers come from the benchmark, on a quiet machine."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from tiny_vision import tiny_vision

from jarvis_prime.recipes.vision_data import build_vision_dataset

BENCHMARK = Path(__file__).resolve().parents[3] / "benchmarks" / "vision.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("vision_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being made
    spec.loader.exec_module(module)
    return module


def test_the_vision_benchmark_runs_every_engine_and_writes_its_json(tmp_path_factory, tmp_path):
    model = tiny_vision(tmp_path_factory).prime_dir
    build_vision_dataset(tmp_path / "vqa", train=0, heldout=2, log=lambda _: None)
    out = tmp_path / "vision.json"
    bench = load_benchmark()
    result = bench.main([str(model), "--data", str(tmp_path / "vqa" / "heldout.jsonl"), "-n", "2",
                         "--quants", "f16", "f32", "--max-new-tokens", "4", "--repeats", "1", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))
    assert written["questions"] == 2 and written["repeats"] == 1 and written["model"] == "tiny-vision"
    rows = {(r["quantization"], r["engine"]): r for r in written["rows"]}
    assert set(rows) == {("f16", bench.PRIME_LLAMA), ("f16", bench.RAW_LLAMA), ("f32", bench.PRIME_HF)}
    for row in rows.values():
        assert len(row["cases"]) == 2
        assert all(c["answer_s"] >= c["ttft_s"] > 0 and c["image_encode_s"] > 0 for c in row["cases"])
        assert 0 <= row["accuracy"] <= 1 and set(row["by_category"]) <= {"colour", "shape", "count", "side", "number"}
        assert all(isinstance(c["reply"], str) for c in row["cases"])
    # Each engine answered (a random model's greedy reply may be short, never absent), and the
    # two llama.cpp engines did the same work: same files, same prompt, same greedy tokens.
    assert any(c["reply"] for r in rows.values() for c in r["cases"])
    prime, raw = rows["f16", bench.PRIME_LLAMA], rows["f16", bench.RAW_LLAMA]
    assert [c["reply"] for c in prime["cases"]] == [c["reply"] for c in raw["cases"]]
    assert set(written["speed_ratios"]) == {"f16"} and written["speed_ratios"]["f16"]["answer"] > 0
    # Agreement with transformers, question by question: the two llama.cpp engines agree with it
    # equally (same replies), and the count is the replies that match, whatever they are.
    agreed = written["agreement"]
    assert set(agreed) == {f"f16 {bench.PRIME_LLAMA}", f"f16 {bench.RAW_LLAMA}"}
    reference = [c["reply"] for c in rows["f32", bench.PRIME_HF]["cases"]]
    expected = sum(c["reply"] == r for c, r in zip(prime["cases"], reference))
    assert agreed[f"f16 {bench.PRIME_LLAMA}"] == agreed[f"f16 {bench.RAW_LLAMA}"] == {"same": expected, "of": 2}
    assert bench.agreement([r for r in written["rows"] if r["engine"] != bench.PRIME_HF]) == {}


def test_agreement_counts_replies_identical_to_transformers_question_by_question():
    bench = load_benchmark()
    row = lambda engine, quant, replies: {"engine": engine, "quantization": quant,  # noqa: E731
                                          "cases": [{"reply": r} for r in replies]}
    rows = [row(bench.PRIME_LLAMA, "q8_0", ["red", "3", "left"]), row(bench.RAW_LLAMA, "q4_k_m", ["red", "left", "3"]),
            row(bench.PRIME_HF, "f32", ["red", "3", "right"])]
    assert bench.agreement(rows) == {f"q8_0 {bench.PRIME_LLAMA}": {"same": 2, "of": 3},
                                     f"q4_k_m {bench.RAW_LLAMA}": {"same": 1, "of": 3}}  # same replies, other order: 1
