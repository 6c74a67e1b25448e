"""Exercise Reactor Core's CUDA paths on a GPU machine (no network, no model hub).

    python scripts/cuda_train_check.py TOKENIZER_DIR [--out results.json]

CI has no GPU. This builds a small random Llama with SmolLM2's tokenizer and runs, on
CUDA: LoRA SFT with bf16 autocast (loss must fall), QLoRA on a bitsandbytes NF4 base,
full fine-tuning, DPO with LoRA (held-out accuracy must rise), and a checkpoint ->
resume round trip (losses after resume compared with an uninterrupted run; CUDA
kernels are not all deterministic, so the largest difference is reported, and the
check asks for < 1e-3). Prints one JSON object; exits non-zero if a check failed.
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

    for name, fn in [("lora_sft_bf16", lora_sft), ("qlora_nf4", qlora), ("full_fine_tune", full), ("dpo_lora", dpo),
                     ("checkpoint_resume", resume)]:
        check(name, fn)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
