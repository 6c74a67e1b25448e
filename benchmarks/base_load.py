"""Loading a 7B-shaped base for LoRA: peak RSS and load time, bf16 vs float32 (issue 21).

    python benchmarks/base_load.py [--layers 2] [--work DIR] [--out benchmarks/results/base_load.json]

Builds a random model with Qwen2.5-7B's shapes (hidden 3584, MLP 18944, 28 heads of 128
with 4 KV heads, vocab 152064, untied LM head), stored as bf16 safetensors as the Hub
ships it, but with --layers of its 28 decoder layers: disk and time on a small machine
are limited (2 layers: 1.56 B parameters, 3.1 GB). Each dtype is loaded in a fresh
process through Reactor Core's own `load_base_model` (what `reactor train` runs, on CPU),
and the child's peak RSS (ru_maxrss), its peak anonymous memory (RssAnon sampled every
20 ms: the memory the load really takes; RSS also counts the safetensors file's mapped
pages, which are page cache and reclaimable), the RSS once every weight has been read
(as the first forward reads them), and wall time are read, so one load never inherits
another's pages. The last columns project the whole 28-layer model (7.62 B parameters)
linearly in parameters from the measured peak-RSS bytes per parameter; that projection, not a
measurement, is what a 7B on a 32 GB machine means.

Target (issue 21): bf16 peak RSS at most about half of float32's (no float32 copy on the
way). transformers 5 keeps bf16 weights that match the file's dtype as views of the mapped
safetensors file (no copy: their pages are page cache, resident once read), and converts
float32 ones into a copy while the file's pages are mapped too.
Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from jarvis_prime.tables import Col, print_table

RESULTS = Path(__file__).parent / "results" / "base_load.json"
FULL_LAYERS = 28
SHAPE = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
             num_key_value_heads=4, max_position_embeddings=4096, tie_word_embeddings=False)

CHILD = """
import json, resource, sys, threading, time
import torch
from reactor_core.training.model import ModelSource, load_base_model

def anon_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0

peak_anon, done = [anon_bytes()], threading.Event()
def sample():
    while not done.wait(0.02):
        peak_anon[0] = max(peak_anon[0], anon_bytes())
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
model = load_base_model(ModelSource("hf", sys.argv[1]), quantize_4bit=False, device=torch.device("cpu"),
                        dtype=getattr(torch, sys.argv[2]))
seconds = time.perf_counter() - start
done.set()
peak_anon[0] = max(peak_anon[0], anon_bytes())
with torch.no_grad():  # read every weight once, as the first forward does: mapped pages become resident
    for p in model.parameters():
        p.sum()
touched = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))
params = sum(p.numel() for p in model.parameters())
dtypes = sorted({str(p.dtype) for p in model.parameters()})
print(json.dumps({"load_s": seconds, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "peak_anon_bytes": peak_anon[0], "touched_rss_bytes": touched, "params": params, "dtypes": dtypes}))
"""


def build(path: Path, layers: int) -> int:
    """The 7B-shaped random model in bf16 safetensors; its parameter count."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if (path / "config.json").is_file():
        from safetensors import safe_open

        total = 0
        for file in path.glob("*.safetensors"):
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    n = 1
                    for d in f.get_slice(key).get_shape():
                        n *= d
                    total += n
        return total
    config = Qwen2Config(**SHAPE, num_hidden_layers=layers)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def full_params() -> int:
    h, i, kv, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], 512, SHAPE["vocab_size"]
    per_layer = 2 * h * h + 2 * kv * h + h + 2 * kv + 3 * h * i + 2 * h  # q,o + k,v (+ biases) + MLP + 2 norms
    return 2 * v * h + h + FULL_LAYERS * per_layer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2, help=f"decoder layers of the {FULL_LAYERS} (default 2)")
    parser.add_argument("--work", type=Path, help="where the model is written (default: a temp dir, removed)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="base-load-"))
    model_dir = work / f"qwen2.5-7b-shaped-{args.layers}-layers"
    start = time.perf_counter()
    params = build(model_dir, args.layers)
    build_s = time.perf_counter() - start
    disk = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    full = full_params()
    rows, results = [], []
    for dtype in ("bfloat16", "float32"):
        env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
        out = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), dtype], capture_output=True, text=True,
                             env=env, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        per_param = r["peak_rss_bytes"] / r["params"]
        result = {"dtype": dtype, "layers": args.layers, "params": r["params"], "load_s": round(r["load_s"], 2),
                  "peak_rss_gb": round(r["peak_rss_bytes"] / 1e9, 2), "peak_anon_gb": round(r["peak_anon_bytes"] / 1e9, 2),
                  "rss_after_reading_every_weight_gb": round(r["touched_rss_bytes"] / 1e9, 2),
                  "bytes_per_param": round(per_param, 2),
                  "loaded_dtypes": r["dtypes"], "projected_28_layer_peak_rss_gb": round(per_param * full / 1e9, 1)}
        results.append(result)
        rows.append([dtype, f"{args.layers}/{FULL_LAYERS}", f"{r['params'] / 1e9:.2f} B", f"{r['load_s']:.1f} s",
                     f"{result['peak_rss_gb']:.2f} GB", f"{result['peak_anon_gb']:.2f} GB", f"{result['rss_after_reading_every_weight_gb']:.2f} GB", f"{per_param:.2f}",
                     f"{result['projected_28_layer_peak_rss_gb']:.1f} GB"])
    print_table(Console(width=200), [Col("base dtype", keep=True), Col("layers", keep=True), Col("params", keep=True),
                            Col("load", keep=True), Col("peak RSS", keep=True), Col("peak anon", keep=True), Col("RSS, weights read", keep=True),
                            Col("peak RSS B/param", keep=True), Col("28 layers, peak RSS (projected)", keep=True)],
                rows, title=f"7B-shaped Qwen2 ({args.layers}/{FULL_LAYERS} layers, {disk / 1e9:.1f} GB bf16 on disk, "
                            f"built in {build_s:.0f} s); full model {full / 1e9:.2f} B parameters")
    ratio = results[0]["peak_rss_gb"] / results[1]["peak_rss_gb"]
    print(f"bf16 / float32 peak RSS: {ratio:.2f} (target about 0.5). bf16 weights stay mapped from the safetensors "
          "file (page cache: peak anonymous memory is the runtime alone); float32 converts them into a copy")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "disk_bytes": disk, "full_params": full,
                                    "bf16_over_fp32_peak_rss": round(ratio, 3), "cpu_count": os.cpu_count()}, indent=2) + "\n")
    if args.work is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
