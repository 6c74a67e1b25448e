"""`prime train prime-7b-chat-v1`: the 7B JARVIS chat model, LoRA on Qwen2.5-7B-Instruct.

The recipe, top to bottom:

1. **Persona conversations**: the shipped JARVIS prompts (recipes/data/jarvis_prompts.json,
   none in the eval suite) answered by the base itself under the JARVIS system prompt
   (transformers, batched; greedy, then sampled candidates), kept when they pass the chat
   recipe's filters (`chat_model.rejection`: complete, short, no other identity, the
   expected answer, a refusal for unsafe requests), written *without* the system prompt
   so the tune is JARVIS when nobody says so. Self-distillation, as for the 135M model:
   a 7B instruct model already behaves as JARVIS when told to.
2. **JARVIS's own conversations**: `jarvis export-data` output (`--data`, chat SFT JSONL,
   images left out: the 7B model is a text model), appended as they are; Reactor Core
   validates every line and records each file's sha256 in the model's lineage.
3. **Training** with Reactor Core, planned from the machine (`reactor_core.env`'s profile):
   one CUDA GPU under 40 GB: QLoRA (NF4 base, ~5 GB for 7B); a larger GPU: LoRA on a bf16
   base; `--nproc N` or the `gcp-full` profile (a big-RAM GCP VM, spot or not): FSDP over N
   processes (torchrun), bf16 base, checkpoints every 5 minutes on a spot VM
   (`--checkpoint-remote gs://...` mirrors them so a fresh VM resumes). Reactor Core's
   memory estimate refuses a plan that cannot fit before anything loads.
4. **The store**: the PRIME directory (merged weights, adapter, lineage, the base's license
   from the catalog) as `prime-7b-chat-v1`, then its GGUF files: q8_0 and q4_k_m (importance
   matrix), what `quantization="8bit"|"4bit"` loads on a Mac or a CPU. Exporting where the
   model was trained keeps the merged fp16 weights (15 GB for 7B) off the laptop.

`base` can be overridden (tests run the whole recipe on a tiny random Qwen2 on CPU).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from jarvis_prime.catalog import load_catalog
from jarvis_prime.errors import PrimeError
from jarvis_prime.export import export_gguf
from jarvis_prime.files import sha256_file
from jarvis_prime.persona import load_prompts
from jarvis_prime.progress import Log
from jarvis_prime.recipes import data_pipeline, require_reactor_core
from jarvis_prime.recipes.chat_model import GENERATION_SYSTEM_PROMPT, DatasetReport, rejection
from jarvis_prime.store import import_path

QLORA_BELOW_GPU_GB = 40.0  # a bf16 7B base (~15 GB) + activations fits 40 GB and up; below, NF4 (~5 GB)
FSDP_PROCESSES_ON_GCP_FULL = 2


@dataclass(frozen=True)
class BigChatRecipe:
    name: str
    base: str  # a Reactor Core model name: Hub id, short name or directory
    lora_rank: int = 16
    lora_alpha: float = 32.0
    target_modules: str = "auto"  # every attention and MLP projection: what QLoRA found matches full tuning
    num_epochs: int = 3
    learning_rate: float = 1e-4
    batch_size: int = 4
    gradient_accumulation_steps: int = 4
    max_seq_length: int = 1024
    candidates: int = 4  # replies generated per prompt until one passes the filters
    max_new_tokens: int = 160
    generation_batch: int = 16
    seed: int = 0
    max_steps: int | None = None  # tests run a few steps of the same recipe
    max_prompts: int | None = None  # tests put the first few prompts to a tiny base (CPU generation is the slow part)
    quants: tuple[str, ...] = ("q8_0", "q4_k_m")  # the GGUF files written after training (empty: none)
    tokenizer_pre: str | None = None  # llama.cpp's pre-tokenizer, for a tokenizer its converter does not recognise


BIG_RECIPES = {"prime-7b-chat-v1": BigChatRecipe(name="prime-7b-chat-v1", base="Qwen/Qwen2.5-7B-Instruct")}


@dataclass(frozen=True)
class Plan:
    """How the run uses the machine: TrainingConfig keys and the processes."""

    mode: str  # qlora | lora-bf16 | fsdp | lora
    nproc: int
    keys: dict[str, Any] = field(default_factory=dict)
    why: str = ""


def plan_run(profile_name: str, gpu_gb: float, nproc: int | None) -> Plan:
    """The run's shape on a machine with Reactor Core's profile `profile_name` and
    `gpu_gb` GB on its first CUDA GPU (0 without one); `nproc` as the user gave it."""
    spot = profile_name.endswith("-spot")
    if nproc is None and profile_name.startswith("gcp-full"):
        nproc = FSDP_PROCESSES_ON_GCP_FULL
    nproc = nproc or 1
    common = {"gradient_checkpointing": True, "base_dtype": "bfloat16"}
    if nproc > 1:
        keys = common | ({"checkpoint_every_minutes": 5.0, "watch_gcp_preemption": True} if spot else {})
        return Plan("fsdp", nproc, keys, f"FSDP over {nproc} processes (bf16 base, shards of weights and AdamW state)"
                    + ("; spot VM: checkpoints every 5 min, preemption watched" if spot else ""))
    if profile_name.startswith("cuda") and gpu_gb < QLORA_BELOW_GPU_GB:
        return Plan("qlora", 1, common | {"quantize_base": True},
                    f"QLoRA: one {gpu_gb:.0f} GB GPU (< {QLORA_BELOW_GPU_GB:.0f} GB), base in 4-bit NF4")
    if profile_name.startswith("cuda"):
        return Plan("lora-bf16", 1, common, f"LoRA on a bf16 base: one {gpu_gb:.0f} GB GPU")
    return Plan("lora", 1, {"gradient_checkpointing": True},
                f"LoRA on {profile_name} (base dtype: auto); Reactor Core's memory estimate says whether it fits")


def machine_plan(nproc: int | None) -> Plan:
    from reactor_core.env import detect_environment, recommend_profile

    env = detect_environment()
    gpu_gb = env.cuda_gpus[0].memory_gb if env.cuda_gpus else 0.0
    return plan_run(recommend_profile(env).name, gpu_gb, nproc)


def generate_persona_data(model_dir: Path, recipe: BigChatRecipe, out: Path, *, log: Log = print) -> DatasetReport:
    """Step 1: the base's own replies to the JARVIS prompts under the system prompt, filtered,
    written as user -> reply conversations (no system prompt)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 device_map={"": 0} if cuda else None).eval()
    prompts = load_prompts()[:recipe.max_prompts]
    report = DatasetReport(prompts=len(prompts))
    kept: dict[int, str] = {}
    torch.manual_seed(recipe.seed)
    for attempt in range(recipe.candidates):
        pending = [i for i in range(len(prompts)) if i not in kept]
        for start in range(0, len(pending), recipe.generation_batch):
            chunk = pending[start:start + recipe.generation_batch]
            texts = [tokenizer.apply_chat_template([{"role": "system", "content": GENERATION_SYSTEM_PROMPT},
                                                    {"role": "user", "content": prompts[i]["prompt"]}],
                                                   tokenize=False, add_generation_prompt=True) for i in chunk]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            sampling = {"do_sample": False} if attempt == 0 else {"do_sample": True, "temperature": 0.8, "top_p": 0.95}
            with torch.no_grad():
                output = model.generate(**batch, max_new_tokens=recipe.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                        **sampling)
            for i, row in zip(chunk, output[:, batch["input_ids"].shape[1]:]):
                ids = row.tolist()
                stopped = tokenizer.eos_token_id in ids
                text = tokenizer.decode(ids[:ids.index(tokenizer.eos_token_id)] if stopped else ids, skip_special_tokens=True)
                reason = rejection(prompts[i], text, "stop" if stopped else "length")
                if reason is None:
                    kept[i] = text.strip()
                else:
                    report.rejections[reason] = report.rejections.get(reason, 0) + 1
    del model
    if cuda:
        torch.cuda.empty_cache()  # the training run loads the base again, maybe in 4 bits
    rows = []
    for i, prompt in enumerate(prompts):
        counts = report.by_category.setdefault(prompt["category"], [0, 0])
        counts[1] += 1
        if i in kept:
            counts[0] += 1
            rows.append({"messages": [{"role": "user", "content": prompt["prompt"]},
                                      {"role": "assistant", "content": kept[i]}]})
    report.kept = len(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    report.sha256 = sha256_file(out)
    log(f"persona data: {report.kept}/{report.prompts} prompts kept "
        + ", ".join(f"{c} {k}/{n}" for c, (k, n) in report.by_category.items()))
    return report


def merge_data(persona: Path, extra: list[Path], out: Path) -> int:
    """The persona conversations and every `jarvis export-data` file, one JSONL (lines as
    they are: Reactor Core validates them, `file:line`, before training)."""
    lines = []
    for path in [persona, *extra]:
        if not path.is_file():
            raise PrimeError(f"{path}: no such data file")
        lines += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise PrimeError("no training conversations: the base kept no persona reply and no --data was given")
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return len(lines)


def train_big_chat_model(name: str, work_dir: Path, *, data: list[Path] | None = None, base: str | None = None,
                         nproc: int | None = None, checkpoint_remote: str | None = None, fresh: bool = False,
                         recipe: BigChatRecipe | None = None, log: Log = print, progress: bool = True) -> dict[str, Any]:
    """Generate the persona data, add `data`, train with the machine's plan, put the model in the store."""
    if name not in BIG_RECIPES:
        raise PrimeError(f"no training recipe for {name!r}; recipes: {', '.join(BIG_RECIPES)}")
    recipe = recipe or BIG_RECIPES[name]
    if base:
        recipe = replace(recipe, base=base)
    reactor_core = require_reactor_core()
    from reactor_core.training.model import fetch_hub_model, resolve_model_source

    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    plan = machine_plan(nproc)
    log(f"plan: {plan.why}")
    source = fetch_hub_model(resolve_model_source(recipe.base))  # the Hub base downloads once, safetensors only
    persona = work_dir / "jarvis-persona.jsonl"
    report_path = work_dir / "persona-report.json"
    if persona.is_file() and report_path.is_file() and not fresh:
        log(f"1/3 reusing {persona} (--fresh regenerates it)")
        report = DatasetReport(**json.loads(report_path.read_text()))
    else:
        log(f"1/3 generating replies with {recipe.base} under the JARVIS system prompt")
        report = generate_persona_data(Path(source.location), recipe, persona, log=log)
        report_path.write_text(json.dumps(asdict(report), indent=1))
    train_path = work_dir / "train.jsonl"
    count = merge_data(persona, [Path(p) for p in data or []], train_path)
    log(f"2/3 training on {count} conversations ({report.kept} persona, {count - report.kept} from --data)")
    keys: dict[str, Any] = dict(
        model_name=source.location, data_path=str(train_path), output_dir=str(work_dir / "reactor-output"),
        output_name=name, output_version="1.0.0", use_lora=True, lora_rank=recipe.lora_rank,
        lora_alpha=recipe.lora_alpha, lora_dropout=0.05, target_modules=recipe.target_modules,
        num_epochs=recipe.num_epochs, learning_rate=recipe.learning_rate, batch_size=recipe.batch_size,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps, max_seq_length=recipe.max_seq_length,
        warmup_steps=10, val_fraction=0.05, seed=recipe.seed, num_samples=2, max_steps=recipe.max_steps,
        checkpoint_every_steps=50, checkpoint_remote=checkpoint_remote,
        data_pipeline=data_pipeline("chat", work_dir),  # exported conversations repeat themselves; eval_data stays unseen
    ) | plan.keys
    if plan.nproc > 1:
        from reactor_core.training.launch import launch_torchrun

        recipe_yaml = work_dir / "recipe.yaml"
        recipe_yaml.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in keys.items()))
        code = launch_torchrun(str(recipe_yaml), [], plan.nproc)
        if code != 0:
            raise PrimeError(f"training exited with code {code}" + (" (preempted: run the same command again to "
                                                                    "resume)" if code == 75 else ""))
        model_dir = Path(keys["output_dir"]) / f"{name}-1.0.0"
        metrics = json.loads((model_dir / "prime.json").read_text())["metrics"]
    else:
        result = reactor_core.Trainer(reactor_core.TrainingConfig(**keys), progress=progress).train()
        model_dir, metrics = result.model_dir, result.metrics

    log("3/3 adding it to the store")
    entry = load_catalog().find(name)
    licensing = ({"license": entry.license, "license_url": entry.license_url}
                 if entry is not None and entry.base == recipe.base else {})  # another base: its license is unknown here
    local = import_path(model_dir, name=name, version="1.0.0", task="chat", base=recipe.base, log=log, force=True,
                        **licensing)
    if recipe.quants:
        export_gguf(local.path, list(recipe.quants), tokenizer_pre=recipe.tokenizer_pre, log=log, progress=progress)
    return {"recipe": asdict(recipe), "plan": asdict(plan), "persona": asdict(report), "conversations": count,
            "model_dir": str(local.path),
            "train_metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
