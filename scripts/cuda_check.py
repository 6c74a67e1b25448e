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

Where vLLM is installed (issue #26), `prime serve --engine vllm tiny-cuda` must start
vLLM's OpenAI server on the same PRIME model, with an API key and a served name, and
JARVIS's RemoteModel (what `jarvis chat --backend-url` uses) must list it and get a
streamed reply equal to the whole one (greedy). Without vLLM the check is reported as
skipped, never passed.
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

    report["checks"]["vllm"] = vllm_check()
    report["ok"] &= report["checks"]["vllm"].get("ok", True)  # skipped (no vLLM) is not a failure, and says so

    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if report["ok"] else 1


def vllm_check(port: int = 8765, key: str = "cuda-check-key", wait_s: float = 300) -> dict:
    """`prime serve --engine vllm` on the tiny model, and JARVIS's RemoteModel against it."""
    import importlib.util
    import subprocess
    import time
    import urllib.request

    if shutil.which("vllm") is None and importlib.util.find_spec("vllm") is None:
        return {"skipped": "vLLM is not installed"}
    server = subprocess.Popen([sys.executable, "-m", "jarvis_prime.cli", "serve", "tiny-cuda", "--engine", "vllm",
                               "--port", str(port), "--api-key", key, "--served-model-name", "jarvis-tiny",
                               "--context-length", "1024"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if server.poll() is not None:
                return {"ok": False, "error": "vLLM exited", "log": server.stdout.read()[-3000:]}
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                time.sleep(2)
        else:
            return {"ok": False, "error": f"vLLM not healthy in {wait_s:.0f} s"}
        from jarvis.remote import RemoteModel

        remote = RemoteModel(f"http://127.0.0.1:{port}/v1", api_key=key)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        whole = remote.chat(messages, max_new_tokens=16, temperature=0.0)
        streamed = "".join(remote.chat(messages, stream=True, max_new_tokens=16, temperature=0.0))
        try:
            RemoteModel(f"http://127.0.0.1:{port}/v1", api_key="wrong-key")
            refused = False
        except Exception:
            refused = True
        check = {"served_name": remote.name, "reply": whole, "stream_equals_whole": streamed == whole,
                 "wrong_key_refused": refused}
        check["ok"] = remote.name == "jarvis-tiny" and bool(whole) and streamed == whole and refused
        return check
    except Exception:
        return {"ok": False, "error": traceback.format_exc(limit=4)}
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    sys.exit(main())
