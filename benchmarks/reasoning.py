"""JARVIS reasoning: accuracy on the held-out word problems with and without it, in one run.

    python benchmarks/reasoning.py [--model prime-135m-chat-v1] [--reasoning-model prime-135m-reasoning-v1]
                                   [--samples 5] [--limit N]

Rows, same problems (jarvis/data/reasoning_problems.json, never trained on):
  direct                 --model: one greedy reply to the bare question (what `jarvis chat` does)
  step-by-step           --model: one greedy reply with the step-by-step instruction
  self-consistency k     --model: k sampled step-by-step replies, majority vote (`/think`, `--reasoning`)
  reasoning model        --reasoning-model: one greedy reply to the bare question; it thinks in
                         <think>...</think> first (`--reasoning-model ''` leaves the row out)
Answers are read the same way for every row (jarvis.reasoning.extract_answer, which reads a
thinking reply after its </think>). Prints one table (accuracy per problem kind, seconds per
problem) and writes benchmarks/results/reasoning.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from jarvis.reasoning import extract_answer, load_problems, self_consistency, step_by_step_messages
from jarvis_prime.hardware import cpu_name
from jarvis_prime import PrimeModel
from jarvis_prime.tables import Col, print_table

RESULTS = Path(__file__).parent / "results" / "reasoning.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="prime-135m-chat-v1")
    parser.add_argument("--reasoning-model", default="prime-135m-reasoning-v1")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems")
    args = parser.parse_args()
    console = Console()
    problems = load_problems()[: args.limit]
    model = PrimeModel.from_pretrained(args.model, backend="llamacpp")
    reasoner = PrimeModel.from_pretrained(args.reasoning_model, backend="llamacpp") if args.reasoning_model else None
    modes = ["direct", "step-by-step", f"self-consistency k={args.samples}"]
    if reasoner is not None:
        modes.append("reasoning model")
    correct = {mode: {} for mode in modes}
    seconds = {mode: 0.0 for mode in modes}

    with Progress(console=console) as progress:
        task = progress.add_task("problems", total=len(problems))
        for p in problems:
            question = [{"role": "user", "content": p["question"]}]
            runs = {
                modes[0]: lambda: extract_answer(model.chat(question, max_new_tokens=args.max_new_tokens)),
                modes[1]: lambda: extract_answer(model.chat(step_by_step_messages(question), max_new_tokens=args.max_new_tokens)),
                modes[2]: lambda: self_consistency(model, question, k=args.samples, max_new_tokens=args.max_new_tokens).answer,
            }
            if reasoner is not None:
                runs["reasoning model"] = lambda: extract_answer(reasoner.chat(question, max_new_tokens=args.max_new_tokens,
                                                                               temperature=0.0))
            for mode, run in runs.items():
                start = time.perf_counter()
                answer = run()
                seconds[mode] += time.perf_counter() - start
                correct[mode].setdefault(p["kind"], []).append(answer == p["answer"])
            progress.advance(task)

    kinds = sorted({p["kind"] for p in problems})
    names = {mode: f"{model.name} {model.version}" for mode in modes}
    if reasoner is not None:
        names["reasoning model"] = f"{reasoner.name} {reasoner.version}"
    columns = [Col("mode", keep=True), Col("model", keep=True), *(Col(k, justify="right") for k in kinds),
               Col("all", justify="right"), Col("s/problem", justify="right")]
    table = []
    rows = {}
    for mode in modes:
        per_kind = {k: sum(correct[mode][k]) / len(correct[mode][k]) for k in kinds}
        overall = sum(sum(v) for v in correct[mode].values()) / len(problems)
        rows[mode] = {"model": names[mode], "accuracy": overall, "by_kind": per_kind,
                      "seconds_per_problem": seconds[mode] / len(problems)}
        table.append([mode, names[mode], *(f"{per_kind[k]:.0%}" for k in kinds), f"{overall:.0%}", f"{seconds[mode] / len(problems):.1f}"])
    print_table(console, columns, table, title=f"accuracy on {len(problems)} held-out problems "
                                               f"(llama.cpp, {cpu_name()})")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"model": f"{model.name}@{model.version}",
                                   "reasoning_model": f"{reasoner.name}@{reasoner.version}" if reasoner else None,
                                   "problems": len(problems),
                                   "samples": args.samples, "machine": cpu_name(), "results": rows}, indent=2))
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
