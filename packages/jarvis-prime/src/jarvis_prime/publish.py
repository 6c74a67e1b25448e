"""`prime push NAME --repo user/name`: a PRIME model as a Hugging Face Hub repository.

The repository is the PRIME directory as it is (safetensors, config, tokenizer, chat
template, `gguf/*.gguf`, `prime.json` with every sha256), plus a README.md model card
generated from `prime.json`: base model, lineage, eval results and the quantization
table. So the repo loads with plain `AutoModelForCausalLM.from_pretrained`, with
llama.cpp (any GGUF), and with `prime pull --from` after a download.

huggingface_hub does the upload (`create_repo`, then one `upload_folder` commit); the
token comes from `--token`, `HF_TOKEN` or `hf auth login`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from jarvis_prime.manifest import PrimeManifest, read_manifest, verify_files
from jarvis_prime.progress import Log



def model_card(manifest: PrimeManifest) -> str:
    """README.md for the Hub: YAML metadata the Hub indexes, then what a user needs to know."""
    base = manifest.base
    lines = ["---", *_license_metadata(manifest), "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [jarvis, prime, gguf, llama-cpp]"]
    if "/" in base:
        lines.append(f"base_model: {base}")
    lines += ["---", "", f"# {manifest.name} {manifest.version}", "",
              f"A PRIME model of the JARVIS ecosystem ({manifest.task}), from `{base}`.", ""]
    lines += ["## License", "", _license_text(manifest), ""]
    lines += ["## Use it", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "model = AutoModelForCausalLM.from_pretrained(REPO)", "```", "",
              "```bash", f"llama-cli -m gguf/{manifest.name}-q4_k_m.gguf   # or any file under gguf/", "```", ""]
    lines += ["## Files", "", "| variant | file | format | bits | rounding |", "|---|---|---|---|---|"]
    for name, q in sorted(manifest.quantizations.items(), key=lambda kv: -kv[1].bits):
        rounding = f"importance matrix, {q.importance['tokens']} calibration tokens" if q.importance else "-"
        lines.append(f"| {name} | `{q.file}` | {q.format} | {q.bits} | {rounding} |")
    evals = manifest.metrics.get("eval", {})
    if evals:
        lines += ["", "## Evaluation (`prime eval`)", "",
                  "| variant | JARVIS suite | perplexity (general text) | decode tok/s |", "|---|---|---|---|"]
        for key, result in sorted(evals.items()):
            jarvis = result.get("jarvis", {})
            suite = f"{jarvis['score']:.1%} ({jarvis['suite']})" if jarvis else "-"
            ppl = f"{result['perplexity']['perplexity']:.2f}" if "perplexity" in result else "-"
            lines.append(f"| {key} | {suite} | {ppl} | {result.get('speed', {}).get('decode_tokens_per_s', 0):.0f} |")
    lineage = manifest.lineage
    lines += ["", "## Lineage", "", f"- parent: `{lineage.parent or base}`", f"- source: `{lineage.source}`"]
    for data in lineage.data:
        lines.append(f"- data: `{Path(str(data.get('path', '?'))).name}` sha256 `{data.get('sha256', '?')}`")
    if lineage.training_config:
        config = lineage.training_config
        keys = ("use_lora", "lora_rank", "num_epochs", "learning_rate", "max_seq_length", "method")
        lines.append("- training: " + ", ".join(f"{k}={config[k]}" for k in keys if k in config))
    lines += ["", "Every file's sha256 is in `prime.json`; JARVIS Prime verifies them before loading.", ""]
    return "\n".join(lines)


def _license_metadata(manifest: PrimeManifest) -> list[str]:
    """The card's `license:` lines: the base's recorded license (the Hub's ids are SPDX ids
    in lower case: Apache-2.0 -> apache-2.0), with its page; `other` when none was
    recorded, never a guess: a Llama derivative labelled Apache would mislead its users."""
    if manifest.license is None:
        return ["license: other", "license_name: unknown"]
    lines = [f"license: {manifest.license.lower()}"]
    if manifest.license_url:
        lines.append(f"license_link: {manifest.license_url}")
    return lines


def _license_text(manifest: PrimeManifest) -> str:
    source = manifest.lineage.source
    commit = f" at commit `{source['revision']}`" if source.get("kind") == "hub" and source.get("revision") else ""
    if manifest.license is None:
        return (f"Not recorded: this model was not pulled from the PRIME catalog. It inherits the license of "
                f"`{manifest.base}`; check it before you use or share it.")
    where = f" ({manifest.license_url})" if manifest.license_url else ""
    return f"{manifest.license}{where}, the license of the base model `{manifest.base}`{commit}."


def build_folder(model_dir: Path, out: Path) -> Path:
    """The repository's content in `out`: the verified PRIME files (hard links when
    possible, no copies of GBs) and the model card."""
    manifest = read_manifest(model_dir)
    verify_files(model_dir, manifest)
    out.mkdir(parents=True, exist_ok=True)
    for rel in [*manifest.files, "prime.json"]:
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(model_dir / rel, dst)
        except OSError:
            shutil.copyfile(model_dir / rel, dst)
    (out / "README.md").write_text(model_card(manifest), encoding="utf-8")
    return out


def push(model_dir: Path, repo_id: str, *, token: str | None = None, private: bool = False,
         endpoint: str | None = None, log: Log = lambda message: None) -> dict[str, Any]:
    """Create `repo_id` if needed and upload the model in one commit; returns the commit info."""
    from huggingface_hub import HfApi

    manifest = read_manifest(model_dir)
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="prime-push-") as tmp:
        folder = build_folder(model_dir, Path(tmp) / "repo")
        log(f"creating {repo_id} (if needed)")
        api.create_repo(repo_id, private=private, exist_ok=True)
        log(f"uploading {sum(1 for p in folder.rglob('*') if p.is_file())} files")
        commit = api.upload_folder(folder_path=folder, repo_id=repo_id,
                                   commit_message=f"{manifest.name} {manifest.version} (prime push)")
    return {"repo_id": repo_id, "commit_url": commit.commit_url, "commit": commit.oid}
