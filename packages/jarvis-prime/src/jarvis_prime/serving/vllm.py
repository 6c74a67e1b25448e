"""`prime serve --engine vllm`: a PRIME model served by vLLM's OpenAI-compatible server.

`prime serve` answers one machine's traffic (llama.cpp or transformers, a bounded
queue); vLLM is what serves many users on a GPU (paged attention, continuous batching,
tensor parallelism). A PRIME directory is already a Hugging Face model directory, so
nothing is converted: this module only decides what vLLM is started on and with which
arguments, with the rules `prime serve` has:

- the same key rule (another address than loopback needs an API key), and the key goes
  to vLLM through $VLLM_API_KEY, not its command line, where `ps` would show it;
- the same served name: `--served-model-name`, else the model's name;
- every file vLLM will read checked against prime.json's sha256 first, and a weight
  file prime.json does not list refused, as for the other backends;
- a model that ships merged weights is served as it is; one that ships only a LoRA
  adapter (Reactor Core's `merge_adapter: false`) is its base (`base_folder`) with the
  adapter as a vLLM LoRA module under the served name (`--enable-lora --lora-modules`);
- a model that calls tools (Hermes format, `prime.json` `tools`) gets vLLM's hermes
  tool parser; a thinking model with `<think>` markers gets its reasoning parser, so
  replies carry `reasoning_content` as `prime serve`'s do.

vLLM's wheels are CUDA builds: where it is not installed `find_vllm` says so, and what
to run instead. JARVIS talks to either server the same way (`jarvis chat --backend-url`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from jarvis_prime.errors import PrimeError
from jarvis_prime.manifest import PrimeManifest, has_merged_weights, refuse_unlisted_weights, verify_files

VLLM_API_KEY_ENV = "VLLM_API_KEY"
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's --max-lora-rank accepts
THINK_MARKERS = ("<think>", "</think>")  # what vLLM's deepseek_r1 reasoning parser splits at

NOT_INSTALLED = (
    "vLLM is not installed here: its wheels are CUDA builds, for Linux machines with an NVIDIA GPU "
    "(`pip install vllm` there). On this machine serve with `prime serve NAME` (llama.cpp or transformers)."
)


class VllmError(PrimeError):
    """vLLM cannot serve this model here, and why."""


@dataclass(frozen=True)
class VllmServer:
    """What to start: vLLM's arguments (after the executable) and the environment it adds."""

    args: list[str]
    env: dict[str, str]


def find_vllm() -> list[str]:
    """How to start vLLM's server here: `vllm serve` on PATH, else its module; VllmError if neither."""
    found = shutil.which("vllm")
    if found:
        return [found, "serve"]
    if importlib.util.find_spec("vllm") is not None:
        return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve"]
    raise VllmError(NOT_INSTALLED)


def _adapter_rank(model_dir: Path) -> int:
    config = json.loads((model_dir / "adapter/adapter_config.json").read_text(encoding="utf-8"))
    rank = int(config.get("r", 8))
    fits = [r for r in LORA_RANKS if r >= rank]
    if not fits:
        raise VllmError(f"{model_dir / 'adapter/adapter_config.json'}: LoRA rank {rank} is over vLLM's "
                        f"largest, {LORA_RANKS[-1]}")
    return fits[0]


def vllm_server(model_dir: Path, manifest: PrimeManifest, *, host: str, port: int, served_name: str | None,
                api_key: str | None, context_length: int | None, base_dir: Path | None = None) -> VllmServer:
    """vLLM's arguments for `model_dir`, once its files are verified.

    `base_dir`: for an adapter-only model, the base's folder when the store has it (else
    the base is passed as prime.json names it, a Hub id vLLM downloads).
    """
    name = served_name or manifest.name
    refuse_unlisted_weights(model_dir, manifest)
    verify_files(model_dir, manifest)
    lora = []
    if has_merged_weights(manifest):
        model = str(model_dir)
    elif "adapter/adapter_config.json" in manifest.files:
        model = str(base_dir) if base_dir is not None else manifest.base
        lora = ["--enable-lora", "--lora-modules", f"{name}={model_dir / 'adapter'}",
                "--max-lora-rank", str(_adapter_rank(model_dir))]
    else:
        ggufs = [q.file for q in manifest.quantizations.values() if q.format == "gguf"]
        what = f"only GGUF weights ({', '.join(ggufs)})" if ggufs else "no safetensors weights"
        raise VllmError(f"{model_dir}: {manifest.name} has {what}; vLLM serves Hugging Face safetensors models. "
                        f"Serve it with `prime serve {manifest.name}` (llama.cpp)")
    args = [model, "--host", host, "--port", str(port)]
    # an adapter-only model: the base answers under its own name, the adapter under the served one
    args += ["--served-model-name", f"{name}-base" if lora else name, *lora]
    if (model_dir / "chat_template.jinja").is_file() and "chat_template.jinja" in manifest.files:
        args += ["--chat-template", str(model_dir / "chat_template.jinja")]
    if context_length:
        args += ["--max-model-len", str(context_length)]
    if manifest.tools:
        args += ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    if manifest.thinking is not None and (manifest.thinking.start, manifest.thinking.end) == THINK_MARKERS:
        args += ["--reasoning-parser", "deepseek_r1"]
    return VllmServer(args, {VLLM_API_KEY_ENV: api_key} if api_key else {})


def base_folder(model_dir: Path, manifest: PrimeManifest) -> Path | None:
    """An adapter-only model's base as a folder vLLM can load: the path prime.json names,
    else the store's model of that name, else the store's copy of the base Reactor Core
    recorded by name and version (a launched VM's `base` is its staged
    `model/<name>-<version>`), checked as `prime pull --from` checks it (`check_base`: its
    files, and the weights' sha256 recorded at training); None for a Hub id (vLLM
    downloads it)."""
    from jarvis_prime.store import find_local
    from jarvis_prime.store.index import check_base

    source = manifest.lineage.source
    recorded = f"{source['name']}-{source['version']}" if source.get("name") and source.get("version") else None
    for base in filter(None, (manifest.base, recorded)):
        path = Path(base).expanduser()
        if not path.is_dir():
            local = find_local(base)
            path = local.path if local is not None else None
        if path is not None and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
            check_base(path, model_dir, manifest)
            return path
    return None


def exec_vllm(command: list[str], server: VllmServer) -> None:
    """Replace this process with vLLM's server (its signals and exit code are the server's)."""
    env = {**os.environ, **server.env}
    if not server.env:
        env.pop(VLLM_API_KEY_ENV, None)  # no key asked for: none inherited either
    os.execvpe(command[0], [*command, *server.args], env)
