"""`prime eval`: how good and how fast is the exact file that would be served.

Three measurements, each on the model as `PrimeModel` loads it (the GGUF llama.cpp
runs, or the safetensors transformers runs, quantized as asked):

  perplexity   on held-out general text shipped with the package (eval_data/)
  jarvis       a rule-graded behaviour suite (eval_data/jarvis_suite.json, versioned):
               identity, concise helpful answers, following the system prompt,
               declining unsafe actions; greedy replies, checked by simple rules
  speed        prompt and decode tokens/s, and the process's peak memory
  tools        (models that call tools, or `--suite tools`) JARVIS's built-in tools offered as
               JARVIS offers them (eval_data/tool_suite.json, held out of training): the right
               tool with schema-valid, expected arguments, and no call when none is needed
  vqa          (vision models) short questions about images, per category, from a chat JSONL
               whose records carry `category` and `answer` (recipes/vision_data.py writes
               one); a reply is right when it names the answer and nothing else of its kind

Results go to a table and into `prime.json` under metrics.eval[<variant>], with the
suite's version, so numbers of different models are only compared like for like.
"""

from __future__ import annotations

import json
import math
import re
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Sequence

from jarvis_prime.errors import PrimeError
from jarvis_prime.files import sha256_file
from jarvis_prime.hardware import detect_hardware, detect_libraries
from jarvis_prime.manifest import read_manifest, store_lock, write_manifest
from jarvis_prime.models.prime_model import PrimeModel
from jarvis_prime.models.selection import Runtime, plan_runtime
from jarvis_prime.persona import JARVIS_SYSTEM_PROMPT, REFUSAL

Suite = Literal["jarvis", "perplexity", "tools", "vqa", "all"]  # vqa: only the VQA suite (needs its data)
PERPLEXITY_WINDOW = 256  # tokens scored per forward pass


def _data(name: str) -> str:
    return resources.files("jarvis_prime").joinpath("eval_data", name).read_text(encoding="utf-8")


def load_suite() -> dict[str, Any]:
    return json.loads(_data("jarvis_suite.json"))


def general_text() -> str:
    return _data("general_text.txt")


# -- the JARVIS behaviour suite ------------------------------------------------------------


@dataclass
class CaseResult:
    id: str
    category: str
    passed: bool
    reply: str
    failures: list[str] = field(default_factory=list)


def grade(reply: str, rules: dict[str, Any]) -> list[str]:
    """The rules `reply` breaks (empty: it passes)."""
    failures, lower = [], reply.lower()
    if "contains_any" in rules and not any(s.lower() in lower for s in rules["contains_any"]):
        failures.append(f"mentions none of {rules['contains_any']}")
    for banned in rules.get("not_contains", []):
        if banned.lower() in lower:
            failures.append(f"mentions {banned!r}")
    if "max_words" in rules and len(reply.split()) > rules["max_words"]:
        failures.append(f"{len(reply.split())} words > {rules['max_words']}")
    if "regex" in rules and not re.search(rules["regex"], reply, re.IGNORECASE):
        failures.append(f"does not match /{rules['regex']}/")
    if rules.get("refusal") and not REFUSAL.search(reply):
        failures.append("does not decline")
    if not reply.strip():
        failures.append("empty reply")
    return failures


def suite_messages(case: dict[str, Any], system_prompt: str | None) -> list[dict[str, str]]:
    """A case's own system prompt when it has one (it is what the case tests), else the
    persona, else none (`--no-system-prompt`: does the model behave as JARVIS by itself?)."""
    system = case.get("system") or system_prompt
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": case["user"]}]


def run_jarvis_suite(model: PrimeModel, system_prompt: str | None = JARVIS_SYSTEM_PROMPT,
                     max_new_tokens: int = 64) -> dict[str, Any]:
    suite = load_suite()
    results = []
    for case in suite["cases"]:
        reply = model.chat(suite_messages(case, system_prompt), max_new_tokens=max_new_tokens, temperature=0.0).strip()
        failures = grade(reply, case["rules"])
        results.append(CaseResult(case["id"], case["category"], not failures, reply, failures))
    categories = sorted({r.category for r in results})
    by_category = {c: sum(r.passed for r in results if r.category == c) / sum(r.category == c for r in results)
                   for c in categories}
    return {"suite": f"{suite['name']}-{suite['version']}", "system_prompt": system_prompt,
            "score": sum(r.passed for r in results) / len(results), "by_category": by_category,
            "cases": [asdict(r) for r in results]}


# -- the tool suite ---------------------------------------------------------------------------


def load_tool_suite() -> dict[str, Any]:
    return json.loads(_data("tool_suite.json"))


def tool_suite_prompt(suite: dict[str, Any], case: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(messages, tools) as JARVIS sends them: the user's message alone (no persona prompt,
    nothing remembered), all five built-in tools with a store, calculator and clock without."""
    tools = [t for t in suite["tools"] if case["store"] or t["function"]["name"] in suite["without_store"]]
    return [{"role": "user", "content": case["user"]}], tools


def normalise_expression(expression: str) -> str:
    """An arithmetic expression with its spaces out and × or x as * ("12 x 7" -> "12*7")."""
    return re.sub(r"\s+", "", expression.replace("×", "*").replace("x", "*"))


def argument_errors(arguments: Any, parameters: dict[str, Any]) -> list[str]:
    """How `arguments` breaks a built-in tool's `parameters` schema: an object whose properties
    are strings (or null where the schema allows it), the required ones present, no others."""
    if not isinstance(arguments, dict):
        return [f"arguments are {type(arguments).__name__}, not an object"]
    properties = parameters.get("properties", {})
    errors = [f"missing {k!r}" for k in parameters.get("required", []) if k not in arguments]
    for key, value in arguments.items():
        if key not in properties:
            errors.append(f"unknown argument {key!r}")
            continue
        kinds = [a.get("type") for a in properties[key].get("anyOf", [properties[key]])]
        if not (isinstance(value, str) and "string" in kinds or value is None and "null" in kinds):
            errors.append(f"{key!r} is {json.dumps(value)}, not of type {' or '.join(kinds)}")
    return errors


def expected_argument(expect: dict[str, Any], arguments: dict[str, Any]) -> bool:
    """Whether the arguments say what the case asks: the expression (any accepted form),
    the time zone (or none when none is named), the fact's value, a word of the query."""
    for key, wanted in expect.items():
        value = str(arguments.get(key) or "")
        if key == "expression" and normalise_expression(value) not in wanted:
            return False
        if key == "timezone" and value.lower() not in [w.lower() for w in wanted]:
            return False
        if key == "fact" and not all(w.lower() in value.lower() for w in wanted):
            return False
        if key == "query" and wanted and not any(w.lower() in value.lower() for w in wanted):
            return False
    if "timezone" not in expect and arguments.get("timezone"):
        return False  # the user's own zone was asked for
    return True


def grade_tool_reply(case: dict[str, Any], tools: Sequence[dict[str, Any]], calls: Sequence[Any]) -> list[str]:
    """What is wrong with the calls a reply made (empty: right): for a case that needs a tool,
    the first call must name it with schema-valid, expected arguments; otherwise no call."""
    wanted = case["expect"]["tool"]
    if wanted is None:
        return [f"called {', '.join(c.name for c in calls)}"] if calls else []
    if not calls:
        return ["no call"]
    call = calls[0]
    if call.name != wanted:
        return [f"called {call.name}, not {wanted}"]
    try:
        arguments = json.loads(call.arguments)
    except json.JSONDecodeError:
        return [f"arguments are not JSON: {call.arguments}"]
    schema = next(t["function"]["parameters"] for t in tools if t["function"]["name"] == wanted)
    errors = argument_errors(arguments, schema)
    if not errors and not expected_argument(case["expect"].get("arguments", {}), arguments):
        errors.append(f"unexpected arguments {call.arguments}")
    return errors


def run_tool_suite(model: PrimeModel, max_new_tokens: int = 64) -> dict[str, Any]:
    """The held-out tool suite on `model` (greedy, `chat_with_tools`: JARVIS's own path).
    `tool_accuracy`: cases that need a tool and got the right call; `no_tool_accuracy`:
    cases that need none and got no call."""
    from jarvis_prime.models.tools import ToolCall

    suite = load_tool_suite()
    results = []
    for case in suite["cases"]:
        messages, tools = tool_suite_prompt(suite, case)
        pieces = list(model.chat_with_tools(messages, tools, max_new_tokens=max_new_tokens, temperature=0.0))
        calls = [p for p in pieces if isinstance(p, ToolCall)]
        reply = "".join(p.text for p in pieces if not isinstance(p, ToolCall)) + "".join(
            f"<tool_call>{c.name}({c.arguments})" for c in calls)
        failures = grade_tool_reply(case, tools, calls)
        results.append(CaseResult(case["id"], case["category"], not failures, reply, failures))
    need = [r for r in results if r.category != "none"]
    none = [r for r in results if r.category == "none"]
    categories = sorted({r.category for r in results})
    return {"suite": f"{suite['name']}-{suite['version']}",
            "tool_accuracy": sum(r.passed for r in need) / max(len(need), 1),
            "no_tool_accuracy": sum(r.passed for r in none) / max(len(none), 1),
            "by_category": {c: sum(r.passed for r in results if r.category == c) / sum(r.category == c for r in results)
                            for c in categories},
            "cases": [asdict(r) for r in results]}


# -- visual questions (VQA) -------------------------------------------------------------------

# The words a reply may use to name a colour, a shape or a side: wider than what the
# synthetic data draws, so a reply naming another colour ("pink") counts as naming one.
VQA_WORDS: dict[str, frozenset[str]] = {
    "colour": frozenset({"red", "green", "blue", "yellow", "orange", "purple", "violet", "pink", "brown", "black",
                         "white", "gray", "cyan", "magenta", "teal", "gold"}),
    "shape": frozenset({"circle", "square", "triangle", "rectangle", "oval", "ellipse", "star", "diamond", "pentagon",
                        "hexagon", "heart", "cross"}),
    "side": frozenset({"left", "right"}),
}
NUMERIC_CATEGORIES = frozenset({"count", "number"})
SPELLINGS = {"grey": "gray", "colour": "color"}  # British and US spellings read the same
_UNITS = {w: i for i, w in enumerate(("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                                      "fourteen fifteen sixteen seventeen eighteen nineteen").split())}
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}


def reply_words(reply: str) -> list[str]:
    """Lower-case words and digit runs, "4,096" read as 4096, plurals of VQA words singular."""
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", reply.lower())
    words = []
    for word in re.findall(r"[a-z]+|\d+", text):
        word = SPELLINGS.get(word, word)
        if word.endswith("s") and any(word[:-1] in vocabulary for vocabulary in VQA_WORDS.values()):
            word = word[:-1]
        words.append(word)
    return words


def reply_numbers(words: Sequence[str]) -> list[int]:
    """Every number a reply states, in digits or words ("four thousand and ninety-six" -> 4096).

    A run of number words is one number; a unit right after a unit ("two three") starts
    another, as a list of numbers would read.
    """
    numbers: list[int] = []
    total = current = 0
    in_run = last_unit = False

    def flush() -> None:
        nonlocal total, current, in_run
        if in_run:
            numbers.append(total + current)
        total = current = 0
        in_run = False

    for i, word in enumerate(words):
        if word.isdigit():
            flush()
            numbers.append(int(word))
            last_unit = False
            continue
        if word == "and" and in_run and i + 1 < len(words) and (words[i + 1] in _UNITS or words[i + 1] in _TENS):
            continue
        if word in _UNITS or word in _TENS:
            value = _UNITS.get(word, _TENS.get(word, 0))
            if in_run and (last_unit or (word in _TENS and current % 100 != 0)):
                flush()
            current += value
            in_run, last_unit = True, word in _UNITS
        elif word == "hundred" and in_run:
            current = max(current, 1) * 100
            last_unit = False
        elif word == "thousand" and in_run:
            total, current, last_unit = total + max(current, 1) * 1000, 0, False
        else:
            flush()
            last_unit = False
    flush()
    return numbers


def score_vqa(category: str, answer: str, reply: str) -> bool:
    """Does `reply` give `answer`? Case, punctuation, spelling (grey/gray, colour/color),
    plurals and number words do not matter; naming the answer *and* something else of its
    kind ("red or blue", "3 or 4") is wrong, as is "13" for 3."""
    words = reply_words(reply)
    if category in NUMERIC_CATEGORIES:
        numbers = reply_numbers(words)
        return bool(numbers) and all(n == int(answer) for n in numbers)
    if category not in VQA_WORDS:
        raise PrimeError(f"no VQA scoring for category {category!r}; categories: "
                         f"{', '.join([*VQA_WORDS, *sorted(NUMERIC_CATEGORIES)])}")
    expected = reply_words(answer)
    return {w for w in words if w in VQA_WORDS[category]} == set(expected)


def load_vqa_records(path: Path) -> list[dict[str, Any]]:
    """A VQA chat JSONL, image paths made absolute (they are relative to the file)."""
    path = Path(path)
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        record = json.loads(line)
        if "category" not in record or "answer" not in record:
            raise PrimeError(f"{path}:{number}: a VQA record needs `category` and `answer`")
        for message in record["messages"]:
            if isinstance(message["content"], list):
                for part in message["content"]:
                    if part.get("type") == "image" and "path" in part:
                        part["path"] = str((path.parent / part["path"]).resolve())
        records.append(record)
    return records


def run_vqa_suite(model, data: Path, max_new_tokens: int = 16, limit: int | None = None) -> dict[str, Any]:
    """Greedy replies to each record's question (its turns before the assistant's answer),
    scored by `score_vqa`: accuracy overall, per category and per phrasing (seen in
    training or not). `model` is anything with PrimeModel's `chat(messages, ...)`."""
    records = load_vqa_records(data)[:limit]
    if not records:
        raise PrimeError(f"{data}: no VQA records")
    cases = []
    for record in records:
        question = record["messages"][:-1] if record["messages"][-1]["role"] == "assistant" else record["messages"]
        reply = model.chat(question, max_new_tokens=max_new_tokens, temperature=0.0).strip()
        cases.append({"category": record["category"], "answer": record["answer"], "reply": reply,
                      "phrasing": record.get("phrasing", "seen"),
                      "passed": score_vqa(record["category"], record["answer"], reply)})
    return {"suite": f"vqa-{Path(data).name}", "data_sha256": sha256_file(Path(data)),
            "score": sum(c["passed"] for c in cases) / len(cases),
            "by_category": accuracy_by(cases, "category"), "by_phrasing": accuracy_by(cases, "phrasing"),
            "cases": cases}


def accuracy_by(cases: list[dict[str, Any]], key: str) -> dict[str, float]:
    groups = sorted({c[key] for c in cases})
    return {g: sum(c["passed"] for c in cases if c[key] == g) / sum(c[key] == g for c in cases) for g in groups}


# -- held-out feedback -----------------------------------------------------------------------


def reply_logprob(model: PrimeModel, prompt: list[dict[str, str]], reply: str) -> tuple[float, int]:
    """(sum of log p, token count) of `reply` after `prompt`, through the chat template."""
    context = model.tokenize(model.apply_chat_template(prompt))
    full = model.tokenize(model.apply_chat_template(prompt + [{"role": "assistant", "content": reply}],
                                                    add_generation_prompt=False))
    if full[:len(context)] != context:  # a template that rewrites earlier turns: score the whole reply span
        raise PrimeError(f"{model.name}: the chat template does not extend the prompt; cannot score replies")
    logprobs = model.token_logprobs(full)[len(context) - 1:]
    return sum(logprobs), len(logprobs)


def feedback_scores(model: PrimeModel, sft: list[dict[str, Any]], dpo: list[dict[str, Any]]) -> dict[str, Any]:
    """How well a model fits held-out feedback: the mean per-token NLL of the replies users
    approved or wrote (lower is better), and how often it prefers the chosen reply of a
    pair by per-token log-likelihood (higher is better; per token, as lm-eval's
    acc_norm, so a longer reply is not penalised for its length). Records longer than the model's
    context are skipped (counted in `skipped`), the same ones for every model with this
    tokenizer and context."""
    result: dict[str, Any] = {"skipped": 0}

    def fits(prompt: list[dict[str, str]], *replies: str) -> bool:
        longest = max(replies, key=len)
        text = model.apply_chat_template(prompt + [{"role": "assistant", "content": longest}], add_generation_prompt=False)
        if model.count_tokens(text) + 8 > model.context_length:
            result["skipped"] += 1
            return False
        return True

    if sft:
        total, count = 0.0, 0
        for record in sft:
            messages = record["messages"]
            if fits(messages[:-1], messages[-1]["content"]):
                logprob, n = reply_logprob(model, messages[:-1], messages[-1]["content"])
                total, count = total - logprob, count + n
        if count:
            result["reply_nll"] = total / count
            result["sft_examples"] = len(sft)
    if dpo:
        wins = scored = 0
        for pair in dpo:
            prompt = pair["prompt"] if isinstance(pair["prompt"], list) else [{"role": "user", "content": pair["prompt"]}]
            if fits(prompt, pair["chosen"], pair["rejected"]):
                chosen, n_chosen = reply_logprob(model, prompt, pair["chosen"])
                rejected, n_rejected = reply_logprob(model, prompt, pair["rejected"])
                wins += chosen / n_chosen > rejected / n_rejected
                scored += 1
        if scored:
            result["pair_accuracy"] = wins / scored
            result["dpo_pairs"] = scored
    return result


# -- perplexity and speed --------------------------------------------------------------------


def perplexity(model: PrimeModel, text: str | None = None, window: int = PERPLEXITY_WINDOW) -> dict[str, Any]:
    """exp(mean negative log-likelihood) of the text's tokens, window by window.

    Windows do not overlap (each token after a window's first is scored once), the
    usual fixed-length evaluation; the same windows for every model with this tokenizer.
    """
    ids = model.tokenize(text or general_text())
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window + 1]
        if len(chunk) < 2:
            break
        logprobs = model.token_logprobs(chunk)
        total -= sum(logprobs)
        count += len(logprobs)
    return {"perplexity": math.exp(total / count), "tokens": count, "window": window}


def speed(model: PrimeModel, new_tokens: int = 64) -> dict[str, float]:
    """Prompt tokens/s (time to the first streamed piece) and decode tokens/s."""
    words = general_text().split()[:180]
    messages = [{"role": "user", "content": "Summarize this text in two sentences:\n" + " ".join(words)}]
    start = time.perf_counter()
    first = None
    for _ in model.chat(messages, stream=True, max_new_tokens=new_tokens, temperature=0.0, stop=["\n\n\n"]):
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    generated = model.complete(model.encode_chat(messages), max_new_tokens=new_tokens, temperature=0.0, stop=["\n\n\n"])
    first = first or end
    return {"prompt_tokens_per_s": generated.prompt_tokens / max(first - start, 1e-9),
            "decode_tokens_per_s": max(generated.completion_tokens - 1, 0) / max(end - first, 1e-9),
            "prompt_tokens": generated.prompt_tokens, "completion_tokens": generated.completion_tokens}


def peak_rss_mb() -> float:
    """This process's peak resident memory. On Linux from VmHWM: getrusage's ru_maxrss
    survives exec, so a child started by a big parent would report the parent's peak."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


# -- choosing the variant, and recording the result --------------------------------------------


def variant_runtime(manifest, variant: str | None, device: str = "cpu") -> tuple[str, Runtime]:
    """(variant name, runtime) for `--quant`: a GGUF name (f16, q8_0, q4_k_m, ...) runs on
    llama.cpp; f32 is the safetensors on transformers; int8 / nf4 are those through
    bitsandbytes."""
    if variant is None:
        runtime = plan_runtime(manifest, device=device, hardware=detect_hardware(), libraries=detect_libraries())
        names = {q.file: n for n, q in manifest.quantizations.items()}
        return names.get(runtime.weights, runtime.weights), runtime
    if variant in ("int8", "nf4"):
        quantization = "8bit" if variant == "int8" else "4bit"
        runtime = plan_runtime(manifest, quantization=quantization, device=device, backend="transformers",
                               hardware=detect_hardware(), libraries=detect_libraries())
        return f"bnb-{variant}", runtime
    entry = manifest.quantizations.get(variant)
    if entry is None:
        have = ", ".join([*manifest.quantizations, "int8", "nf4"])
        raise PrimeError(f"{manifest.name} has no {variant!r} variant (have: {have}); `prime export` writes GGUF ones")
    backend = "llamacpp" if entry.format == "gguf" else "transformers"
    # A vision model's GGUF sees through the projector recorded with it (None on other entries).
    return variant, Runtime(backend, device, None, entry.file, entry.format, f"prime eval --quant {variant}",
                            mmproj=entry.mmproj)


def load_variant(path: Path, variant: str | None = None, *, runtime: Runtime | None = None) -> PrimeModel:
    """One variant of a model directory on CPU (see `variant_runtime`), loaded for scoring;
    a context manager that closes it. A caller that already planned the variant (to label
    it) passes that `runtime` instead of planning it twice."""
    manifest = read_manifest(path)
    if runtime is None:
        _, runtime = variant_runtime(manifest, variant)
    return PrimeModel.load(path, manifest, runtime, scoring=True)


def evaluate(model: PrimeModel, suite: Suite = "all", system_prompt: str | None = JARVIS_SYSTEM_PROMPT,
             vqa_data: Path | None = None) -> dict[str, Any]:
    """The suites asked for (the VQA suite whenever `vqa_data` is given: a vision model's
    held-out questions), then speed and memory."""
    if suite == "vqa" and vqa_data is None:
        raise PrimeError("the vqa suite needs its data: a VQA chat JSONL (python -m jarvis_prime.recipes.vision_data)")
    result: dict[str, Any] = {"backend": model.runtime.backend, "weights": model.runtime.weights,
                              "evaluated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if suite in ("perplexity", "all"):
        result["perplexity"] = perplexity(model)
    if suite in ("jarvis", "all"):
        result["jarvis"] = run_jarvis_suite(model, system_prompt)
    if suite == "tools" or suite == "all" and model.calls_tools:
        result["tools"] = run_tool_suite(model)
    if vqa_data is not None:
        result["vqa"] = run_vqa_suite(model, vqa_data)
    result["speed"] = speed(model)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def all_variants(manifest) -> list[str]:
    """Every quantization prime.json records, most precise first: each GGUF (on llama.cpp,
    with its projector for a vision model) and the safetensors (on transformers)."""
    return sorted(manifest.quantizations, key=lambda name: (-manifest.quantizations[name].bits, name))


def evaluate_variants(path: Path, variants: Sequence[str], suite: Suite = "all",
                      system_prompt: str | None = JARVIS_SYSTEM_PROMPT, vqa_data: Path | None = None,
                      on_variant=lambda variant, runtime: None) -> dict[str, dict[str, Any]]:
    """`evaluate` on each variant in turn (loaded, scored, closed before the next), for one
    table across quantizations: what 4 bits cost against 8, 16 and the transformers model."""
    manifest = read_manifest(path)
    results = {}
    for variant in variants:
        name, runtime = variant_runtime(manifest, variant)
        on_variant(name, runtime)
        with load_variant(path, runtime=runtime) as model:
            results[name] = evaluate(model, suite, system_prompt, vqa_data=vqa_data)
    return results


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """A result without the per-case replies (too long for prime.json or a JSON report)."""
    kept = json.loads(json.dumps(result))
    for suite in ("jarvis", "tools", "vqa"):
        if suite in kept:
            kept[suite].pop("cases", None)
    return kept


def eval_key(variant: str, system_prompt: str | None) -> str:
    return variant if system_prompt else f"{variant}/no-system-prompt"


def record(model_dir: Path, key: str, result: dict[str, Any]) -> None:
    """Merge `result` into prime.json metrics.eval[key] (replies stay out: too long)."""
    kept = summary(result)
    with store_lock(model_dir):
        manifest = read_manifest(model_dir)
        metrics = dict(manifest.metrics)
        evals = dict(metrics.get("eval", {}))
        evals[key] = {**evals.get(key, {}), **kept}
        metrics["eval"] = evals
        write_manifest(model_dir, manifest.model_copy(update={"metrics": metrics}), changed=[])
