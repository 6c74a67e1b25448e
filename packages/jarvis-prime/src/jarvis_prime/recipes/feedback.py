"""The feedback recipe: a candidate version of a chat model from its users' feedback.

    prime train prime-135m-chat-v1 --sft sft.jsonl --dpo dpo.jsonl --work-dir DIR

(the files `jarvis export-data` writes). Two Reactor Core runs from the current
model's weights: LoRA SFT on the thumbs-up and corrected replies, then LoRA DPO on the
preference pairs starting from the SFT result. Feedback is the dirtiest data there is
(the same question rated twice, a regenerated reply, an e-mail address pasted into a
chat), so each stage's data goes through Reactor Core's data pipeline first: exact and
near duplicates, filters, PII scrub, and decontamination against `eval_data/`, which
the candidate is then judged on (each stage is skipped when its file is
missing or empty). The candidate is a PRIME directory in `DIR/candidate` with a q8_0
GGUF; it does not enter the store: `jarvis improve` promotes it only if it evaluates
better. Every stage resumes (Reactor Core checkpoints), and a finished stage is not
run again.

Replies that called tools come in OpenAI's shape (`tools`, `tool_calls`, `role: tool`).
A model whose chat template renders tools trains on them as they are (Reactor Core
renders them with `tools=`); for one whose template knows none (SmolLM2's ChatML, the
135M chat model) the SFT file is first rendered into plain turns by `hermes_messages`,
the function `PrimeModel.chat_with_tools` prompts that model with, so a round of
feedback trains on the tokens JARVIS sends it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from jarvis_prime.errors import PrimeError
from jarvis_prime.export import export_gguf
from jarvis_prime.models.chat_template import ChatTemplate
from jarvis_prime.models.tools import hermes_messages
from jarvis_prime.progress import Log
from jarvis_prime.recipes import ATTENTION_ONLY, data_pipeline, require_reactor_core
from jarvis_prime.store import find_local, resolve



@dataclass(frozen=True)
class FeedbackRecipe:
    """Deliberately gentle: a few hundred user turns must not wash out what the model knew."""

    lora_rank: int = 8
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] = ATTENTION_ONLY
    sft_epochs: int = 3
    sft_learning_rate: float = 3e-4
    dpo_epochs: int = 2
    dpo_learning_rate: float = 5e-5
    dpo_beta: float = 0.1
    batch_size: int = 4
    max_seq_length: int = 1024
    min_steps: int = 30  # per stage: a handful of corrections still gets enough passes to take
    max_steps: int | None = None  # per stage; quick runs cap it
    seed: int = 42

    def epochs(self, examples: int, at_least: int) -> int:
        """`at_least` epochs, more when the data is too small for `min_steps` steps."""
        per_epoch = -(-examples // self.batch_size)
        return max(at_least, -(-self.min_steps // per_epoch))


def _lines(path: Path | None) -> int:
    if path is None or not Path(path).is_file():
        return 0
    return sum(1 for line in open(path, encoding="utf-8") if line.strip())


def train_from_feedback(current: str, work_dir: Path, *, sft: Path | None, dpo: Path | None,
                        recipe: FeedbackRecipe = FeedbackRecipe(), version: str | None = None,
                        log: Log = print, progress: bool = True) -> dict[str, Any]:
    """Train the candidate; returns a summary with `model_dir` (the candidate PRIME dir)."""
    work_dir = Path(work_dir)
    summary_path = work_dir / "candidate.json"
    if summary_path.is_file():
        log(f"candidate already trained: {summary_path}")
        return json.loads(summary_path.read_text())
    n_sft, n_dpo = _lines(sft), _lines(dpo)
    if n_sft == 0 and n_dpo == 0:
        raise PrimeError("no feedback to train on: rate, correct or regenerate some replies first "
                         "(the SFT and DPO files are empty)")
    reactor_core = require_reactor_core()
    base = resolve(current, log=log)
    name = base.manifest.name
    version = version or _next_free_version(name, base.manifest.version)
    common = dict(
        output_name=name, output_version=version, use_lora=True, lora_rank=recipe.lora_rank,
        lora_alpha=recipe.lora_alpha, lora_dropout=0.0, target_modules=list(recipe.target_modules),
        batch_size=recipe.batch_size, max_seq_length=recipe.max_seq_length, packing=False, val_fraction=0.0,
        seed=recipe.seed, resume="auto", num_samples=0, on_bad_example="skip", max_steps=recipe.max_steps, warmup_steps=2,
        checkpoint_every_minutes=2.0,
    )
    model_dir = base.path
    stages = []
    if n_sft:
        sft = prerender_tool_calls(Path(sft), base.path, work_dir / "sft-rendered.jsonl")
        log(f"SFT on {n_sft} examples from {name} {base.manifest.version}")
        model_dir = _stage(reactor_core, work_dir / "sft", progress, model_name=str(model_dir), data_path=str(sft),
                           num_epochs=recipe.epochs(n_sft, recipe.sft_epochs), learning_rate=recipe.sft_learning_rate,
                           data_pipeline=data_pipeline("chat", work_dir), **common)
        stages.append("sft")
    if n_dpo:
        log(f"DPO on {n_dpo} preference pairs")
        model_dir = _stage(reactor_core, work_dir / "dpo", progress, model_name=str(model_dir), data_path=str(dpo),
                           method="dpo", beta=recipe.dpo_beta, num_epochs=recipe.epochs(n_dpo, recipe.dpo_epochs),
                           learning_rate=recipe.dpo_learning_rate, data_pipeline=data_pipeline("preference", work_dir), **common)
        stages.append("dpo")
    log("exporting the candidate's q8_0 GGUF")
    export_gguf(model_dir, ["q8_0"], log=log, progress=progress)
    summary = {"model_dir": str(model_dir), "name": name, "version": version, "from": str(base.path),
               "from_version": base.manifest.version, "stages": stages, "sft_examples": n_sft,
               "dpo_pairs": n_dpo, "recipe": asdict(recipe)}
    summary_path.write_text(json.dumps(summary, indent=1))
    return summary


def prerender_tool_calls(sft: Path, model_dir: Path, out: Path) -> Path:
    """`sft` itself, or, when it holds tool calls and the model's chat template renders no
    tools, a copy in `out` with each such record as plain turns in the Hermes format."""
    template = model_dir / "chat_template.jinja"
    if template.is_file() and ChatTemplate(template.read_text(encoding="utf-8"), {}).knows_tools:
        return sft
    records = [json.loads(line) for line in open(sft, encoding="utf-8") if line.strip()]
    if not any("tools" in r or any(m.get("role") == "tool" or m.get("tool_calls") for m in r.get("messages", []))
               for r in records):
        return sft
    rendered = [{"messages": hermes_messages(r["messages"], r.get("tools"))} if "messages" in r else r for r in records]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rendered), encoding="utf-8")
    return out


def _stage(reactor_core, out: Path, progress: bool, **config: Any) -> Path:
    """One Reactor Core run, or its result when an earlier run finished it."""
    done = out / "done.json"
    if done.is_file():
        return Path(json.loads(done.read_text())["model_dir"])
    result = reactor_core.Trainer(reactor_core.TrainingConfig(output_dir=str(out), **config), progress=progress).train()
    if result.model_dir is None:  # interrupted: its checkpoint is where the next run resumes
        raise PrimeError(f"training in {out} was interrupted; run the same command again to resume")
    done.write_text(json.dumps({"model_dir": str(result.model_dir)}))
    return Path(result.model_dir)


def _next_free_version(name: str, version: str) -> str:
    """1.0.0 -> 1.1.0 (a feedback round is a minor version of the same model), or the
    next minor after that which the store does not hold yet."""
    major, minor = ([int(p) if p.isdigit() else 0 for p in version.split(".")] + [0, 0])[:2]
    while True:
        minor += 1
        candidate = f"{major}.{minor}.0"
        if find_local(f"{name}-{candidate}") is None:
            return candidate
