"""Training recipes for PRIME models, run by Reactor Core.

Reactor Core (and with it torch, peft and friends) is an optional extra: this is the
only place jarvis_prime touches it, and only when a recipe runs, so an inference-only
install never needs it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import ModuleType
from typing import Literal

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


def eval_data_paths(work_dir: Path) -> list[str]:
    """The evaluation files this package ships (`eval_data/`: the JARVIS suite, the
    general-text perplexity passages, the tool suite): what `prime eval` measures must never
    be trained on.

    The tool suite goes as its questions alone, written to `work_dir`: its file also holds
    JARVIS's tool schemas, which every conversation that offers tools carries by design (the
    chat recipe's, a `jarvis export-data` of replies that called tools), so all of those
    would share a long run with it and be dropped as contaminated."""
    from jarvis_prime.evaluation import load_tool_suite

    folder = Path(str(resources.files("jarvis_prime") / "eval_data"))
    paths = [str(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != "tool_suite.json"]
    questions = Path(work_dir) / "tool-suite-questions.jsonl"
    questions.parent.mkdir(parents=True, exist_ok=True)
    questions.write_text("".join(json.dumps({"text": case["user"]}) + "\n" for case in load_tool_suite()["cases"]),
                         encoding="utf-8")
    return paths + [str(questions)]


# Near duplicates in JARVIS's own data: only records that are all but the same. A user who
# corrects the same answer under several phrasings ("Who built you?", "Who made you?")
# teaches something on purpose; on records this short one changed word already puts the
# word-3-gram Jaccard near 0.75, which the pipeline's default 0.8 threshold would catch.
FEEDBACK_NEAR_THRESHOLD = 0.95
# Decontamination's run length for generated data: longer than any message of it, so each
# evaluation text is one run and only a message that says all of it (an evaluation item
# itself) matches. Templated problems share 8- to 12-word runs of wording by design ("toy
# cars. How many toy cars do they ...", measured on the reasoning data); those are not leaks.
WHOLE_TEXT = 64


@dataclass(frozen=True)
class DataKind:
    """What a recipe's data needs from the pipeline (see `data_pipeline`)."""

    pipeline_kind: Literal["chat", "preference"]  # Reactor Core's record kind
    near_duplicates: bool  # MinHash near-duplicate removal (exact duplicates always go)
    decontam_ngram: int  # words per shared run that make a record contaminated


DATA_KINDS: dict[str, DataKind] = {
    # JARVIS's conversations (feedback, `jarvis export-data`, persona replies): near duplicates at
    # FEEDBACK_NEAR_THRESHOLD, 8-word runs shared with eval_data (the pipeline's default)
    "chat": DataKind("chat", near_duplicates=True, decontam_ngram=8),
    "preference": DataKind("preference", near_duplicates=True, decontam_ngram=8),
    # the chat recipe's persona replies and templated tool conversations: GPT-3's 13 words. Its
    # prompts are shorter than that, so they go only when a message says exactly an evaluation
    # question; 8 also dropped honest neighbours ("...boiling point of water in Fahrenheit?"
    # beside the tool suite's "...in Celsius?"). No near-dedup: a single exchange after the
    # ~590-token tool list is >= 0.95 alike to any other of its template ("What's my dog
    # called?" / "...cat called?"), and at 0.95 it removed 24 such openers (13 of 24 `recall`)
    # and no persona reply; skipping the system message instead made each no-tool opener a near
    # duplicate of its persona reply offered no tools (42 of 48 gone). Exact repeats still go.
    "tool-chat": DataKind("chat", near_duplicates=False, decontam_ngram=13),
    # word problems drawn from templates: two problems with the same numbers told with other names
    # teach the same arithmetic in other words, which is the point; near-dedup at 0.8 removed 9 such
    # pairs of 3000, none a repeat. Exact repeats go (12 of 3000 are the same problem drawn twice).
    "reasoning": DataKind("chat", near_duplicates=False, decontam_ngram=WHOLE_TEXT),
    # an image record's text holds its image as one word (its sha256), so word-shingle near-dedup
    # would see the same long question about two different images as near duplicates (at 0.8 it
    # removed one such pair of 2000); exact duplicates are keyed by the image's bytes and the text.
    # The held-out items are images with their questions: only an item itself (that image, that
    # question) is contamination, never the question alone, which every split asks by design.
    "vision": DataKind("chat", near_duplicates=False, decontam_ngram=WHOLE_TEXT),
}


def data_pipeline(kind: str, work_dir: Path, eval_files: Sequence[str | Path] = ()) -> dict[str, object]:
    """A Reactor Core `data_pipeline` block for `kind`'s data (`DATA_KINDS`): exact
    duplicates, near duplicates at `FEEDBACK_NEAR_THRESHOLD` where the kind wants them,
    filters, and decontamination against `eval_data_paths(work_dir)` and a recipe's own
    held-out `eval_files`. No PII scrub: JARVIS scrubs its feedback before handing it over, or
    was told not to (`jarvis improve --no-scrub-pii`), and a recipe must not overrule that
    choice; generated data has none."""
    if kind not in DATA_KINDS:
        raise PrimeError(f"no data pipeline for {kind!r}; kinds: {', '.join(DATA_KINDS)}")
    settings = DATA_KINDS[kind]
    dedup: dict[str, object] = {"threshold": FEEDBACK_NEAR_THRESHOLD} if settings.near_duplicates else {"near": False}
    paths = eval_data_paths(work_dir) + [str(p) for p in eval_files]
    decontaminate: dict[str, object] = {"paths": paths}
    if settings.decontam_ngram != 8:  # 8: Reactor Core's default, left implicit as before
        decontaminate["ngram"] = settings.decontam_ngram
    return {"kind": settings.pipeline_kind, "dedup": dedup, "decontaminate": decontaminate, "scrub_pii": False}


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
