"""JARVIS's tools on a chat model: the held-out tool suite, arithmetic end to end, latency.

    python benchmarks/tool_suite.py [--models smollm2-135m-instruct prime-135m-chat-v1] [--limit N]

For each model (llama.cpp, greedy, the file `PrimeModel` picks), three accuracies on
jarvis_prime's held-out suite (eval_data/tool_suite.json, `prime eval --suite tools`):
  right tool     cases that need a tool: the right one, schema-valid, with the expected argument
  no tool        cases that need none: no call
  arithmetic     the arithmetic cases END TO END through JARVIS's real tool loop
                 (jarvis.tool_loop with the built-in calculator): the final answer holds the result
and per-turn latency (median wall seconds of a whole reply) for questions that need no tool
and for arithmetic, which takes a tool round trip (call, calculator, answer). The tools are
those JARVIS offers: all five with a conversation store, calculator and clock without, as
each case says. Prints one table and writes benchmarks/results/tool_suite.json, labelled with
the CPU (jarvis_prime.hardware.cpu_name); a model measured earlier on the same CPU stays in
the file and the table, so models can be measured one run at a time. Timings move 2-3x on a
shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from jarvis.memory import ConversationStore
from jarvis.tool_loop import run_tool_loop
from jarvis.tools.builtin import ToolContext, builtin_tools
from jarvis.tools.calls import ToolResult
from jarvis.tools.registry import ToolRegistry
from jarvis_prime import PrimeModel
from jarvis_prime.evaluation import load_tool_suite, run_tool_suite
from jarvis_prime.hardware import cpu_name
from jarvis_prime.tables import Col, print_table

RESULTS = Path(__file__).parent / "results" / "tool_suite.json"
OPTIONS = {"max_new_tokens": 64, "temperature": 0.0}


def answers_with(reply: str, result: str) -> bool:
    """The reply states the calculator's result (thousands separators read as nothing)."""
    return result in reply.replace(",", "")


def end_to_end(model: PrimeModel, case: dict[str, Any], store: ConversationStore) -> dict[str, Any]:
    """One user turn through JARVIS's tool loop with its built-in tools; the reply, the tools run, the time."""
    context = ToolContext(store, lambda: None) if case["store"] else None
    registry = ToolRegistry(builtin_tools(context))
    start = time.perf_counter()
    pieces = list(run_tool_loop(model, [{"role": "user", "content": case["user"]}], registry, **OPTIONS))
    seconds = time.perf_counter() - start
    reply = "".join(p.text for p in pieces if not isinstance(p, ToolResult)).strip()
    tools = [f"{p.call.name}({p.call.arguments}) -> {p.output}" for p in pieces if isinstance(p, ToolResult)]
    return {"id": case["id"], "user": case["user"], "reply": reply, "tools": tools, "seconds": seconds}


def measure(name: str, limit: int | None) -> dict[str, Any]:
    suite = load_tool_suite()
    arithmetic = [c for c in suite["cases"] if c["category"] == "arithmetic"][:limit]
    plain = [c for c in suite["cases"] if c["category"] == "none"][:limit]
    with PrimeModel.from_pretrained(name, backend="llamacpp") as model, tempfile.TemporaryDirectory() as home:
        scored = run_tool_suite(model)
        store = ConversationStore(Path(home) / "jarvis.db")
        sums = [{**end_to_end(model, c, store), "result": c["result"]} for c in arithmetic]
        for row in sums:
            row["right"] = answers_with(row["reply"], row["result"])
        chats = [end_to_end(model, c, store) for c in plain]
        version = model.manifest.version
    return {"model": name, "version": version, "tool_accuracy": scored["tool_accuracy"],
            "no_tool_accuracy": scored["no_tool_accuracy"], "by_category": scored["by_category"],
            "arithmetic_end_to_end": sum(r["right"] for r in sums) / len(sums),
            "latency_s": {"no_tool": statistics.median(r["seconds"] for r in chats),
                          "tool_round_trip": statistics.median(r["seconds"] for r in sums)},
            "suite_cases": scored["cases"], "end_to_end": sums, "no_tool_turns": chats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "prime-135m-chat-v1"])
    parser.add_argument("--limit", type=int, default=None, help="end-to-end cases per kind (default: all)")
    args = parser.parse_args()
    console = Console()
    earlier = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    kept = {r["model"]: r for r in earlier.get("results", []) if earlier.get("cpu") == cpu_name()}
    kept.update({name: measure(name, args.limit) for name in args.models})
    results = list(kept.values())
    pct = lambda x: f"{100 * x:.0f} %"  # noqa: E731
    print_table(console, [Col("model", keep=True), Col("version", keep=True), Col("right tool", justify="right"),
                          Col("no tool when none needed", justify="right"),
                          Col("arithmetic end to end", justify="right"), Col("turn, no tool", justify="right"),
                          Col("turn with a tool round trip", justify="right")],
                [[r["model"], r["version"], pct(r["tool_accuracy"]), pct(r["no_tool_accuracy"]),
                  pct(r["arithmetic_end_to_end"]), f"{r['latency_s']['no_tool']:.2f} s",
                  f"{r['latency_s']['tool_round_trip']:.2f} s"] for r in results],
                title=f"JARVIS's tools, held-out suite, greedy, llama.cpp on {cpu_name()} (benchmarks/tool_suite.py)")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"cpu": cpu_name(), "results": results}, indent=1))
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
