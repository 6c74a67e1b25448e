"""`prime export` per architecture: how long llama.cpp's converter and the quantizer take,
and how close the f16 file stays to transformers, on the tiny random models the tests use.

    python benchmarks/export.py [--arch llama-spm qwen2 ...] [--quants q8_0 q4_k_m] [--out benchmarks/results/export.json]

For each architecture (`packages/jarvis-prime/tests/tiny_text.py`: llama with a SentencePiece-style
tokenizer.json, with a real SentencePiece tokenizer.model and with a Llama-3 byte-level tokenizer,
mistral, qwen2, qwen3, gemma2, gemma3 text, phi3), a seeded tiny
model (hidden 64, 2 layers, ~480 tokens) is built, imported into a throw-away store, then exported:
first f16 (the converter in its child process: start-up, torch import and the conversion), then
`--quants` from it (llama.cpp's quantizer; 4-6 bits also measure the importance matrix with
transformers). Wall-clock seconds of each `export_gguf` call. Then the f16 file on llama.cpp is
compared with transformers float32 on the hard string of the round-trip test: whether the token
ids are equal, and the largest logit difference as a fraction of the logits' spread.

Tiny models time the fixed costs (child process, imports, file handling), which dominate
below ~100M parameters; a 7B export adds the converter's and quantizer's per-byte work.
Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console

from jarvis_prime.hardware import cpu_name
from jarvis_prime.tables import Col, print_table

TESTS = Path(__file__).resolve().parents[1] / "packages" / "jarvis-prime" / "tests"
RESULTS = Path(__file__).parent / "results" / "export.json"


def measure(arch, root: Path, quants: Sequence[str]) -> dict[str, Any]:
    import numpy as np
    import torch
    from test_export_architectures import hard_text
    from tiny_text import build_hf_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from jarvis_prime.export import export_gguf
    from jarvis_prime.models.llamacpp import open_llama
    from jarvis_prime.store import import_path

    hf = build_hf_model(arch, root / arch.id / "hf")
    local = import_path(hf, name=f"tiny-{arch.id}", version="1.0.0", force=True)
    started = time.perf_counter()
    export_gguf(local.path, ["f16"], tokenizer_pre=arch.tokenizer_pre, progress=False)
    f16_s = time.perf_counter() - started
    started = time.perf_counter()
    if quants:
        export_gguf(local.path, list(quants), tokenizer_pre=arch.tokenizer_pre, progress=False)
    quant_s = time.perf_counter() - started

    text = hard_text(arch)
    tokenizer = AutoTokenizer.from_pretrained(local.path)
    ids = tokenizer(text)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(local.path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    llm = open_llama(local.path / f"gguf/tiny-{arch.id}-f16.gguf", n_ctx=256, logits_all=True, verbose=False)
    try:
        same_tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True) == ids
        llm.eval(ids)
        ours = np.asarray(llm.scores[: len(ids)])
    finally:
        llm.close()
    spread = expected.max(axis=-1) - expected.min(axis=-1)
    return {"architecture": arch.id, "config": arch.config_class, "tokenizer": arch.tokenizer,
            "parameters": sum(p.numel() for p in model.parameters()), "f16_seconds": round(f16_s, 2),
            "quants": list(quants), "quants_seconds": round(quant_s, 2), "same_tokens": same_tokens,
            "tokens": len(ids), "max_logit_error": float((np.abs(ours - expected).max(axis=-1) / spread).max())}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    sys.path.insert(0, str(TESTS))
    from tiny_text import ARCHES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", nargs="+", choices=[a.id for a in ARCHES], default=[a.id for a in ARCHES])
    parser.add_argument("--quants", nargs="*", default=["q8_0", "q4_k_m"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="export-bench-") as tmp:
        saved = os.environ.get("JARVIS_PRIME_HOME")
        os.environ["JARVIS_PRIME_HOME"] = str(Path(tmp) / "home")  # a throw-away store
        try:
            rows = [measure(arch, Path(tmp), args.quants) for arch in ARCHES if arch.id in args.arch]
        finally:
            if saved is None:
                os.environ.pop("JARVIS_PRIME_HOME", None)
            else:
                os.environ["JARVIS_PRIME_HOME"] = saved
    result = {"machine": cpu_name(), "cpus": os.cpu_count(), "rows": rows}
    console = Console()
    quants = "+".join(args.quants) or "-"
    print_table(console, [Col("architecture", keep=True), Col("tokenizer", keep=True), Col("params", keep=True),
                          Col("f16 s", keep=True), Col(f"{quants} s", keep=True), Col("same ids", keep=True),
                          Col("max logit err", keep=True)],
                [[r["architecture"], r["tokenizer"], f"{r['parameters']:,}", f"{r['f16_seconds']:.1f}",
                  f"{r['quants_seconds']:.1f}", "yes" if r["same_tokens"] else "[red]no[/]",
                  f"{r['max_logit_error']:.2%}"] for r in rows],
                title=f"prime export per architecture (tiny models, {result['cpus']} CPUs)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    console.print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
