"""`prime train prime-135m-vision-v1`: the small offline vision model, Idefics3 / SmolVLM-shaped.

SmolVLM-256M is SmolLM2-135M plus a SigLIP encoder and a pixel-shuffle connector; this is
the same architecture (transformers' Idefics3ForConditionalGeneration, llama.cpp's IDEFICS3
projector), built on the embedded SmolLM2-135M-Instruct with an encoder trained here from
scratch, because no pretrained vision weights are reachable offline. It sees what
`vision_data` draws (colours, shapes, counts, sides, printed numbers) and nothing else.

The recipe, top to bottom:

1. **Data**: `vision_data` writes the training and held-out splits (images + chat JSONL).
2. **Encoder** (`vision_encoder`, plain PyTorch): the SigLIP encoder learns, alone (which
   is cheap), to read each view into words in a fixed layout (a number's digits, the shapes'
   colours, kinds and sides, how many there are); the connector trains beside it (on its
   features, detached) so each image token lands on its word's embedding in the LM.
   This is most of the compute (digits take the encoder many views), so the package ships
   the result, and a run starts from it when the recipe's encoder settings are the shipped
   ones (`shipped_encoder`), as a VLM starts from a pretrained SigLIP; `--train-encoder`
   trains it again from random weights.
3. **Assemble**: SmolLM2-135M-Instruct + that encoder and connector, SmolVLM's image
   tokens added to the tokenizer, the Idefics3 processor configured for this encoder.
4. **Connector and LoRA** (Reactor Core, `method: sft` with images): the connector and a
   LoRA on the language model learn which image token answers which question; the
   encoder stays frozen (`train_vision_tower: false`), the connector nearly so (its own
   small learning rate keeps the tokens on their words). The data goes through Reactor
   Core's data pipeline first (`data_pipeline("vision")`): exact repeats (same image bytes,
   same text) and held-out items (that image with that question) would go; no
   near-duplicate pass, which reads an image as one word (`jarvis_prime.recipes.DATA_KINDS`).
5. **Store**: the merged model becomes a PRIME directory (safetensors, text GGUF and the
   projector's mmproj GGUF); the held-out set is scored through llama.cpp.

`--ship` (maintainers) writes what the package needs to rebuild it on first use (the
encoder, the LoRA with the connector, the Idefics3 config and processor files, float16)
into `jarvis_prime/adapters/<name>/`; the catalog's `adapter` source for a `vision`
entry rebuilds it onto the embedded base with `build_from_shipped` on `prime pull`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from jarvis_prime.errors import PrimeError
from jarvis_prime.idefics3 import (
    ENCODER_FILE,
    EncoderShape,
    assemble_vision_model,
    save_vision_model,
)
from jarvis_prime.progress import Log
from jarvis_prime.recipes import data_pipeline, package_folder, require_reactor_core
from jarvis_prime.recipes.vision_encoder import (
    EncoderTraining,
    pretrain_encoder,
    word_vectors,
)

CONNECTOR_FILE = "connector.safetensors"  # step 2's connector, before the LM stage trains it on
QUANTS = ("q8_0", "q4_k_m")  # text GGUFs; the projector is written in f16 and q8_0 beside them
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "chat_template.jinja")


@dataclass(frozen=True)
class VisionRecipe:
    name: str
    base: str
    # the catalog entry's version: a shipped retrain is a new version, so `prime pull` builds it
    # beside the old one instead of keeping a store's older copy (1.1.0: data version 3, the
    # connector trained beside the encoder; 1.2.0: its encoder trained 15,000 steps instead of 3,000;
    # 1.3.0: per-patch shape-centre labels and twice the count images)
    version: str = "1.3.0"
    encoder: EncoderShape = field(default_factory=EncoderShape)
    encoder_training: EncoderTraining = field(default_factory=EncoderTraining)
    train_examples: int = 2000
    heldout_examples: int = 500
    data_seed: int = 0
    lora_rank: int = 16
    lora_alpha: float = 32.0
    learning_rate: float = 1e-3
    # The connector arrives trained to land each image token on its word's embedding; at the
    # LoRA's rate it drifted off them (one encoder, held-out: side 68 % at 1e-5, 44 % at 1e-3;
    # shape 56 and 48 %).
    projector_learning_rate: float = 1e-5
    batch_size: int = 8
    num_epochs: int = 1
    max_seq_length: int = 256
    seed: int = 0
    max_steps: int | None = None  # tests run a few steps of the same recipe


RECIPES = {"prime-135m-vision-v1": VisionRecipe(name="prime-135m-vision-v1", base="smollm2-135m-instruct")}


def train_vision_model(name: str, work_dir: Path, *, ship: bool = False, fresh: bool = False,
                       train_encoder: bool = False, log: Log = print, progress: bool = True,
                       recipe: VisionRecipe | None = None) -> dict[str, Any]:
    """All five steps; data and the encoder already in `work_dir` are reused unless `fresh`.
    Step 2 starts from the package's shipped encoder and connector when they are this
    recipe's (`shipped_encoder`), unless `train_encoder`. `recipe` replaces the named one
    (tests run a small copy of it)."""
    # safetensors and torch first: a missing one fails here, not after the data
    from safetensors.torch import load_file, save_file

    from jarvis_prime.recipes.vision_data import build_vision_dataset
    from jarvis_prime.store import materialize_vision_model, resolve

    if name not in RECIPES:
        raise PrimeError(f"no training recipe for {name!r}; recipes: {', '.join(RECIPES)}")
    recipe = recipe or RECIPES[name]
    reactor_core = require_reactor_core()
    work_dir = Path(work_dir)
    data_dir = work_dir / "data"
    base = resolve(recipe.base, log=log)

    if fresh or not (data_dir / "dataset-report.json").is_file():
        log(f"1/5 drawing {recipe.train_examples} training and {recipe.heldout_examples} held-out images")
        build_vision_dataset(data_dir, train=recipe.train_examples, heldout=recipe.heldout_examples,
                             seed=recipe.data_seed, log=log)
    else:
        log(f"1/5 reusing {data_dir} (--fresh draws it again)")

    encoder_path, connector_path = work_dir / ENCODER_FILE, work_dir / CONNECTOR_FILE
    pretrained = None if train_encoder else shipped_encoder(name, recipe)
    if not fresh and encoder_path.is_file() and connector_path.is_file():
        log(f"2/5 reusing {encoder_path} and {connector_path}")
    elif pretrained is not None:
        log(f"2/5 the package's pretrained encoder and connector: this recipe's stage 2 as shipped "
            f"({recipe.encoder_training.steps} steps; --train-encoder trains them again)")
        copy_pretrained(pretrained, work_dir)
    else:
        log("2/5 training the vision encoder and the connector to read scenes as the LM's word embeddings")
        from transformers import AutoTokenizer

        embeddings = load_file(base.path / "model.safetensors")["model.embed_tokens.weight"]
        words = word_vectors(AutoTokenizer.from_pretrained(base.path), embeddings)
        encoder = pretrain_encoder(recipe.encoder, recipe.encoder_training, words, log=log, progress=progress)
        save_file({k: v.contiguous() for k, v in encoder["state_dict"].items()}, encoder_path)
        save_file({"weight": encoder["connector"]}, connector_path)
        (work_dir / "encoder.json").write_text(json.dumps({k: v for k, v in encoder.items()
                                                           if k not in ("state_dict", "connector")}))
    encoder_state = load_file(encoder_path)

    log("3/5 assembling SmolLM2 + encoder + connector")
    model, processor = assemble_vision_model(base.path, encoder_state, recipe.encoder,
                                             connector=load_file(connector_path)["weight"], seed=recipe.seed)
    assembled = save_vision_model(model, processor, work_dir / "assembled")  # Reactor Core's base
    del model

    log("4/5 connector + LoRA with Reactor Core (the encoder frozen)")
    config = reactor_config(recipe, name, assembled, data_dir, work_dir / "reactor-output")
    result = reactor_core.Trainer(config, progress=progress).train()

    log("5/5 adding it to the store and scoring the held-out set through llama.cpp")
    local = materialize_vision_model(result.model_dir, name=name, version=recipe.version, base=base.manifest.base,
                                     quants=QUANTS, force=True, log=log)
    scores = score_heldout(local.path, data_dir / "heldout.jsonl", log=log)
    summary = {"recipe": asdict(recipe), "model_dir": str(local.path), "heldout": scores,
               "train_metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
               "encoder": json.loads((work_dir / "encoder.json").read_text())}
    if ship:
        summary["shipped"] = str(ship_vision_model(result.model_dir / "adapter", assembled, encoder_path, name, summary))
    return summary


def shipped_encoder(name: str, recipe: VisionRecipe) -> Path | None:
    """The package folder holding `name`'s pretrained encoder and connector when they are
    what `recipe`'s step 2 trains (the same encoder shape and encoder training settings),
    else None.

    Why ship them: the encoder starts from random weights, and reading digits and counts
    takes it far more views than the rest of the recipe costs (15,000 steps and its images:
    54 min on a 2-core Intel Xeon, where the LM stage takes 11). Like a pretrained SigLIP,
    it is trained once and reused; `prime train NAME --train-encoder` runs that step again from scratch.
    The check is the recipe's own settings, so a changed recipe never reuses a stale encoder."""
    folder = package_folder(name)
    summary = folder / "training.json"
    if not ((folder / ENCODER_FILE).is_file() and (folder / CONNECTOR_FILE).is_file() and summary.is_file()):
        return None
    shipped = json.loads(summary.read_text()).get("recipe", {})
    wanted = json.loads(json.dumps({"encoder": asdict(recipe.encoder), "encoder_training": asdict(recipe.encoder_training)}))
    same = all(shipped.get(key) == value for key, value in wanted.items())
    return folder if same else None


def copy_pretrained(folder: Path, work_dir: Path) -> None:
    """Step 2's output from the package into `work_dir`: the encoder and connector (float32
    again) and, as `encoder.json`, the held-out readout they were shipped with."""
    from safetensors.torch import load_file, save_file

    for file in (ENCODER_FILE, CONNECTOR_FILE):
        save_file({k: v.float().contiguous() for k, v in load_file(folder / file).items()}, work_dir / file)
    shipped = json.loads((folder / "training.json").read_text())
    (work_dir / "encoder.json").write_text(json.dumps(shipped["encoder"] | {"from": str(folder)}))


def reactor_config(recipe: VisionRecipe, name: str, assembled: Path, data_dir: Path, output_dir: Path):
    """Step 4's Reactor Core TrainingConfig: the connector and the LoRA on `data_dir`'s
    training split, through the data pipeline first: exact repeats (image bytes and text)
    and held-out items (that image with that question) go (`data_pipeline("vision")`)."""
    from jarvis_prime.recipes.vision_data import write_eval_items

    reactor_core = require_reactor_core()
    return reactor_core.TrainingConfig(
        model_name=str(assembled), data_path=str(data_dir / "train.jsonl"), output_dir=str(output_dir),
        output_name=name, output_version=recipe.version, use_lora=True, lora_rank=recipe.lora_rank,
        lora_alpha=recipe.lora_alpha, lora_dropout=0.0, train_projector=True, train_vision_tower=False,
        num_epochs=recipe.num_epochs, learning_rate=recipe.learning_rate,
        projector_learning_rate=recipe.projector_learning_rate, batch_size=recipe.batch_size,
        max_seq_length=recipe.max_seq_length, warmup_steps=10, val_fraction=0.02,
        seed=recipe.seed, resume="never", num_samples=2, packing=False, max_steps=recipe.max_steps,
        data_pipeline=data_pipeline("vision", data_dir, [write_eval_items(data_dir)]),
    )


def score_heldout(model_dir: Path, data: Path, *, log: Log = print, limit: int | None = None) -> dict[str, Any]:
    """Greedy VQA accuracy of the store's model on `data` through the default (llama.cpp) backend."""
    from jarvis_prime.evaluation import run_vqa_suite
    from jarvis_prime.models.prime_model import PrimeModel

    with PrimeModel.from_pretrained(model_dir, backend="llamacpp", quantization="8bit") as model:
        scores = run_vqa_suite(model, data, limit=limit)
    log("held-out accuracy: " + ", ".join(f"{k} {v:.0%}" for k, v in scores.get("by_category", {}).items()))
    return scores


def ship_vision_model(adapter_dir: Path, assembled: Path, encoder_path: Path, name: str, summary: dict[str, Any]) -> Path:
    """What the package needs to rebuild the model on the embedded base, in float16: the
    encoder, the LoRA adapter with the connector (peft's modules_to_save), the Idefics3
    config and the processor files."""
    import shutil

    from safetensors.numpy import load_file, save_file

    target = package_folder(name)
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    half = lambda path: {k: v.astype("float16") for k, v in load_file(path).items()}
    save_file(half(adapter_dir / "adapter_model.safetensors"), target / "adapter_model.safetensors")
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = RECIPES[name].base
    (target / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    save_file(half(encoder_path), target / ENCODER_FILE)
    save_file(half(encoder_path.parent / CONNECTOR_FILE), target / CONNECTOR_FILE)  # as step 2 left it: `shipped_encoder`
    config = json.loads((assembled / "config.json").read_text())
    for section in (config, config.get("text_config", {}), config.get("vision_config", {})):
        section.pop("_name_or_path", None)  # the training machine's store path: rebuilt on the embedded base
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for file in PROCESSOR_FILES:
        shutil.copy(assembled / file, target / file)
    (target / "training.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return target


