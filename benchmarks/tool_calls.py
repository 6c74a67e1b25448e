"""How well a small model calls tools through `prime serve`'s format (models/tools.py).

    python benchmarks/tool_calls.py [--models smollm2-135m-instruct prime-135m-chat-v1]

Eight requests, each with the same two tools (get_weather, get_time) and greedy decoding
on llama.cpp, in two modes:
  auto       the model decides; its reply is read for <tool_call> blocks (Hermes format)
  required   decoding is constrained to one call of one of the tools (call_grammar)
Six requests want a tool (which one and which argument value are known), two want none.
A row counts: valid calls (the block parses), the right tool, the right argument value
(the expected city or timezone, case-insensitive substring), and for the two requests
that want no tool, whether the model answered in text. Prints one table and writes
benchmarks/results/tool_calls.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from rich.console import Console

from jarvis_prime import PrimeModel
from jarvis_prime.models.tools import call_grammar, parse_tool_calls
from jarvis_prime.tables import Col, print_table

RESULTS = Path(__file__).parent / "results" / "tool_calls.json"
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "The local time in a timezone",
                                      "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}},
                                                     "required": ["timezone"]}}},
]
# (request, expected tool or None, expected argument value)
CASES = [
    ("What is the weather in Paris?", "get_weather", "paris"),
    ("Is it raining in London right now?", "get_weather", "london"),
    ("How hot is it in Tokyo today?", "get_weather", "tokyo"),
    ("What time is it in Europe/Berlin?", "get_time", "berlin"),
    ("Tell me the current time in America/New_York.", "get_time", "new_york"),
    ("What's the local time in Asia/Kolkata?", "get_time", "kolkata"),
    ("What is the capital of France?", None, None),
    ("Write one sentence about the sea.", None, None),
]


def ask(model: PrimeModel, question: str, forced: bool) -> tuple[str | None, dict, str]:
    prompt = model.encode_chat([{"role": "user", "content": question}], tools=TOOLS)
    options = {"grammar": call_grammar(TOOLS)} if forced else {}
    reply = model.complete(prompt, max_new_tokens=80, temperature=0, **options).text
    _, calls = parse_tool_calls(reply)
    if not calls:
        return None, {}, reply
    try:
        return calls[0].name, json.loads(calls[0].arguments), reply
    except json.JSONDecodeError:
        return calls[0].name, {}, reply


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "prime-135m-chat-v1"])
    args = parser.parse_args()
    console, rows, results = Console(), [], {}
    for name in args.models:
        model = PrimeModel.from_pretrained(name, backend="llamacpp")
        for mode in ("auto", "required"):
            start, answered = time.perf_counter(), []
            for question, tool, value in CASES:
                called, arguments, reply = ask(model, question, mode == "required")
                answered.append({"question": question, "expected": tool, "called": called, "arguments": arguments,
                                 "right_tool": called == tool,
                                 "right_value": tool is not None and called == tool
                                 and value in json.dumps(arguments).lower().replace(" ", "_"),
                                 "reply": reply})
            wanted = [a for a in answered if a["expected"]]
            unwanted = [a for a in answered if not a["expected"]]
            summary = {"calls": sum(a["called"] is not None for a in wanted), "right_tool": sum(a["right_tool"] for a in wanted),
                       "right_value": sum(a["right_value"] for a in wanted),
                       "text_when_no_tool": sum(a["called"] is None for a in unwanted),
                       "seconds": round(time.perf_counter() - start, 1)}
            results[f"{name}/{mode}"] = {**summary, "answers": answered}
            rows.append([name, mode, f"{summary['calls']}/{len(wanted)}", f"{summary['right_tool']}/{len(wanted)}",
                         f"{summary['right_value']}/{len(wanted)}",
                         f"{summary['text_when_no_tool']}/{len(unwanted)}" if mode == "auto" else "n/a (forced)",
                         f"{summary['seconds']} s"])
        model.close()
    print_table(console, [Col("model", keep=True), Col("mode"), Col("parsed calls", justify="right"),
                          Col("right tool", justify="right"), Col("right argument", justify="right"),
                          Col("text when no tool is wanted", justify="right"), Col("time", justify="right")], rows,
                title="Tool calls, greedy, llama.cpp (benchmarks/tool_calls.py)")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": platform.machine(), "results": results}, indent=2))
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
