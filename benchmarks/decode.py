"""Decode speed of PrimeModel on both backends beside the raw libraries, in one run.

    python benchmarks/decode.py [--max-new-tokens 128] [--repeats 3]

Same model (the embedded SmolLM2-135M-Instruct), same chat prompt, greedy decoding,
same number of new tokens. Rows:
  raw llama-cpp-python      Llama.create_completion on the model's GGUF
  PrimeModel llamacpp       PrimeModel.from_pretrained(..., backend="llamacpp")
  raw transformers          AutoModelForCausalLM.generate, float32
  PrimeModel transformers   PrimeModel.from_pretrained(..., backend="transformers")
and the wall time of `jarvis chat --once` with the model already pulled.
Targets (issue 2): llamacpp >= 0.95x raw llama-cpp-python and >= 3x transformers
float32; `jarvis chat --once` <= 3 s. Writes benchmarks/results/decode.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from rich.console import Console
from rich.table import Table

from jarvis_prime.hardware import cpu_name

MODEL = "smollm2-135m-instruct"
MESSAGES = [
    {"role": "system", "content": "You are JARVIS, a helpful AI assistant."},
    {"role": "user", "content": "Write a long story about a robot who learns to paint."},
]
RESULTS = Path(__file__).parent / "results" / "decode.json"


def measure(runs: dict[str, Callable[[], int]], repeats: int, console: Console) -> dict[str, dict]:
    """Median tokens/s per engine; run() returns tokens made.

    Engines take turns (round robin) after one warm-up each, so background noise on a
    2-core machine spreads over all of them instead of favouring whichever ran first.
    """
    for name, run in runs.items():
        console.print(f"warm-up {name} ...")
        run()
    rates: dict[str, list[float]] = {name: [] for name in runs}
    tokens: dict[str, list[int]] = {name: [] for name in runs}
    for i in range(repeats):
        console.print(f"round {i + 1}/{repeats}")
        for name, run in runs.items():
            start = time.perf_counter()
            made = run()
            rates[name].append(made / (time.perf_counter() - start))
            tokens[name].append(made)
    return {
        name: {"tokens_per_s": statistics.median(rates[name]), "new_tokens": statistics.median(tokens[name]), "runs": rates[name]}
        for name in runs
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n = args.max_new_tokens
    console = Console()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jarvis_prime import PrimeModel
    from jarvis_prime.models.llamacpp import open_llama
    from jarvis_prime.store import resolve

    local = resolve(MODEL)
    prime_llama = PrimeModel.from_pretrained(MODEL, backend="llamacpp")
    prime_hf = PrimeModel.from_pretrained(MODEL, backend="transformers")
    prompt = prime_llama.apply_chat_template(MESSAGES)

    # llama_cpp.Llama itself; open_llama only keeps llama.cpp's AMX repacking (it segfaults) off
    raw_llama = open_llama(local.path / prime_llama.runtime.weights, n_ctx=prime_llama.context_length,
                           n_threads=os.cpu_count(), verbose=False)
    llama_ids = raw_llama.tokenize(prompt.encode(), add_bos=False, special=True)
    tokenizer = AutoTokenizer.from_pretrained(local.path)
    raw_hf = AutoModelForCausalLM.from_pretrained(local.path, dtype=torch.float32).eval()
    hf_inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")

    def run_raw_llama() -> int:
        out = raw_llama.create_completion(llama_ids, max_tokens=n, temperature=0.0, repeat_penalty=1.0)
        return out["usage"]["completion_tokens"]

    def run_raw_hf() -> int:
        with torch.inference_mode():
            out = raw_hf.generate(**hf_inputs, max_new_tokens=n, do_sample=False)
        return out.shape[1] - hf_inputs["input_ids"].shape[1]

    def runner(model: PrimeModel) -> Callable[[], int]:
        return lambda: model.complete(model.encode_chat(MESSAGES), max_new_tokens=n).completion_tokens

    rows = {
        "raw llama-cpp-python": run_raw_llama,
        "PrimeModel llamacpp": runner(prime_llama),
        "raw transformers (float32)": run_raw_hf,
        "PrimeModel transformers": runner(prime_hf),
    }
    results = measure(rows, args.repeats, console)

    console.print("measuring `jarvis chat --once` wall time ...")
    walls = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "jarvis.cli", "chat", "--once", "What is the capital of France?"],
                       check=True, capture_output=True)
        walls.append(time.perf_counter() - start)

    llama_rate = results["PrimeModel llamacpp"]["tokens_per_s"]
    ratios = {
        "llamacpp_vs_raw_llama_cpp": llama_rate / results["raw llama-cpp-python"]["tokens_per_s"],
        "llamacpp_vs_transformers_fp32": llama_rate / results["raw transformers (float32)"]["tokens_per_s"],
        "transformers_vs_raw_transformers": results["PrimeModel transformers"]["tokens_per_s"]
        / results["raw transformers (float32)"]["tokens_per_s"],
    }
    table = Table(title=f"decode, {MODEL}, {n} new tokens, greedy, median of {args.repeats}")
    table.add_column("engine")
    table.add_column("tokens/s", justify="right")
    table.add_column("new tokens", justify="right")
    for name, r in results.items():
        table.add_row(name, f"{r['tokens_per_s']:.1f}", f"{r['new_tokens']:.0f}")
    console.print(table)
    console.print(f"PrimeModel llamacpp / raw llama-cpp-python: {ratios['llamacpp_vs_raw_llama_cpp']:.2f}x (target >= 0.95x)")
    console.print(f"PrimeModel llamacpp / transformers float32: {ratios['llamacpp_vs_transformers_fp32']:.2f}x (target >= 3x)")
    console.print(f"`jarvis chat --once` wall: {statistics.median(walls):.2f} s (target <= 3 s)")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "model": MODEL, "max_new_tokens": n, "repeats": args.repeats,
        "machine": {"platform": platform.platform(), "processor": cpu_name(), "cpus": os.cpu_count()},
        "results": results, "ratios": ratios,
        "jarvis_chat_once_wall_s": {"median": statistics.median(walls), "runs": walls},
    }, indent=2) + "\n")
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
