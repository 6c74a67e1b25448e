"""`prime train prime-135m-reasoning-v1`: arithmetic word problems, reasoned in `<think>`.

SmolLM2-135M-Instruct gets one- to three-step word problems (add, subtract, multiply,
divide, "twice", "half", "each", "left") wrong more often than right when asked
directly or step by step. The recipe, top to bottom, one stage a function:

1. **Data** (`reasoning_data`): seeded problems with their step-by-step solutions
   (`<think>` one line of arithmetic per step `</think>` "The answer is N."), a held-out
   split whose templates and wordings training never sees, and GRPO prompts with their
   checked answers.
2. **SFT**: LoRA with Reactor Core on the solutions (the loss on the reply only), the data
   first through Reactor Core's data pipeline (`data_pipeline("reasoning")`): exact repeats
   go, and any problem whose question is one every model is scored on (held-out split,
   `--problems`, eval_data/).
3. **GRPO** (not a stage yet, issue #22): Reactor Core has `method: grpo`, and a GRPO
   stage would start from the SFT model directory on grpo.jsonl with its keys
   (`num_generations`, `reward_funcs`, ...). Two things stand before it: `train_stage`
   passes SFT's keys and train.jsonl only, and `--ship` ships one adapter, so the GRPO
   stage's LoRA (trained on the merged SFT model) must be folded into it first. It ran on
   this model at about 2 minutes a step on 2 CPU cores: too slow to measure here.
4. **Store**: the last stage's model becomes a PRIME directory (`task: reasoning`, its
   `thinking` tags recorded), exported to GGUF.
5. **Held-out score** through the default llama.cpp backend, greedy, every model's
   reply read by the same `jarvis_prime.answers.extract_answer`: this model on the bare
   question, the base and prime-135m-chat-v1 on the bare question and with the
   step-by-step instruction, on the same problems; and every one of them on JARVIS's
   own word problems (`reasoning_problems.json`, written apart from this generator).

`--ship` (maintainers) writes the float16 adapter and training.json (with every figure
above) into `jarvis_prime/adapters/<name>/`, where the catalog's `adapter` source merges
it into the base on `prime pull`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Sequence

from jarvis_prime.answers import STEP_BY_STEP, THINK_END, THINK_START, extract_answer
from jarvis_prime.errors import PrimeError
from jarvis_prime.progress import Log
from jarvis_prime.files import atomic_write
from jarvis_prime.recipes import ATTENTION_ONLY, data_pipeline, require_reactor_core

Prompting = Literal["direct", "step-by-step"]
THINKING = {"start": THINK_START, "end": THINK_END}
QUANTS = ("q8_0", "q4_k_m")


@dataclass(frozen=True)
class Stage:
    """One Reactor Core run; each starts from the model the stage before it wrote."""
    method: Literal["sft"]  # GRPO: what a stage of it needs first is in the module docstring, step 3
    learning_rate: float = 1e-3
    num_epochs: int = 1
    # packed rows of max_seq_length tokens: 4 x 512 is ~19 problems a step, ~11 s a step on 2 CPU cores
    batch_size: int = 4
    max_seq_length: int = 512
    warmup_steps: int = 10
    max_steps: int | None = None  # tests run a few steps of the same recipe


@dataclass(frozen=True)
class ReasoningRecipe:
    name: str
    base: str
    # the catalog entry's version: a shipped retrain is a new version, so `prime pull` builds it beside
    # the old one instead of keeping a store's older copy (1.1.0: data version 4, 65 % held-out)
    version: str = "1.1.0"
    stages: tuple[Stage, ...] = (Stage("sft"),)
    # ~115 tokens a problem (chat template included): 5000 problems are ~580k tokens, ~32 minutes on 2 CPU
    # cores; data version 3 has 253 training wordings (76 before), so each is seen ~20 times
    train_examples: int = 5000
    heldout_examples: int = 120
    grpo_prompts: int = 1000
    data_seed: int = 0
    lora_rank: int = 16
    lora_alpha: float = 32.0
    # attention and MLP: arithmetic is more than a change of tone (the chat model's choice, ATTENTION_ONLY,
    # keeps its persona tune gentle; this one must learn a skill)
    target_modules: tuple[str, ...] = ATTENTION_ONLY + ("gate_proj", "up_proj", "down_proj")
    seed: int = 0
    max_new_tokens: int = 160  # a three-step solution is ~70 tokens; the chat models' step-by-step replies are longer
    compare_with: tuple[str, ...] = ("smollm2-135m-instruct", "prime-135m-chat-v1")
    compare_prompting: tuple[Prompting, ...] = ("direct", "step-by-step")
    heldout_limit: int | None = None  # tests score a few problems


RECIPES = {"prime-135m-reasoning-v1": ReasoningRecipe(name="prime-135m-reasoning-v1", base="smollm2-135m-instruct")}


def train_reasoning_model(name: str, work_dir: Path, *, ship: bool = False, fresh: bool = False, log: Log = print,
                          progress: bool = True, recipe: ReasoningRecipe | None = None,
                          also_score: Path | None = None) -> dict[str, Any]:
    """All five stages; data already in `work_dir` is reused unless `fresh`. `recipe`
    replaces the named one (tests run a small copy of it on a tiny model). `also_score`:
    more problems every model is scored on, written by someone else (`prime train
    --problems`, e.g. jarvis/data/reasoning_problems.json; see `load_problem_file`)."""
    from jarvis_prime.export import export_gguf
    from jarvis_prime.recipes.reasoning_data import build_reasoning_dataset, load_problems
    from jarvis_prime.store import import_path, resolve

    if name not in RECIPES:
        raise PrimeError(f"no training recipe for {name!r}; recipes: {', '.join(RECIPES)}")
    recipe = recipe or RECIPES[name]
    require_reactor_core()
    work_dir = Path(work_dir)
    data_dir = work_dir / "data"
    base = resolve(recipe.base, log=log)
    started = time.perf_counter()

    if fresh or not (data_dir / "dataset-report.json").is_file():
        log(f"1/5 writing {recipe.train_examples} training and {recipe.heldout_examples} held-out problems, "
            f"{recipe.grpo_prompts} GRPO prompts")
        dataset = build_reasoning_dataset(data_dir, train=recipe.train_examples, heldout=recipe.heldout_examples,
                                          grpo=recipe.grpo_prompts, seed=recipe.data_seed, log=log)
    else:
        log(f"1/5 reusing {data_dir} (--fresh writes it again)")
        dataset = json.loads((data_dir / "dataset-report.json").read_text())

    all_heldout = load_problems(data_dir / "heldout.jsonl")
    extra = load_problem_file(also_score) if also_score else []
    scored = write_scored_questions(data_dir / "scored-questions.json", all_heldout, extra)  # never trained on
    model_dir, metrics = Path(base.path), {}
    for index, stage in enumerate(recipe.stages):
        log(f"2/5 stage {index + 1}/{len(recipe.stages)}: {stage.method} with Reactor Core")
        result = train_stage(recipe, stage, model_dir, data_dir / "train.jsonl",
                             work_dir / f"stage-{index + 1}-{stage.method}", progress=progress, eval_files=[scored])
        model_dir, metrics = Path(result.model_dir), {**metrics, stage.method: _numbers(result.metrics)}

    log("4/5 adding it to the store")
    local = import_path(model_dir, name=name, version=recipe.version, task="reasoning", base=base.manifest.base, log=log,
                        force=True)
    record_thinking(local.path)
    export_gguf(local.path, list(QUANTS), log=log, progress=progress)

    log("5/5 scoring the held-out problems through llama.cpp (greedy)")
    scores = compare_models(local.path, all_heldout[: recipe.heldout_limit], recipe, extra=extra, log=log)
    summary = {"recipe": asdict(recipe), "dataset": dataset, "model_dir": str(local.path), "train_metrics": metrics,
               "heldout": scores, "wall_seconds": round(time.perf_counter() - started, 1)}
    if ship:
        from jarvis_prime.recipes.chat_model import ship_adapter

        summary["shipped"] = str(ship_adapter(model_dir / "adapter", name, summary, base=recipe.base))
    return summary


def write_scored_questions(path: Path, *problem_sets: Sequence[dict[str, Any]]) -> Path:
    """The questions models are scored on, one JSON list: what the data pipeline must keep out
    of training. Questions only: a held-out solution is the same text as a training one
    whenever the arithmetic is the same (72 of 3000 training solutions, seed 0), which is the
    skill being taught, not a leak."""
    atomic_write(path, json.dumps([p["question"] for problems in problem_sets for p in problems], ensure_ascii=False))
    return path


def train_stage(recipe: ReasoningRecipe, stage: Stage, model_name: Path, data_path: Path, output_dir: Path,
                *, progress: bool = True, eval_files: Sequence[Path] = ()):
    """One Reactor Core run of `stage` from `model_name` (a PRIME directory) -> its TrainingResult."""
    reactor_core = require_reactor_core()
    config = stage_config(recipe, stage, model_name, data_path, output_dir, eval_files=eval_files)
    return reactor_core.Trainer(config, progress=progress).train()


def stage_config(recipe: ReasoningRecipe, stage: Stage, model_name: Path, data_path: Path, output_dir: Path,
                 *, eval_files: Sequence[Path] = ()):
    """`stage`'s Reactor Core TrainingConfig; its data cleaned first, decontaminated against
    `eval_files` and eval_data/ (`data_pipeline("reasoning")`)."""
    reactor_core = require_reactor_core()
    return reactor_core.TrainingConfig(
        model_name=str(model_name), data_path=str(data_path), output_dir=str(output_dir), method=stage.method,
        output_name=recipe.name, output_version=recipe.version, use_lora=True, lora_rank=recipe.lora_rank,
        lora_alpha=recipe.lora_alpha, lora_dropout=0.0, target_modules=list(recipe.target_modules),
        num_epochs=stage.num_epochs, learning_rate=stage.learning_rate, batch_size=stage.batch_size,
        max_seq_length=stage.max_seq_length, packing=True, warmup_steps=stage.warmup_steps, val_fraction=0.02,
        eval_every_steps=100, seed=recipe.seed, resume="never", num_samples=1, sample_max_new_tokens=80,
        max_steps=stage.max_steps, data_pipeline=data_pipeline("reasoning", data_path.parent, eval_files),
    )


def record_thinking(model_dir: Path) -> None:
    """prime.json says which tags the model thinks between (`thinking`), so a server or
    JARVIS can keep the thinking apart from the answer."""
    from jarvis_prime.manifest import read_manifest, write_manifest
    from jarvis_prime.thinking import ThinkingMarkers

    manifest = read_manifest(model_dir)
    write_manifest(model_dir, manifest.model_copy(update={"thinking": ThinkingMarkers(**THINKING)}), changed=[])


def question_messages(question: str, prompting: Prompting) -> list[dict[str, str]]:
    """The one user turn a model is asked: the bare question, or with the step-by-step
    instruction (what `jarvis` adds for /think)."""
    return [{"role": "user", "content": question if prompting == "direct" else f"{question}\n\n{STEP_BY_STEP}"}]


def score_problems(model, problems: Sequence[dict[str, Any]], prompting: Prompting = "direct",
                   max_new_tokens: int = 160) -> dict[str, Any]:
    """Greedy exact-answer accuracy of `model` on `problems` ({"question", "answer", ...}),
    read by `extract_answer`; by template structure when the problems carry one."""
    right, by_structure, started = 0, {}, time.perf_counter()
    for p in problems:
        reply = model.chat(question_messages(p["question"], prompting), max_new_tokens=max_new_tokens, temperature=0.0)
        ok = extract_answer(reply) == p["answer"]
        right += ok
        key = p.get("template", "").split("/")[0] or p.get("kind", "all")
        counts = by_structure.setdefault(key, [0, 0])
        counts[0], counts[1] = counts[0] + ok, counts[1] + 1
    n = max(len(problems), 1)
    return {"accuracy": right / n, "correct": right, "problems": len(problems),
            "seconds_per_problem": (time.perf_counter() - started) / n,
            "by_structure": {k: c / t for k, (c, t) in sorted(by_structure.items())}}


def compare_models(model_dir: Path, heldout: Sequence[dict[str, Any]], recipe: ReasoningRecipe, *,
                   extra: Sequence[dict[str, Any]] = (), log: Log = print) -> dict[str, Any]:
    """The reasoning model (bare question) and each comparison model (each prompting), on
    the held-out problems and the `extra` ones, all on the default llama.cpp file."""
    from jarvis_prime.models.prime_model import PrimeModel

    runs: list[tuple[str, str | Path, Prompting]] = [(recipe.name, model_dir, "direct")]
    runs += [(other, other, prompting) for other in recipe.compare_with for prompting in recipe.compare_prompting]
    rows = []
    for label, model_ref, prompting in runs:
        with PrimeModel.from_pretrained(model_ref, backend="llamacpp") as model:
            row = {"model": label, "prompting": prompting, "weights": Path(str(model.runtime.weights)).name,
                   "heldout": score_problems(model, heldout, prompting, recipe.max_new_tokens),
                   "extra": score_problems(model, extra, prompting, recipe.max_new_tokens) if extra else None}
        rows.append(row)
        log(f"  {label:26} {prompting:13} held-out {row['heldout']['accuracy']:.1%}"
            + (f"  extra {row['extra']['accuracy']:.1%}" if extra else "") + f"  ({row['weights']})")
    return {"problems": len(heldout), "extra_problems": len(extra), "rows": rows}


def load_problem_file(path: Path) -> list[dict[str, Any]]:
    """Problems from a JSON file `{"problems": [{"question", "answer", "kind"}]}` (JARVIS's
    reasoning_problems.json) or a split JSONL of `reasoning_data`; errors name the file and entry."""
    path = Path(path)
    if path.suffix == ".jsonl":
        from jarvis_prime.recipes.reasoning_data import load_problems

        return load_problems(path)
    try:
        problems = json.loads(path.read_text(encoding="utf-8"))["problems"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise PrimeError(f"{path}: not a problem file ({type(err).__name__}: {err})") from err
    for index, p in enumerate(problems):
        if not (isinstance(p, dict) and isinstance(p.get("question"), str) and isinstance(p.get("answer"), str)):
            raise PrimeError(f"{path}: problems[{index}] needs a string question and answer")
    return problems


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def small_recipe(recipe: ReasoningRecipe, **changes: Any) -> ReasoningRecipe:
    """A copy with changed fields, for tests and pilots (stages keep their method)."""
    stage_changes = {k: changes.pop(k) for k in list(changes) if k in Stage.__dataclass_fields__}
    stages = tuple(replace(s, **stage_changes) for s in recipe.stages)
    return replace(recipe, stages=stages, **changes)
