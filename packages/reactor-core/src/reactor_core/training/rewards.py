"""GRPO's verifiable rewards: the built-ins, loading the ones a recipe names, and scoring.

A reward function follows TRL's convention, so one written for TRL runs here as is:

    def reward(prompts: list, completions: list[str], **columns) -> list[float | None]

`prompts` are the prompts as the data gave them (chat messages or a string),
`completions` the sampled texts, and every other key of the data line arrives as a
keyword argument holding one value per completion (`answer=[...]`). None means "does
not apply to this completion"; it counts as 0 in the weighted sum (TRL's nansum) and
is left out of that function's logged mean.

A recipe names each function as a built-in (`exact_answer`, `think_format`, `length`),
`package.module:function`, or `path/to/file.py:function`. They are resolved when the
recipe is set up, so a typo fails before any model loads; a function that raises or
returns something other than numbers fails the step with the function and the data
line named, not a NaN three steps later.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RewardFunc = Callable[..., Sequence[Any]]


class RewardError(ValueError):
    """A reward function that cannot be loaded, raised, or returned something unusable."""


def completion_answer(completion: str) -> str:
    """The part of a completion that holds the answer: after the last `</think>`, and
    after the last "Answer:" in that part when there is one."""
    text = completion.rsplit("</think>", 1)[-1]
    marker = re.split(r"(?i)answer\s*:", text)
    return marker[-1]


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")


def _number(text: str) -> float | None:
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def exact_answer(prompts: list, completions: list[str], answer: list[Any] | None = None, **_: Any) -> list[float | None]:
    """1.0 when the final number of the answer part (`completion_answer`) equals the
    line's `answer` numerically (within 1e-6 relative), else 0.0; None for a line
    without `answer` (the reward does not apply to it)."""
    if answer is None:
        raise RewardError("exact_answer needs an `answer` key on every data line")
    rewards: list[float | None] = []
    for completion, expected in zip(completions, answer):
        if expected is None:
            rewards.append(None)
            continue
        target = _number(str(expected))
        if target is None:
            raise RewardError(f"exact_answer: `answer` {expected!r} holds no number")
        got = _number(completion_answer(completion))
        rewards.append(float(got is not None and math.isclose(got, target, rel_tol=1e-6, abs_tol=1e-9)))
    return rewards


_THINK = re.compile(r"\s*<think>(.*?)</think>(.*)", re.DOTALL)


def think_format(prompts: list, completions: list[str], **_: Any) -> list[float]:
    """1.0 when the completion is `<think>...</think>` followed by a non-empty answer
    (reasoning, then the reply, as PRIME's /think models write it), else 0.0."""
    rewards = []
    for completion in completions:
        match = _THINK.fullmatch(completion)
        ok = match is not None and "<think>" not in match.group(1) and match.group(2).strip() != ""
        rewards.append(float(ok))
    return rewards


LENGTH_TARGET_CHARS = 1000


def length(prompts: list, completions: list[str], length_target: list[int] | None = None, **_: Any) -> list[float]:
    """A soft penalty for rambling: 0.0 up to the target (`LENGTH_TARGET_CHARS`, or the
    line's `length_target` column) in characters, then falling linearly to -1.0 at twice
    the target, and staying there."""
    targets = length_target or [LENGTH_TARGET_CHARS] * len(completions)
    rewards = []
    for completion, limit in zip(completions, targets):
        over = max(len(completion) - int(limit), 0)
        rewards.append(-min(over / max(int(limit), 1), 1.0))
    return rewards


BUILTINS: dict[str, RewardFunc] = {"exact_answer": exact_answer, "think_format": think_format, "length": length}


def load_reward(spec: str) -> RewardFunc:
    """A built-in name, `package.module:function`, or `path/to/file.py:function`."""
    if spec in BUILTINS:
        return BUILTINS[spec]
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise RewardError(f"reward function {spec!r}: not a built-in ({', '.join(BUILTINS)}) and not "
                          "'package.module:function' or 'path/to/file.py:function'")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise RewardError(f"reward function {spec!r}: no such file {where}")
        module_spec = importlib.util.spec_from_file_location(f"reactor_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)  # type: ignore[arg-type]
        try:
            module_spec.loader.exec_module(module)  # type: ignore[union-attr]
        except Exception as err:
            raise RewardError(f"reward function {spec!r}: importing {where} failed: {err!r}") from err
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise RewardError(f"reward function {spec!r}: cannot import {where}: {err}") from err
    func = getattr(module, name, None)
    if not callable(func):
        raise RewardError(f"reward function {spec!r}: {where} has no function {name!r}")
    return func


def reward_name(spec: str) -> str:
    """The name a reward's metrics are logged under: the function's name."""
    return spec.rpartition(":")[2] or spec


def score(
    name: str, func: RewardFunc, prompts: list, completions: list[str], columns: dict[str, list[Any]],
    sources: Sequence[str],
) -> list[float]:
    """`func`'s rewards for the completions, NaN where it returned None.

    Raises RewardError naming the function and the data line (`sources[i]`, its
    `path:line`) when it raises, returns the wrong count, or returns a non-number.
    """
    try:
        values = func(prompts, completions, **columns)
    except Exception as err:
        where = _first_failing(func, prompts, completions, columns, sources)
        raise RewardError(f"reward {name!r} raised {err!r} on {where}") from err
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"reward {name!r} returned {type(values).__name__}, not a list of numbers") from None
    if len(values) != len(completions):
        raise RewardError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions")
    out = []
    for value, source in zip(values, sources):
        if value is None:
            out.append(math.nan)
            continue
        number = math.nan
        if not isinstance(value, (str, bytes)) and hasattr(value, "__float__"):  # int, float, bool, numpy, torch
            try:
                number = float(value)
            except (TypeError, ValueError):
                pass
        if not math.isfinite(number):
            raise RewardError(f"reward {name!r} returned {value!r} for the completion of {source}: "
                              "rewards are finite numbers or None")
        out.append(number)
    return out


def _first_failing(func: RewardFunc, prompts: list, completions: list[str], columns: dict[str, list[Any]],
                   sources: Sequence[str]) -> str:
    """The data line whose completion alone makes `func` raise (each one re-scored on its
    own, only after a failure); the batch's lines when none does alone."""
    for i, source in enumerate(sources):
        try:
            func(prompts[i:i + 1], completions[i:i + 1], **{k: v[i:i + 1] for k, v in columns.items()})
        except Exception:
            return f"the completion of {source}"
    return "the batch from " + ", ".join(dict.fromkeys(sources))
