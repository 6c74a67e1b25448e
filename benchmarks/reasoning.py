"""JARVIS reasoning: accuracy on the held-out word problems with and without it, in one run.

    python benchmarks/reasoning.py [--model prime-135m-chat-v1] [--samples 5] [--limit N]

Rows, same model and problems (jarvis/data/reasoning_problems.json, never trained on):
  direct                 one greedy reply to the bare question (what `jarvis chat` does)
  step-by-step           one greedy reply with the step-by-step instruction
  self-consistency k     k sampled step-by-step replies, majority vote (`/think`, `--reasoning`)
Answers are read the same way for every row (jarvis.reasoning.extract_answer). Prints a
table per problem kind and writes benchmarks/results/reasoning.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from jarvis.reasoning import extract_answer, load_problems, self_consistency, step_by_step_messages
from jarvis_prime import PrimeModel

RESULTS = Path(__file__).parent / "results" / "reasoning.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="prime-135m-chat-v1")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems")
    args = parser.parse_args()
    console = Console()
    problems = load_problems()[: args.limit]
    model = PrimeModel.from_pretrained(args.model, backend="llamacpp")
    modes = ["direct", "step-by-step", f"self-consistency k={args.samples}"]
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
            for mode, run in runs.items():
                start = time.perf_counter()
                answer = run()
                seconds[mode] += time.perf_counter() - start
                correct[mode].setdefault(p["kind"], []).append(answer == p["answer"])
            progress.advance(task)

    kinds = sorted({p["kind"] for p in problems})
    table = Table(title=f"{model.name} {model.version}: accuracy on {len(problems)} held-out problems")
    for column in ["mode", *kinds, "all", "s/problem"]:
        table.add_column(column, justify="right" if column != "mode" else "left")
    rows = {}
    for mode in modes:
        per_kind = {k: sum(correct[mode][k]) / len(correct[mode][k]) for k in kinds}
        overall = sum(sum(v) for v in correct[mode].values()) / len(problems)
        rows[mode] = {"accuracy": overall, "by_kind": per_kind, "seconds_per_problem": seconds[mode] / len(problems)}
        table.add_row(mode, *(f"{per_kind[k]:.0%}" for k in kinds), f"{overall:.0%}", f"{seconds[mode] / len(problems):.1f}")
    console.print(table)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"model": f"{model.name}@{model.version}", "problems": len(problems),
                                   "samples": args.samples, "machine": platform.machine(), "results": rows}, indent=2))
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
