"""Training recipes for PRIME models, run by Reactor Core.

Reactor Core (and with it torch, peft and friends) is an optional extra: this is the
only place jarvis_prime touches it, and only when a recipe runs, so an inference-only
install never needs it.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from types import ModuleType

from jarvis_prime.errors import ModelNotFoundError, PrimeError
from jarvis_prime.store import resolve

# LoRA on the attention projections only: adapting the MLPs too moved general-text
# perplexity further for no better JARVIS score (package README, the chat model), and
# the feedback recipe keeps the same choice so a round of feedback stays gentle.
ATTENTION_ONLY: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


def package_folder(name: str) -> Path:
    """Where this package keeps a shipped model's files, `adapters/<name>/` (what `--ship`
    writes and the catalog entry's `path` names)."""
    return Path(str(resources.files("jarvis_prime") / "adapters" / name))


def eval_data_paths() -> list[str]:
    """The evaluation files this package ships (`eval_data/`: the JARVIS suite, the
    general-text perplexity passages): what `prime eval` measures must never be trained on."""
    folder = Path(str(resources.files("jarvis_prime") / "eval_data"))
    return [str(p) for p in sorted(folder.iterdir()) if p.is_file()]


# Near duplicates in JARVIS's own data: only records that are all but the same. A user who
# corrects the same answer under several phrasings ("Who built you?", "Who made you?")
# teaches something on purpose; on records this short one changed word already puts the
# word-3-gram Jaccard near 0.75, which the pipeline's default 0.8 threshold would catch.
FEEDBACK_NEAR_THRESHOLD = 0.95


def data_pipeline(kind: str) -> dict[str, object]:
    """A Reactor Core `data_pipeline` block: exact duplicates, near duplicates at
    `FEEDBACK_NEAR_THRESHOLD`, filters, and decontamination against `eval_data_paths()`;
    `kind` is "chat" for SFT data, "preference" for DPO pairs. No PII scrub: JARVIS
    scrubs its feedback before handing it over, or was told not to (`jarvis improve
    --no-scrub-pii`), and a recipe must not overrule that choice."""
    return {"kind": kind, "dedup": {"threshold": FEEDBACK_NEAR_THRESHOLD},
            "decontaminate": {"paths": eval_data_paths()}, "scrub_pii": False}


def require_reactor_core() -> ModuleType:
    """Import reactor_core for a training run, or explain how to install it."""
    try:
        import reactor_core
    except ImportError as err:
        raise PrimeError(
            "training PRIME models needs Reactor Core: pip install 'jarvis-prime[training]'"
        ) from err
    return reactor_core


def resolve_for_training(name: str) -> str | None:
    """Reactor Core's model-resolver hook: a catalog or store name -> its PRIME directory.

    Offline sources are pulled on first use, as for inference; None for names this
    package does not know, so Reactor Core can try its other sources.
    """
    try:
        return str(resolve(name).path)
    except ModelNotFoundError:
        return None
