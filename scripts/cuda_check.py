"""Exercise jarvis-prime's CUDA paths on a GPU machine (no network, no model hub).

    python scripts/cuda_check.py TOKENIZER_DIR [--out results.json]

CI machines have no GPU, so this is run by hand where one is lent. It builds a small
random Llama that uses SmolLM2's real tokenizer and chat template (TOKENIZER_DIR holds
tokenizer.json, tokenizer_config.json, chat_template.jinja), imports it into a private
store as a PRIME model, and then, for quantization None / "8bit" / "4bit":
  - `PrimeModel.from_pretrained(..., device="auto", backend="auto")` must pick
    transformers on CUDA (bf16, bitsandbytes int8, bitsandbytes nf4);
  - greedy `chat` must equal the joined `chat(stream=True)`, and usage must be counted;
  - the weight memory must shrink with the quantization.
It also checks that llama.cpp on CUDA without llama-cpp-python is a clear error.
Prints one JSON object and exits non-zero if any check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("tokenizer_dir", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ["JARVIS_PRIME_HOME"] = tempfile.mkdtemp(prefix="prime-cuda-")

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from jarvis_prime import BackendUnavailableError, PrimeModel
    from jarvis_prime.store import import_path

    report: dict = {"torch": torch.__version__, "cuda": torch.cuda.is_available(), "checks": {}, "ok": True}
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name(0)

    src = Path(tempfile.mkdtemp(prefix="tiny-llama-"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(src, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(args.tokenizer_dir / name, src / name)
    import_path(src, name="tiny-cuda", version="0.0.1")

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    footprints = {}
    for quant in (None, "8bit", "4bit"):
        key = quant or "none"
        try:
            model = PrimeModel.from_pretrained("tiny-cuda", quantization=quant)
            runtime = model.runtime
            reply = model.complete(model.encode_chat(messages), max_new_tokens=16)
            streamed = "".join(model.chat(messages, stream=True, max_new_tokens=16))
            footprints[key] = model._backend.model.get_memory_footprint()
            check = {
                "runtime": runtime.describe(),
                "backend_is_transformers_on_cuda": (runtime.backend, runtime.device) == ("transformers", "cuda"),
                "param_device": str(next(model._backend.model.parameters()).device),
                "stream_equals_generate": streamed == reply.text,
                "usage": [reply.prompt_tokens, reply.completion_tokens, reply.finish_reason],
                "footprint_bytes": footprints[key],
            }
            check["ok"] = check["backend_is_transformers_on_cuda"] and check["stream_equals_generate"] \
                and check["param_device"].startswith("cuda") and reply.completion_tokens > 0
            model.close()
        except Exception:
            check = {"ok": False, "error": traceback.format_exc(limit=4)}
        report["checks"][key] = check
        report["ok"] &= check["ok"]

    if {"none", "8bit", "4bit"} <= footprints.keys():
        shrinks = footprints["4bit"] < footprints["8bit"] < footprints["none"]
        report["checks"]["memory_shrinks_with_quantization"] = shrinks
        report["ok"] &= shrinks

    try:
        PrimeModel.from_pretrained("tiny-cuda", backend="llamacpp")
        report["checks"]["llamacpp_without_gguf_is_error"] = False
    except BackendUnavailableError as err:
        report["checks"]["llamacpp_without_gguf_is_error"] = str(err)
    report["ok"] &= bool(report["checks"]["llamacpp_without_gguf_is_error"])

    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
