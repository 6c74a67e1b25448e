"""/think: reasoning for questions with a checkable answer, two ways.

A reasoning model (catalog task "reasoning", a model that thinks before answering) when
one is installed: it is asked once, thinks (within a budget), answers
(`ask_reasoning_model`); `pick_reasoning_model` says which. Otherwise step-by-step
prompting plus self-consistency (Wang et al., 2022) on the chat model: sample k chains of
thought at a moderate temperature, read the final answer off each, and return the majority
answer. `Reasoned.method` says which way answered, and the CLI says it too.

Small models are unreliable on one greedy chain; voting over several samples trades
k times the compute for accuracy. `benchmarks/reasoning.py` measures the trade on
the held-out problems shipped in `jarvis/data/reasoning_problems.json`. Answers are read
by `jarvis_prime.answers`, the same reader the reasoning model's recipe scores with.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal, Mapping, Protocol, Sequence

from jarvis_prime.answers import STEP_BY_STEP, extract_answer, normalise
from jarvis_prime.catalog import load_catalog
from jarvis_prime.store import find_local

REASONING_MODEL_ENV = "JARVIS_REASONING_MODEL"

__all__ = ["STEP_BY_STEP", "extract_answer", "normalise", "majority", "self_consistency", "step_by_step_messages",
           "load_problems", "Reasoned"]


class ChatModel(Protocol):
    def chat(self, messages: Sequence[Mapping[str, Any]], **options: Any) -> str: ...


@dataclass(frozen=True)
class Reasoned:
    answer: str | None  # the majority answer, normalised (None: no sample gave one)
    reply: str  # the full reply of a sample that gave the majority answer (a reasoning model: its answer)
    votes: dict[str, int]
    samples: list[str]
    method: Literal["self-consistency", "reasoning model"] = "self-consistency"
    model: str = ""  # name of the model that answered
    thinking: str | None = None  # a reasoning model's thinking (never part of `reply`)
    truncated: bool = False  # a reasoning model ran out of tokens while thinking: no answer


def majority(answers: Sequence[str | None]) -> tuple[str | None, dict[str, int]]:
    """The most frequent answer (ties: the one reached first) and all the counts."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return None, {}
    best = max(votes.values())
    winner = next(a for a in answers if a is not None and votes[a] == best)
    return winner, dict(votes)


def step_by_step_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The conversation with the step-by-step instruction added to the last user turn."""
    out = [dict(m) for m in messages]
    out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n\n{STEP_BY_STEP}"}
    return out


def self_consistency(model: ChatModel, messages: Sequence[Mapping[str, Any]], *, k: int = 5,
                     temperature: float = 0.7, max_new_tokens: int = 256, seed: int = 0) -> Reasoned:
    """Sample `k` step-by-step replies (seeds seed..seed+k-1) and vote on their answers."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    prompt = step_by_step_messages(messages)
    samples = [
        model.chat(prompt, max_new_tokens=max_new_tokens, temperature=temperature if k > 1 else 0.0, seed=seed + i)
        for i in range(k)
    ]
    answers = [extract_answer(s) for s in samples]
    winner, votes = majority(answers)
    reply = samples[answers.index(winner)] if winner is not None else samples[0]
    return Reasoned(winner, reply.strip(), votes, samples, model=getattr(model, "name", ""))


def pick_reasoning_model(configured: str | None = None) -> str | None:
    """The model /think asks: `configured` (a name or directory), else $JARVIS_REASONING_MODEL,
    else the catalog's reasoning model (task "reasoning") installed in the store, the largest
    if several; None when there is none (the caller falls back to self-consistency)."""
    chosen = configured or os.environ.get(REASONING_MODEL_ENV)
    if chosen:
        return chosen
    entries = sorted((m for m in load_catalog().models if m.task == "reasoning"), key=lambda m: -m.parameters)
    return next((m.name for m in entries if find_local(m.name) is not None), None)


def reasoning_models_to_pull() -> list[str]:
    """The catalog's reasoning models, smallest first (what to `prime pull` for /think)."""
    return [m.name for m in sorted((m for m in load_catalog().models if m.task == "reasoning"),
                                   key=lambda m: m.parameters)]


def ask_reasoning_model(model: Any, messages: Sequence[Mapping[str, Any]], *, max_new_tokens: int,
                        thinking_budget: int | None, seed: int | None = None) -> Reasoned:
    """One greedy reply from a thinking model (a `PrimeModel` whose prime.json has `thinking`):
    its reasoning and answer apart, as `PrimeModel.complete` splits them."""
    result = model.complete(model.encode_chat(messages), max_new_tokens=max_new_tokens, temperature=0.0,
                            seed=seed, thinking_budget=thinking_budget)
    reply = result.text.strip()
    answer = extract_answer(reply)
    truncated = not reply and result.finish_reason == "length"
    return Reasoned(answer, reply, {answer: 1} if answer else {}, [reply], method="reasoning model",
                    model=model.name, thinking=(result.reasoning or "").strip() or None, truncated=truncated)


def load_problems() -> list[dict[str, str]]:
    """The held-out word problems: [{"question", "answer", "kind"}]."""
    text = resources.files("jarvis").joinpath("data/reasoning_problems.json").read_text(encoding="utf-8")
    return json.loads(text)["problems"]
