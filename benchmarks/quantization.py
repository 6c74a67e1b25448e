"""Every variant of the JARVIS chat model side by side: size, memory, speed, quality.

    python benchmarks/quantization.py [--model prime-135m-chat-v1] [--new-tokens 64]

Variants: float32 safetensors on transformers (the reference), bitsandbytes int8 and
nf4 on transformers, and GGUF f16, q8_0, q4_k_m on llama.cpp (f16 is exported first
if missing). Each variant runs in its own process, so peak RSS is that variant's own.
Columns: weight file size (and ratio to fp32), peak RSS, decode tokens/s, perplexity
on the package's held-out text and its ratio to fp32.

Targets (issue 6): 4-bit file <= 0.30x fp32 with perplexity <= 1.10x; 8-bit
perplexity <= 1.01x; the CPU default (what `from_pretrained` serves here) decodes
>= 3x transformers float32. Writes benchmarks/results/quantization.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from jarvis_prime.hardware import cpu_name

RESULTS = Path(__file__).parent / "results" / "quantization.json"
VARIANTS = ["f32", "int8", "nf4", "f16", "q8_0", "q4_k_m"]


def run_variant(model: str, variant: str, new_tokens: int) -> dict:
    """In this process: load one variant, measure it, return the numbers."""
    from jarvis_prime.evaluation import load_variant, peak_rss_mb, perplexity, speed, variant_runtime
    from jarvis_prime.store import resolve

    local = resolve(model)
    name, runtime = variant_runtime(local.manifest, None if variant == "default" else variant)
    with load_variant(local.path, runtime=runtime) as loaded:
        ppl = perplexity(loaded)["perplexity"]
        rate = speed(loaded, new_tokens)["decode_tokens_per_s"]
    weights = local.path / runtime.weights
    size = sum(f.stat().st_size for f in local.path.glob("*.safetensors")) if runtime.weights_format == "safetensors" \
        else weights.stat().st_size
    return {"variant": name, "backend": runtime.backend, "weights": runtime.weights, "file_bytes": size,
            "peak_rss_mb": peak_rss_mb(), "decode_tokens_per_s": rate, "perplexity": ppl}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="prime-135m-chat-v1")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # worker mode: measure one variant, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_variant(args.model, args.one, args.new_tokens)))
        return

    console = Console()
    from jarvis_prime.export import export_gguf
    from jarvis_prime.store import resolve

    local = resolve(args.model)
    missing = [q for q in ("f16", "q8_0", "q4_k_m") if q not in local.manifest.quantizations]
    if missing:
        console.print(f"exporting {', '.join(missing)} first")
        export_gguf(local.path, missing)
    rows = {}
    for variant in [*VARIANTS, "default"]:
        console.print(f"measuring {variant} ...")
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--new-tokens", str(args.new_tokens),
                              "--one", variant], capture_output=True, text=True)
        if out.returncode != 0:
            rows[variant] = {"variant": variant, "error": out.stderr.strip().splitlines()[-1]}
            continue
        rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])

    ref = rows["f32"]
    table = Table(title=f"{args.model}: variants on {cpu_name()}")
    for column in ("variant", "backend", "file", "x fp32", "peak RSS", "decode tok/s", "x fp32 speed", "perplexity",
                   "x fp32 ppl"):
        table.add_column(column, justify="left" if column in ("variant", "backend") else "right")
    for key, row in rows.items():
        if "error" in row:
            table.add_row(key, "-", "-", "-", "-", "-", "-", "-", row["error"][:60])
            continue
        row["size_ratio"] = row["file_bytes"] / ref["file_bytes"]
        row["speed_ratio"] = row["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
        row["ppl_ratio"] = row["perplexity"] / ref["perplexity"]
        label = f"default ({row['variant']})" if key == "default" else key
        table.add_row(label, row["backend"], f"{row['file_bytes'] / 1e6:.0f} MB", f"{row['size_ratio']:.2f}",
                      f"{row['peak_rss_mb']:.0f} MB", f"{row['decode_tokens_per_s']:.1f}", f"{row['speed_ratio']:.1f}",
                      f"{row['perplexity']:.3f}", f"{row['ppl_ratio']:.3f}")
    console.print(table)
    targets = {
        "4bit file <= 0.30x fp32": rows["q4_k_m"].get("size_ratio", 9) <= 0.30,
        "4bit perplexity <= 1.10x": rows["q4_k_m"].get("ppl_ratio", 9) <= 1.10,
        "8bit perplexity <= 1.01x (q8_0)": rows["q8_0"].get("ppl_ratio", 9) <= 1.01,
        "CPU default decode >= 3x fp32": rows["default"].get("speed_ratio", 0) >= 3.0,
    }
    for target, ok in targets.items():
        console.print(f"{'[green]met' if ok else '[red]missed'}[/]: {target}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"model": args.model, "machine": cpu_name(), "rows": rows,
                                   "targets": targets}, indent=2))
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
