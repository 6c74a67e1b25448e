"""LoRA SFT throughput: Reactor Core beside TRL's SFTTrainer, same model, data and settings.

    python benchmarks/train_throughput.py [--examples 160] [--max-seq-length 512]

SmolLM2-135M-Instruct (the embedded default, float32 weights), one epoch over the same
generated chat data, packing on both sides, loss on the assistant reply only, LoRA
r=16 / alpha=32 / dropout 0 on the attention and MLP projections, AdamW lr 2e-4 with
cosine decay and no warmup (the two warm up differently: transformers' schedule gives
the first step lr 0, ours lr/warmup, which alone moved eval loss ~4 % in 9 steps),
batch 4 packed rows (--no-packing pads instead), the same held-out set for eval loss, bf16 autocast
where the CPU has AVX512-BF16 (both sides). Each engine runs in its own process so
peak RSS is its own. Reports tokens/s (training steps only), peak RSS, final eval loss,
and MFU: the FLOPs this LoRA objective needs for the data (`model_flops`, counted from
the tokenized examples, the same for every engine) over this machine's measured peak
matmul FLOP/s. A third row trains with `compile: true` (each decoder layer, and the LM
head with its loss, through torch.compile; --no-compiled skips it); "after step 1" is
tokens/s once the one-time compile in step 1 is paid, what a long run sees. tokens/s
and MFU count every step. Below the table, the model's own linears timed alone at its
shapes (`matmul_bound_seconds`): how close to the square-matmul peak its matmuls can
get with everything else free.
Targets (issue 3): >= 1.3x TRL's tokens/s at equal eval loss (+-2 %), MFU >= 60 %.
Writes benchmarks/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "train_throughput.json"
LORA_RANK = 16
SYSTEM = "You are JARVIS, a helpful AI assistant."
TOPICS = ["the ocean", "a robot", "the moon", "coffee", "a library", "mountains", "a violin", "rain", "the desert", "a train"]
ADJ = ["quiet", "bright", "ancient", "curious", "gentle", "vast", "strange", "warm", "restless", "patient"]


def make_examples(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic, adj = rng.choice(TOPICS), rng.choice(ADJ)
        sentences = rng.randint(2, 8)
        reply = " ".join(
            f"{rng.choice(ADJ).capitalize()} thoughts about {topic} lead to {rng.choice(TOPICS)} and {rng.choice(ADJ)} days."
            for _ in range(sentences)
        )
        out.append({"messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Write {sentences} sentences about {adj} {topic} (#{i})."},
            {"role": "assistant", "content": reply},
        ]})
    return out


def peak_matmul_flops(dtype_name: str) -> float:
    """Best FLOP/s of large square matmuls here (2048 and 4096): the practical peak MFU is measured against."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    best = 0.0
    for n in (2048, 4096):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        for _ in range(5):
            start = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


@dataclass(frozen=True)
class Shapes:
    """The matmul shapes of a Llama-style decoder, from its config."""

    hidden: int
    intermediate: int
    kv: int  # key/value width: kv heads x head dim
    layers: int
    vocab: int

    @classmethod
    def of(cls, path: str) -> "Shapes":
        from transformers import AutoConfig

        c = AutoConfig.from_pretrained(path)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(c.hidden_size, c.intermediate_size, c.num_key_value_heads * head_dim, c.num_hidden_layers, c.vocab_size)

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of one layer's q, k, v, o, gate, up and down projections."""
        h, i, kv = self.hidden, self.intermediate, self.kv
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    def frozen_params(self) -> int:
        """Weights of every layer's linears (the LM head apart)."""
        return sum(i * o for i, o in self.linears()) * self.layers


@dataclass(frozen=True)
class DataStats:
    tokens: int
    labelled: int  # positions with a next-token target: the LM head runs on these
    context: int  # sum over tokens of the positions each attends to (its example's causal prefix)


def data_stats(train_file: Path, max_seq_length: int) -> DataStats:
    from transformers import AutoTokenizer

    from reactor_core.data import IGNORE_INDEX, load_chat_file, tokenize_dataset

    examples, _ = load_chat_file(train_file)
    tokenized, _ = tokenize_dataset(examples, AutoTokenizer.from_pretrained(model_path()), max_seq_length=max_seq_length)
    lengths = [len(e.input_ids) for e in tokenized]
    return DataStats(tokens=sum(lengths), labelled=sum(sum(t != IGNORE_INDEX for t in e.labels[1:]) for e in tokenized),
                     context=sum(n * (n + 1) // 2 for n in lengths))


def model_flops(shapes: Shapes, data: DataStats, lora_rank: int) -> float:
    """FLOPs a LoRA SFT epoch needs (2 per multiply-add), whatever the engine does beyond them.

    Frozen linears: forward and input gradient (4 x params per token; no weight gradient).
    LoRA adapters: forward, input and weight gradients (6 x params per token). LM head: on the
    labelled positions only, the ones the loss needs. Attention scores and values: 12 x width
    per attended position (forward QK^T and PV, backward twice that), each token attending to
    its own example's prefix. Padding and cross-example attention are not work the objective
    needs, so they do not count.
    """
    body = shapes.frozen_params()
    lora = sum(i + o for i, o in shapes.linears()) * lora_rank * shapes.layers
    head = shapes.hidden * shapes.vocab
    attention = 12 * shapes.hidden * shapes.layers * data.context
    return 4 * body * data.tokens + 6 * lora * data.tokens + 4 * head * data.labelled + attention


def matmul_bound_seconds(shapes: Shapes, data: DataStats, tokens: int, dtype_name: str) -> tuple[float, float]:
    """(seconds, FLOPs) of the model's frozen linears alone for a step of `tokens` tokens: each
    forward and input-gradient matmul at the model's shapes, the LM head on the labelled share.

    The fastest those matmuls run here with attention, norms, activations, LoRA and the
    optimizer free: FLOPs over seconds, against the square-matmul peak, says how close
    matmuls of these shapes get to it.
    """
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    labelled = tokens * data.labelled // data.tokens
    layer = [torch.randn(o, i, dtype=dtype) for i, o in shapes.linears()]
    head = torch.randn(shapes.vocab, shapes.hidden, dtype=dtype)
    inputs = {n: torch.randn(tokens, n, dtype=dtype) for n in (shapes.hidden, shapes.intermediate)}
    grads = {n: torch.randn(tokens, n, dtype=dtype) for n in (shapes.hidden, shapes.kv, shapes.intermediate)}
    head_in, head_grad = torch.randn(labelled, shapes.hidden, dtype=dtype), torch.randn(labelled, shapes.vocab, dtype=dtype)

    def step() -> None:
        for _ in range(shapes.layers):
            for w in layer:
                inputs[w.shape[1]] @ w.t()  # forward
                grads[w.shape[0]] @ w  # gradient of the input
        head_in @ head.t()
        head_grad @ head
    step()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - start)
    flops = 4 * (shapes.frozen_params() * tokens + shapes.hidden * shapes.vocab * labelled)
    return best, flops


def shared_eval_loss(model, tokenizer, eval_file: Path, max_seq_length: int) -> float:
    """Token-mean loss on the assistant replies of `eval_file`, one example at a time.

    The same evaluator for both engines, so "equal eval loss" compares the models and
    not two ways of averaging (TRL averages per batch, over packed rows).
    """
    import torch

    from reactor_core.data import collate_padded, load_chat_file, tokenize_dataset
    from reactor_core.training.loss import causal_lm_loss_sum

    examples, _ = load_chat_file(eval_file)
    tokenized, _ = tokenize_dataset(examples, tokenizer, max_seq_length=max_seq_length)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for example in tokenized:
            batch = collate_padded([example], tokenizer.pad_token_id)
            total += causal_lm_loss_sum(model, batch.input_ids, batch.labels, batch.position_ids, batch.attention_mask).item()
            count += batch.num_loss_tokens
    return total / count


def model_path() -> str:
    from jarvis_prime.store import resolve

    return str(resolve("smollm2-135m-instruct").path)


def run_reactor(args, train_file: Path, eval_file: Path, out: Path, compile: bool = False) -> dict:
    from reactor_core import Trainer, TrainingConfig

    config = TrainingConfig(
        model_name=model_path(), data_path=str(train_file), val_data_path=str(eval_file), output_dir=str(out),
        use_lora=True, lora_rank=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0, num_epochs=1, batch_size=4,
        learning_rate=2e-4, lr_scheduler="cosine", warmup_steps=0, max_seq_length=args.max_seq_length,
        packing=not args.no_packing, num_samples=0, merge_adapter=False, seed=0, compile=compile,
    )
    steps: list[tuple[float, int]] = []  # (time, tokens) at the end of each step

    def on_event(event) -> None:
        if event.kind == "step":
            steps.append((time.perf_counter(), int(event.values["tokens"])))

    trainer = Trainer(config, progress=False, on_event=on_event)
    result = trainer.train()
    m = result.metrics
    eval_loss = shared_eval_loss(trainer.recipe.model, trainer.recipe.tokenizer, eval_file, args.max_seq_length)
    # after step 1, which carries the one-time compile in a compiled run
    steady = sum(t for _, t in steps[1:]) / (steps[-1][0] - steps[0][0]) if len(steps) > 1 else None
    return {"tokens": m["train_tokens"], "train_seconds": m["train_seconds"], "eval_loss": eval_loss,
            "steps": m["steps"], "autocast": "bf16" if trainer.recipe.autocast is not None else "fp32",
            "steady_tokens_per_s": steady}


def run_trl(args, train_file: Path, eval_file: Path, out: Path) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from reactor_core.training.model import cpu_has_bf16

    def to_prompt_completion(row):  # TRL's completion-only loss == our assistant-only loss here
        return {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}

    data = load_dataset("json", data_files={"train": str(train_file), "eval": str(eval_file)})
    data = data.map(to_prompt_completion, remove_columns=["messages"])
    path = model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = SFTConfig(
        output_dir=str(out), max_length=args.max_seq_length, packing=not args.no_packing, per_device_train_batch_size=4,
        per_device_eval_batch_size=4, gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=2e-4,
        lr_scheduler_type="cosine", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0, logging_steps=10,
        save_strategy="no", eval_strategy="no", report_to=[], seed=0, use_cpu=True, bf16=cpu_has_bf16(),
        completion_only_loss=True, dataloader_num_workers=0,
    )
    lora = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    trainer = SFTTrainer(model=model, args=config, train_dataset=data["train"], eval_dataset=data["eval"],
                         processing_class=tokenizer, peft_config=lora)
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    eval_loss = shared_eval_loss(trainer.model, tokenizer, eval_file, args.max_seq_length)
    return {"tokens": tokens, "train_seconds": seconds, "eval_loss": eval_loss,
            "steps": output.global_step, "autocast": "bf16" if config.bf16 else "fp32", "steady_tokens_per_s": None}


def child(args) -> None:
    work = Path(args.work)
    runner = {"reactor": run_reactor, "reactor-compiled": partial(run_reactor, compile=True), "trl": run_trl}[args.engine]
    result = runner(args, work / "train.jsonl", work / "eval.jsonl", work / f"out-{args.engine}")
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=160)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--no-packing", action="store_true", help="pad each example instead of packing (both engines)")
    parser.add_argument("--no-compiled", action="store_true", help="skip the `compile: true` run (it compiles for ~1 min)")
    parser.add_argument("--engine", choices=["reactor", "reactor-compiled", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        return child(args)

    from rich.console import Console
    from rich.table import Table

    from reactor_core.training.model import cpu_has_bf16

    console = Console(width=max(Console().width, 125))  # the table whole, in a log too
    work = Path(os.environ.get("BENCH_WORK", "/tmp/reactor-train-bench"))
    work.mkdir(parents=True, exist_ok=True)
    examples = make_examples(args.examples + 20, seed=0)
    (work / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples[: args.examples]))
    (work / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples[args.examples:]))
    model_path()  # pull once, outside the timed runs

    results = {}
    for engine in ("reactor", "trl") if args.no_compiled else ("reactor", "reactor-compiled", "trl"):
        console.print(f"training with {engine} ...")
        proc = subprocess.run([sys.executable, __file__, "--engine", engine, "--work", str(work),
                               "--max-seq-length", str(args.max_seq_length)] + (["--no-packing"] if args.no_packing else []),
                              capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            console.print(proc.stderr[-3000:])
            raise SystemExit(f"{engine} run failed")
        results[engine] = json.loads(line.removeprefix("RESULT "))

    dtype_name = "bf16" if cpu_has_bf16() else "fp32"
    peak = peak_matmul_flops(dtype_name)
    shapes, data = Shapes.of(model_path()), data_stats(work / "train.jsonl", args.max_seq_length)
    flops_per_token = model_flops(shapes, data, LORA_RANK) / data.tokens
    step_tokens = results["reactor"]["tokens"] // results["reactor"]["steps"]
    bound_seconds, bound_flops = matmul_bound_seconds(shapes, data, step_tokens, dtype_name)
    mfu_ceiling = bound_flops / bound_seconds / peak
    for r in results.values():
        r["tokens_per_s"] = r["tokens"] / r["train_seconds"]
        r["mfu"] = r["tokens_per_s"] * flops_per_token / peak
        r["steady_mfu"] = r["steady_tokens_per_s"] * flops_per_token / peak if r["steady_tokens_per_s"] else None
    speedup = results["reactor"]["tokens_per_s"] / results["trl"]["tokens_per_s"]
    loss_gap = results["reactor"]["eval_loss"] / results["trl"]["eval_loss"] - 1

    layout = "padded" if args.no_packing else "packed"
    table = Table(title=f"LoRA SFT, SmolLM2-135M, {args.examples} examples, 1 epoch, {layout} {args.max_seq_length}")
    for col in ("engine", "tokens", "steps", "tokens/s", "after step 1", "peak RSS (MB)", "eval loss", "MFU", "after step 1",
                "autocast"):
        table.add_column(col, justify="right" if col not in ("engine", "autocast") else "left")
    for name, r in results.items():
        steady = f"{r['steady_tokens_per_s']:.0f}" if r["steady_tokens_per_s"] else "-"
        steady_mfu = f"{100 * r['steady_mfu']:.1f} %" if r["steady_mfu"] else "-"
        table.add_row(name, f"{r['tokens']:,}", str(r["steps"]), f"{r['tokens_per_s']:.0f}", steady, f"{r['peak_rss_mb']:.0f}",
                      f"{r['eval_loss']:.4f}", f"{100 * r['mfu']:.1f} %", steady_mfu, r["autocast"])
    console.print(table)
    console.print(f"peak matmul here: {peak / 1e9:.0f} GFLOP/s; model FLOPs {flops_per_token / 1e6:.0f} M per token "
                  f"({data.labelled / data.tokens:.0%} of positions labelled); Reactor Core / TRL tokens/s: {speedup:.2f}x "
                  f"(target >= 1.3x); eval loss gap {100 * loss_gap:+.1f} % (target within +-2 %); MFU target 60 %, and "
                  f"the model's linears alone, at its shapes, reach {100 * mfu_ceiling:.0f} % of peak here")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"examples": args.examples, "max_seq_length": args.max_seq_length, "packing": not args.no_packing,
                                   "peak_matmul_flops": peak, "model_flops_per_token": flops_per_token,
                                   "mfu_ceiling_matmuls_only": mfu_ceiling, "results": results, "speedup_vs_trl": speedup,
                                   "eval_loss_gap": loss_gap}, indent=2) + "\n")
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
