"""Exercise Reactor Core's CUDA paths on a GPU machine (no network, no model hub).

    python scripts/cuda_train_check.py TOKENIZER_DIR [--out results.json] [--big-layers 28 | --no-big] [--only CHECK ...]

CI has no GPU. This builds a small random Llama with SmolLM2's tokenizer and runs, on
CUDA: LoRA SFT with bf16 autocast (loss must fall), QLoRA on a bitsandbytes NF4 base,
full fine-tuning, DPO with LoRA (held-out accuracy must rise), and a checkpoint ->
resume round trip (losses after resume compared with an uninterrupted run; CUDA
kernels are not all deterministic, so the largest difference is reported, and the
check asks for < 1e-3).

Issue 21 (big bases) adds: LoRA on a bf16 frozen base (`base_dtype: auto` must pick bf16
on CUDA; adapters float32; loss must fall), QLoRA with embeddings kept in bf16, the
`prime train prime-7b-chat-v1` recipe end to end on a small random Qwen2 (with
`jarvis export-data`-style conversations; needs jarvis-prime installed), and, unless
--no-big, a Qwen2.5-7B-shaped random model (hidden 3584, MLP 18944, vocab 152064;
--big-layers of its 28 layers, all 28 by default: ~15 GB written to a temp dir) trained
5 steps with QLoRA and with bf16 LoRA (batch 1 x 512, gradient checkpointing): load
seconds, peak GPU memory (torch.cuda.max_memory_allocated) beside Reactor Core's
estimate, which must not be below 0.8x the peak. Prints a table of every check and one
JSON object; exits non-zero if a check failed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import traceback
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("tokenizer_dir", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--device", default="cuda", help="cuda (the point), or cpu to try the script itself")
    parser.add_argument("--big-layers", type=int, default=28, help="decoder layers of the 7B-shaped model (28 = all)")
    parser.add_argument("--no-big", action="store_true", help="skip the 7B-shaped model")
    parser.add_argument("--only", nargs="+", help="run only these checks (names as in the table)")
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from reactor_core import Trainer, TrainingConfig

    work = Path(tempfile.mkdtemp(prefix="reactor-cuda-"))
    model_dir = work / "tiny"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        tie_word_embeddings=True, initializer_range=0.2,
    )).save_pretrained(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(args.tokenizer_dir / name, model_dir / name)

    colors = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
    chat = work / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Name color number {i}."},
        {"role": "assistant", "content": f"Color {i} is {colors[i % 8]}."}]}) + "\n" for i in range(64)))
    prefs = work / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({
        "prompt": f"Name color number {i}.", "chosen": f"Color {i} is {colors[i % 8]}.",
        "rejected": f"Color {i} is unknown, sorry."}) + "\n" for i in range(64)))

    def config(name: str, **kw) -> TrainingConfig:
        values = dict(model_name=str(model_dir), output_dir=str(work / name), device=args.device, max_steps=20, batch_size=8,
                      learning_rate=1e-2, lora_rank=8, lora_dropout=0.0, max_seq_length=128, val_fraction=0.125,
                      num_samples=1, merge_adapter=False, seed=0)
        values.update(kw)
        return TrainingConfig(**values)

    report: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "checks": {}, "ok": True}

    def check(name: str, fn) -> None:
        try:
            result = fn()
        except Exception:
            result = {"ok": False, "error": traceback.format_exc(limit=5)}
        report["checks"][name] = result
        report["ok"] &= bool(result.get("ok"))

    def lora_sft():
        trainer = Trainer(config("lora"), progress=False)
        result = trainer.train(chat)
        recipe = trainer.recipe
        losses = [x["loss"] for x in result.metrics["train_loss"]]
        return {"ok": losses[-1] < 0.7 * losses[0] and recipe.device.type == args.device, "first": losses[0],
                "last": losses[-1], "autocast": str(recipe.autocast), "tokens_per_s": result.metrics["tokens_per_s"],
                "param_device": str(next(recipe.model.parameters()).device)}

    def qlora():
        trainer = Trainer(config("qlora", quantize_base=True, max_steps=5, num_samples=0), progress=False)
        result = trainer.train(chat)
        kinds = {type(m).__name__ for m in trainer.recipe.model.modules()}
        return {"ok": "Linear4bit" in kinds and result.state.step == 5, "losses": [x["loss"] for x in result.metrics["train_loss"]]}

    def full():
        result = Trainer(config("full", use_lora=False, learning_rate=3e-3, num_samples=0), progress=False).train(chat)
        losses = [x["loss"] for x in result.metrics["train_loss"]]
        return {"ok": losses[-1] < 0.7 * losses[0], "first": losses[0], "last": losses[-1]}

    def dpo():
        trainer = Trainer(config("dpo", method="dpo", max_steps=24, num_samples=0, val_fraction=0.2), progress=False).recipe
        trainer.setup(prefs)
        before = trainer.evaluate()
        result = trainer.train()
        after = result.metrics["eval"][-1]
        return {"ok": after["eval_reward_accuracy"] >= 0.8 and trainer.reference is None,
                "accuracy_before": before["eval_reward_accuracy"], "accuracy_after": after["eval_reward_accuracy"]}

    def resume():
        straight = Trainer(config("straight", max_steps=8, num_samples=0, lora_dropout=0.1), progress=False).train(chat)
        first = Trainer(config("resumed", max_steps=8, num_samples=0, lora_dropout=0.1, checkpoint_every_steps=4),
                        progress=False).recipe
        first.setup(chat)
        first.total_steps = 4  # stop after the step-4 checkpoint, as a preempted run would
        first.train()
        again = Trainer(config("resumed", max_steps=8, num_samples=0, lora_dropout=0.1, checkpoint_every_steps=4),
                        progress=False).recipe
        again.setup(chat)
        resumed_at = again.state.step
        result = again.train()
        a = [x["loss"] for x in straight.metrics["train_loss"]]
        b = [x["loss"] for x in result.metrics["train_loss"]]
        diff = max(abs(x - y) for x, y in zip(a, b))
        return {"ok": resumed_at == 4 and len(b) == 8 and diff < 1e-3, "resumed_at": resumed_at, "max_loss_diff": diff}

    def bf16_base():
        trainer = Trainer(config("bf16-base", num_samples=0), progress=False)
        result = trainer.train(chat)
        model = trainer.recipe.model
        frozen = sorted({str(p.dtype) for p in model.parameters() if not p.requires_grad})
        trained = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
        losses = [x["loss"] for x in result.metrics["train_loss"]]
        return {"ok": frozen == ["torch.bfloat16"] and trained == ["torch.float32"] and losses[-1] < 0.7 * losses[0],
                "frozen": frozen, "trained": trained, "first": losses[0], "last": losses[-1]}

    def qlora_bf16():
        trainer = Trainer(config("qlora-bf16", quantize_base=True, base_dtype="bfloat16", max_steps=5, num_samples=0),
                          progress=False)
        result = trainer.train(chat)
        model = trainer.recipe.model
        embed = str(model.get_input_embeddings().weight.dtype)
        kinds = {type(m).__name__ for m in model.modules()}
        return {"ok": "Linear4bit" in kinds and embed == "torch.bfloat16" and result.state.step == 5, "embeddings": embed}

    def prime_7b_recipe():
        import os
        from dataclasses import replace

        from transformers import Qwen2Config, Qwen2ForCausalLM

        from jarvis_prime.recipes.big_chat_model import BIG_RECIPES, train_big_chat_model

        os.environ["JARVIS_PRIME_HOME"] = str(work / "store")
        qwen = work / "tiny-qwen2"
        Qwen2ForCausalLM(Qwen2Config(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                                     pad_token_id=2, tie_word_embeddings=False)).save_pretrained(qwen)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copyfile(args.tokenizer_dir / name, qwen / name)
        recipe = replace(BIG_RECIPES["prime-7b-chat-v1"], base=str(qwen), max_steps=5, candidates=1, max_new_tokens=16,
                         max_seq_length=256)
        summary = train_big_chat_model("prime-7b-chat-v1", work / "prime-7b", data=[chat], recipe=recipe,
                                       log=lambda m: None, progress=False)
        return {"ok": summary["train_metrics"].get("steps") == 5 and summary["plan"]["mode"] in ("qlora", "lora-bf16"),
                "plan": summary["plan"]["mode"], "conversations": summary["conversations"],
                "persona_kept": summary["persona"]["kept"]}

    def seven_b_shaped(quantize: bool):
        import time

        from transformers import Qwen2Config, Qwen2ForCausalLM

        big = work / "qwen2.5-7b-shaped"
        if not (big / "config.json").is_file():
            shape = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                num_hidden_layers=args.big_layers, num_attention_heads=28, num_key_value_heads=4,
                                max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                                pad_token_id=2)
            with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
                Qwen2ForCausalLM(shape).to(torch.bfloat16).save_pretrained(big)
            for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
                shutil.copyfile(args.tokenizer_dir / name, big / name)
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        trainer = Trainer(config("big-qlora" if quantize else "big-bf16", model_name=str(big), quantize_base=quantize,
                                 max_steps=5, batch_size=1, max_seq_length=512, gradient_checkpointing=True,
                                 num_samples=0, lora_rank=16, learning_rate=1e-4), progress=False)
        trainer.recipe.setup(chat)
        load_s = time.perf_counter() - start
        result = trainer.recipe.train()
        peak = torch.cuda.max_memory_allocated()
        estimate = trainer.recipe.memory_estimate.total
        del trainer
        torch.cuda.empty_cache()
        return {"ok": result.state.step == 5 and estimate >= 0.8 * peak, "layers": args.big_layers,
                "load_s": round(load_s, 1), "peak_gib": round(peak / 2**30, 2), "estimate_gib": round(estimate / 2**30, 2)}

    checks = [("lora_sft_bf16", lora_sft), ("qlora_nf4", qlora), ("full_fine_tune", full), ("dpo_lora", dpo),
              ("checkpoint_resume", resume), ("lora_bf16_base", bf16_base), ("qlora_bf16_embeddings", qlora_bf16),
              ("prime_7b_chat_recipe", prime_7b_recipe)]
    if not args.no_big:
        checks += [("7b_shaped_qlora", lambda: seven_b_shaped(True)), ("7b_shaped_bf16_lora", lambda: seven_b_shaped(False))]
    for name, fn in checks:
        if not args.only or name in args.only:
            check(name, fn)
    try:
        from rich.console import Console

        from jarvis_prime.tables import Col, print_table

        def details(result: dict) -> str:
            if result.get("error"):
                return result["error"].strip().splitlines()[-1]
            return ", ".join(f"{k}={v}" for k, v in result.items() if k != "ok")

        print_table(Console(), [Col("check", keep=True), Col("ok"), Col("details")],
                    [[name, "yes" if r.get("ok") else "NO", details(r)] for name, r in report["checks"].items()],
                    title="cuda_train_check")
    except ImportError:
        pass
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
