"""The tool-calling conversations `prime-135m-chat-v1` 1.1 is trained and scored on (issue #24).

JARVIS offers a local chat model its built-in tools (calculator, current_datetime,
search_conversations, remember, recall; only the first two without a conversation
store) in the Hermes format (`models/tools.py`), after a system message that holds the
remembered facts matching the user's message, if any. A case here is that exact prompt
in OpenAI's shape (`tools`, `messages`), then what the model should do:

  arithmetic   "What is 12 times 7?"        -> calculator({"expression": "12 * 7"}) -> "84" -> "12 * 7 = 84."
  datetime     "What time is it in Tokyo?"  -> current_datetime({"timezone": "Asia/Tokyo"}) -> "... 21:04 ..." -> answer
  remember     "Remember that my dog is called Rex." -> remember({"fact": "The user's dog is called Rex."}) -> "saved"
  recall       "What's my dog called?"      -> recall({"query": "dog"}) -> "- The user's dog is called Rex." -> answer
  none         "Who are you?"               -> a reply, no call (JARVIS persona replies from the chat recipe)

The tool's result is what JARVIS's tool would return (the calculator's number formatting,
the clock's line, memory's `- fact` lines): `packages/jarvis/tests/test_tools.py` runs
JARVIS's own calculator on generated expressions and checks it returns these results. The
answer after a result is short and copies it verbatim: a 135M model copies numbers well and
computes them badly.

Each category has wordings (and for facts and cities, whole templates) kept for the
held-out split only, so `eval_data/tool_suite.json` measures whether the model learnt when
and how to call, not the training sentences. Every case is drawn from its own random
stream, seeded by (seed, split, index): reproducible and independent of the split's size.

    python -m jarvis_prime.recipes.tool_data OUT.json --heldout 160 --seed 0   # the suite
"""

from __future__ import annotations

import argparse
import ast
import json
import operator
import random
import re
from datetime import datetime, timedelta, timezone
from decimal import Decimal, localcontext
from fractions import Fraction
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence
from zoneinfo import ZoneInfo

from jarvis_prime.evaluation import load_suite, normalise_expression
from jarvis_prime.files import atomic_write

DATA_VERSION = 1  # bump when what is drawn or how it is written changes: suite scores of different versions do not compare
SPLITS: tuple[str, ...] = ("train", "heldout")
CATEGORIES: tuple[str, ...] = ("arithmetic", "datetime", "remember", "recall", "none")


@lru_cache(maxsize=1)
def jarvis_tools() -> dict[str, Any]:
    """recipes/data/jarvis_tools.json: JARVIS's built-in tool schemas and memory header (a copy:
    jarvis_prime cannot import jarvis; a jarvis test fails when they drift)."""
    return json.loads(resources.files("jarvis_prime").joinpath("recipes", "data", "jarvis_tools.json")
                      .read_text(encoding="utf-8"))


def offered_tools(store: bool = True) -> list[dict[str, Any]]:
    """The tools JARVIS offers: all five with a conversation store, calculator and clock without."""
    data = jarvis_tools()
    return [t for t in data["tools"] if store or t["function"]["name"] in data["without_store"]]


def memory_system(facts: Sequence[str]) -> str:
    """The system message JARVIS writes for remembered facts (`Chatbot._with_memory`, no persona prompt)."""
    return "\n".join([jarvis_tools()["memory_header"], *(f"- {f}" for f in facts)])


# -- arithmetic ----------------------------------------------------------------------------

def format_number(value: Fraction) -> str:
    """A result as JARVIS's calculator prints it (integers, terminating decimals exactly: the
    generator only draws those)."""
    if value.denominator == 1:
        return str(value.numerator)
    with localcontext() as ctx:  # exact, as the calculator does: a float loses digits ("8477296.4000000004")
        ctx.prec = value.denominator.bit_length() + value.numerator.bit_length() + 2
        text = format(Decimal(value.numerator) / Decimal(value.denominator), "f")
    assert Fraction(text) == value, value  # only terminating decimals are drawn
    return text


def _int(r: random.Random, digits: Sequence[int] = (1, 2, 2, 3, 3, 4)) -> int:
    d = r.choice(digits)
    return r.randint(2 if d == 1 else 10 ** (d - 1), 10 ** d - 1)


def _decimal(r: random.Random) -> str:
    return f"{r.randint(1, 999)}.{r.randint(1, 99):02d}".rstrip("0")


def _number(r: random.Random) -> str:
    return _decimal(r) if r.random() < 0.2 else str(_int(r))


def _division(r: random.Random) -> tuple[str, str]:
    """a / b with a terminating result: an exact quotient, or a divisor of 2, 4, 5, 8, 10, 20, 25."""
    if r.random() < 0.6:
        b = _int(r, (1, 1, 2))
        return str(b * _int(r, (1, 2, 3))), str(b)
    return str(_int(r)), str(r.choice((2, 4, 5, 8, 10, 20, 25)))


# op -> (draw numbers, expression, accepted expressions, {split: wordings})
ARITHMETIC: dict[str, tuple[Callable[[random.Random], dict[str, str]], str, tuple[str, ...], dict[str, tuple[str, ...]]]] = {
    "mul": (lambda r: {"a": _number(r), "b": str(_int(r))}, "{a} * {b}", ("{b} * {a}",), {
        "train": ("What is {a} times {b}?", "What's {a} * {b}?", "Multiply {a} by {b}.", "Calculate {a} x {b}.",
                  "{a} times {b}?", "what is {a}*{b}", "Can you multiply {a} and {b}?", "What's the product of {a} and {b}?",
                  "How much is {a} times {b}?", "What's {a} multiplied by {b}?", "Work out {a} times {b}.", "{a} x {b}?"),
        "heldout": ("How much is {a} multiplied by {b}?", "Work out {a} × {b} for me.", "what's {a} x {b}?")}),
    "add": (lambda r: {"a": _number(r), "b": _number(r)}, "{a} + {b}", ("{b} + {a}",), {
        "train": ("What is {a} plus {b}?", "Add {a} and {b}.", "What's {a} + {b}?", "{a} + {b} = ?",
                  "What's the sum of {a} and {b}?", "Calculate {a} plus {b}.",
                  "How much is {a} plus {b}?", "Add up {a} and {b}.", "What's the total of {a} and {b}?",
                  "What do {a} and {b} come to?"),
        "heldout": ("What do {a} and {b} add up to?", "How much is {a} + {b}?", "Total of {a} and {b}, please.")}),
    "sub": (lambda r: (lambda a, b: {"a": str(max(a, b)), "b": str(min(a, b))})(_int(r), _int(r)), "{a} - {b}", (), {
        "train": ("What is {a} minus {b}?", "Subtract {b} from {a}.", "{a} - {b} = ?", "What's {a} - {b}?",
                  "Calculate {a} minus {b}.",
                  "What's {a} take away {b}?", "How much is {a} minus {b}?", "Take {b} away from {a}.",
                  "If I have {a} and take away {b}, how much is left?", "Take {b} from {a}.", "Deduct {b} from {a}.",
                  "Remove {b} from {a}. How much remains?", "{a} less {b}?", "How much is left when {b} is taken off {a}?",
                  "Knock {b} off {a}.", "What is {b} less than {a}?"),
        "heldout": ("How much is {a} take away {b}?", "What's left if I take {b} from {a}?")}),
    "div": (lambda r: dict(zip("ab", _division(r))), "{a} / {b}", (), {
        "train": ("What is {a} divided by {b}?", "Divide {a} by {b}.", "What's {a} / {b}?", "{a} / {b} = ?",
                  "Calculate {a} divided by {b}.",
                  "Split {a} {b} ways.", "How much is {a} divided by {b}?", "{a} shared equally by {b} is how much each?",
                  "If {a} is split evenly {b} ways, what does each get?", "What is {a} over {b}?",
                  "Share {a} between {b} people.", "{a} split between {b}, how much each?", "Divide {a} into {b} equal parts.",
                  "Split {a} into {b} equal shares.", "How much does each get if {a} is shared among {b}?",
                  "{a} divided {b} ways?", "Split {a} {b} ways, please."),
        "heldout": ("How much is {a} split {b} ways?", "What do you get when you divide {a} by {b}?")}),
    "pct": (lambda r: {"p": str(r.choice((5, 10, 12, 15, 20, 25, 30, 40, 50, 75, 8, 18))), "a": str(_int(r, (2, 3, 3, 4)))},
            "{a} * {p} / 100", ("{p} / 100 * {a}", "{a} * 0.{p:0>2}", "{p} * {a} / 100", "0.{p:0>2} * {a}"), {
        "train": ("What is {p} percent of {a}?", "What's {p}% of {a}?", "Calculate {p}% of {a}.",
                  "How much is {p} percent of {a}?",
                  "Find {p} percent of {a}.", "{p} percent of {a}?", "Work out {p}% of {a} for me."),
        "heldout": ("Work out {p} percent of {a}.", "{p}% of {a} is how much?")}),
    "sq": (lambda r: {"a": str(_int(r, (1, 2, 2, 3)))}, "{a} ** 2", ("{a} * {a}", "{a}**2", "{a} ^ 2"), {
        "train": ("What is {a} squared?", "Square {a}.", "What's {a} to the power of 2?", "{a} squared?",
                  "What's {a} times itself?", "Find the square of {a}.", "How much is {a} to the power of 2?"),
        "heldout": ("What's the square of {a}?", "How much is {a} squared?")}),
    "add_mul": (lambda r: {"a": str(_int(r, (1, 2, 2))), "b": str(_int(r, (1, 2, 2))), "c": str(_int(r, (1, 1, 2)))},
                "({a} + {b}) * {c}", ("{c} * ({a} + {b})",), {
        "train": ("Add {a} and {b}, then multiply by {c}.", "What is ({a} + {b}) * {c}?", "({a} + {b}) times {c}?",
                  "Add {a} to {b} and multiply the total by {c}."),
        "heldout": ("Take {a} plus {b} and multiply the result by {c}.",)}),
    "mul_add": (lambda r: {"a": str(_int(r, (1, 2, 2))), "b": str(_int(r, (1, 2))), "c": str(_int(r, (2, 3)))},
                "{a} * {b} + {c}", ("{c} + {a} * {b}", "({a} * {b}) + {c}"), {
        "train": ("What is {a} times {b} plus {c}?", "Calculate {a} * {b} + {c}.", "What's {a} x {b} + {c}?",
                  "Multiply {a} and {b}, then add {c}.", "Take {a} times {b} and add {c} to it."),
        "heldout": ("Multiply {a} by {b} and add {c}.",)}),
}
# How often training draws each operation (1 when absent); the held-out split draws them evenly.
# Subtraction's and division's verbs ("take 50 from", "split 4 ways") and (a + b) * c's brackets
# were the misses: twice as often, arithmetic 75 -> 81 %, end to end 9 -> 11 of 12 (README, run L).
ARITHMETIC_WEIGHTS: dict[str, int] = {"sub": 2, "div": 2, "add_mul": 2}
ARITHMETIC_ANSWERS = ("{expression} = {result}.", "The answer is {result}.", "That's {result}.", "{result}.")


# The operators this module's expressions use; `**` only ever has a whole exponent here.
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.Pow: lambda base, exponent: base ** int(exponent)}


def evaluate_expression(expression: str) -> Fraction:
    """The exact value of one of this module's own expressions (numbers, + - * / ** and
    parentheses; nothing else is ever generated), read through Python's AST as JARVIS's
    calculator reads it. That calculator (with its bounds for untrusted input) is in a
    layer above this one; packages/jarvis/tests/test_tools.py checks the two agree on
    every generated expression."""

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp):
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        return Fraction(repr(node.value))  # a decimal as written: 0.1 is 1/10

    return value(ast.parse(expression, mode="eval").body)


def _arithmetic(r: random.Random, split: str) -> dict[str, Any]:
    ops = list(ARITHMETIC)
    op = r.choices(ops, weights=[ARITHMETIC_WEIGHTS.get(o, 1) for o in ops])[0] if split == "train" else r.choice(ops)
    draw, expression, alternatives, wordings = ARITHMETIC[op]
    numbers = draw(r)
    question = r.choice(wordings[split]).format(**numbers)
    expression = expression.format(**numbers)
    result = format_number(evaluate_expression(expression))
    return {"question": question, "tool": "calculator", "arguments": {"expression": expression},
            "expect": {"expression": sorted({normalise_expression(e.format(**numbers)) for e in (expression, *alternatives)})},
            "result": result, "answer": r.choice(ARITHMETIC_ANSWERS).format(expression=expression, result=result)}


# -- date and time -------------------------------------------------------------------------

CITIES = {"train": {"Tokyo": "Asia/Tokyo", "Paris": "Europe/Paris", "London": "Europe/London",
                    "New York": "America/New_York", "Los Angeles": "America/Los_Angeles", "Sydney": "Australia/Sydney",
                    "Berlin": "Europe/Berlin", "Madrid": "Europe/Madrid", "Rome": "Europe/Rome",
                    "Chicago": "America/Chicago", "Toronto": "America/Toronto", "Dubai": "Asia/Dubai",
                    "Singapore": "Asia/Singapore", "Hong Kong": "Asia/Hong_Kong", "Moscow": "Europe/Moscow",
                    "Cairo": "Africa/Cairo", "Seoul": "Asia/Seoul", "Lisbon": "Europe/Lisbon",
                    "Amsterdam": "Europe/Amsterdam", "Athens": "Europe/Athens", "Bangkok": "Asia/Bangkok",
                    "Shanghai": "Asia/Shanghai", "Denver": "America/Denver", "Nairobi": "Africa/Nairobi",
                    "Stockholm": "Europe/Stockholm", "Mexico City": "America/Mexico_City",
                    "Warsaw": "Europe/Warsaw", "Budapest": "Europe/Budapest", "Brussels": "Europe/Brussels",
                    "Copenhagen": "Europe/Copenhagen", "Oslo": "Europe/Oslo", "Helsinki": "Europe/Helsinki",
                    "Zurich": "Europe/Zurich", "Istanbul": "Europe/Istanbul", "Bucharest": "Europe/Bucharest",
                    "Belgrade": "Europe/Belgrade", "Kyiv": "Europe/Kyiv", "Riga": "Europe/Riga",
                    "Sofia": "Europe/Sofia", "Luxembourg": "Europe/Luxembourg", "Monaco": "Europe/Monaco",
                    "Jakarta": "Asia/Jakarta", "Manila": "Asia/Manila", "Karachi": "Asia/Karachi",
                    "Tehran": "Asia/Tehran", "Kolkata": "Asia/Kolkata", "Lima": "America/Lima",
                    "Bogota": "America/Bogota", "Santiago": "America/Santiago", "Phoenix": "America/Phoenix",
                    "Vancouver": "America/Vancouver", "Lagos": "Africa/Lagos", "Casablanca": "Africa/Casablanca",
                    "Johannesburg": "Africa/Johannesburg", "Auckland": "Pacific/Auckland", "Honolulu": "Pacific/Honolulu"},
          "heldout": {"Vienna": "Europe/Vienna", "Dublin": "Europe/Dublin", "Prague": "Europe/Prague",
                      "Tokyo": "Asia/Tokyo", "London": "Europe/London", "New York": "America/New_York",
                      "Paris": "Europe/Paris", "Sydney": "Australia/Sydney"}}
# (wording, what the answer tells: date / time / weekday)
DATETIME = {"train": (("What's the date today?", "date"), ("What day is it?", "weekday"), ("What time is it?", "time"),
                      ("What's today's date?", "date"), ("Which day of the week is it?", "weekday"),
                      ("what time is it now", "time"), ("What is the date?", "date"), ("Tell me the time.", "time"),
                      ("What time is it in {city}?", "time"), ("What's the time in {city} right now?", "time"),
                      ("What's the date in {city}?", "date"), ("What day is it in {city}?", "weekday"),
                      ("Current time in {city}?", "time"),
                      ("Do you know the time?", "time"), ("What's the time?", "time"), ("Can you tell me today's date?", "date"),
                      ("What day of the week is it today?", "weekday"), ("Tell me the date in {city}.", "date"),
                      ("What time is it right now in {city}?", "time"), ("Which day is it in {city} today?", "weekday"),
                      ("How late is it in {city}?", "time"), ("Time in {city}, please.", "time"),
                      ("Give me the time in {city}.", "time"), ("What's the current time in {city}?", "time"),
                      ("What date is it in {city}?", "date"), ("Do you know the time in {city}?", "time"),
                      ("Could you tell me the date?", "date"), ("Do you know the date?", "date"),
                      # more ways of naming a place: with 14 wordings, held-out ones naming a city were
                      # answered `current_datetime({})`, the no-place call (runs O-Q: 7-10 of 24)
                      ("Can you tell me the time in {city}?", "time"), ("What is the time in {city} at the moment?", "time"),
                      ("I need the current time in {city}.", "time"), ("What's today's date in {city}?", "date"),
                      ("Tell me the day of the week in {city}.", "weekday"), ("Check the clock in {city} for me.", "time"),
                      ("What hour is it in {city}?", "time"), ("Is it late in {city} right now?", "time"),
                      ("Is it morning in {city} yet?", "time"),
                      ("What's the date right now in {city}?", "date"), ("Show me the local time for {city}.", "time"),
                      ("Which date is it today in {city}?", "date"), ("What's the time now?", "time"),
                      ("Which date is it today?", "date"), ("Can you check the time for me?", "time"),
                      ("What day is today?", "weekday")),
            "heldout": (("Do you know what day it is today?", "weekday"), ("Could you tell me the current time?", "time"),
                        ("What's the local time over in {city}?", "time"), ("Today's date, please.", "date"),
                        ("Tell me what time it is in {city}.", "time"), ("What's the date over in {city} today?", "date"))}


def clock_line(now: datetime, zone: str | None) -> str:
    """What JARVIS's current_datetime returns for `now` (jarvis.tools.builtin.current_datetime)."""
    offset = now.strftime("%z")
    return f"{now:%A %d %B %Y, %H:%M:%S} {now.tzname()} (UTC{offset[:3]}:{offset[3:]}){f', {zone}' if zone else ''}"


def clock_wordings(split: str, names_place: bool | None = None) -> list[tuple[str, str]]:
    """The split's clock wordings; training's also hold each place wording without its place
    ("What time is it in {city}?" -> "What time is it?"): the same words with and without a
    place, so that only the place decides whether the call carries a zone. A share of place
    wordings set which way the model guessed on held-out wordings: every city question `{}`
    (run P, 14 of 28 wordings), every question without a place a zone (run R, 26 of 44)."""
    wordings = list(DATETIME[split])
    if split == "train":
        wordings += [(w.replace(" in {city}", ""), tells) for w, tells in DATETIME[split] if " in {city}" in w]
    return [w for w in dict.fromkeys(wordings) if names_place is None or ("{city}" in w[0]) == names_place]


def _datetime(r: random.Random, split: str, names_place: bool | None = None) -> dict[str, Any]:
    """A clock question; `names_place` False: one that names no place (the call carries no time
    zone). Training names a place in half of them (the held-out split draws its wordings evenly)."""
    if names_place is None and split == "train":
        names_place = r.random() < 0.5
    wording, tells = r.choice(clock_wordings(split, names_place))
    city = r.choice(sorted(CITIES[split])) if "{city}" in wording else None
    zone = CITIES[split][city] if city else None
    instant = datetime(2024, 1, 1, tzinfo=timezone.utc) + timedelta(minutes=r.randint(0, 3 * 365 * 24 * 60))
    now = instant.astimezone(ZoneInfo(zone or r.choice(("Europe/London", "America/New_York", "Europe/Paris"))))
    where = f" in {city}" if city else ""
    answer = {"date": f"Today{where} is {now:%A %d %B %Y}." if not city else f"It's {now:%A %d %B %Y} in {city}.",
              "time": f"It's {now:%H:%M}{where}.", "weekday": f"It's {now:%A}{where}."}[tells]
    return {"question": wording.format(city=city), "tool": "current_datetime",
            "arguments": {"timezone": zone} if zone else {}, "expect": {"timezone": [zone]} if zone else {},
            "result": clock_line(now, zone), "answer": answer}


# -- memory --------------------------------------------------------------------------------

SLOTS = {"date": ("3 May", "12 June", "28 February", "9 October", "21 March", "14 July", "1 December", "30 August"),
         "name": ("Rex", "Luna", "Max", "Bella", "Milo", "Coco", "Oscar", "Nala", "Sara", "David", "Anna", "Tom"),
         "colour": ("blue", "green", "red", "purple", "yellow", "orange", "black", "teal"),
         "food": ("peanuts", "shellfish", "gluten", "penicillin", "cats", "pollen", "eggs", "dairy"),
         "job": ("nurse", "teacher", "software engineer", "architect", "chef", "pilot", "lawyer", "plumber"),
         "city": ("Lyon", "Leeds", "Boston", "Osaka", "Porto", "Munich", "Denver", "Austin"),
         "car": ("red Toyota", "blue Volvo", "Tesla", "old Fiat", "green Mini"),
         "drink": ("green tea", "black coffee", "hot chocolate", "sparkling water", "orange juice")}
# (user says "my ...", the fact as saved, the user's ways of asking for it, recall query words, the answer
# from the fact). One way of asking per fact taught the eight questions, not recall: "What is my cat's
# name?" (held out) read as a fact to save, `remember` (runs O-Q: up to 8 of 16 recall cases).
FACTS = {"train": (
    ("my sister's birthday is {date}", "The user's sister's birthday is {date}.",
     ("When is my sister's birthday?", "Do you remember my sister's birthday?", "What date is my sister's birthday?"),
     ("sister", "birthday"), "Your sister's birthday is {date}."),
    ("my dog is called {name}", "The user's dog is called {name}.",
     ("What's my dog called?", "What is my dog's name?", "Do you remember what my dog is called?",
      "What did I name my dog?"), ("dog",), "Your dog is called {name}."),
    ("my favourite colour is {colour}", "The user's favourite colour is {colour}.",
     ("What's my favourite colour?", "Which colour do I like best?", "Do you remember my favourite colour?"),
     ("colour",), "Your favourite colour is {colour}."),
    ("I'm allergic to {food}", "The user is allergic to {food}.",
     ("What am I allergic to?", "Do you remember my allergy?", "What did I say I'm allergic to?"), ("allerg",),
     "You're allergic to {food}."),
    ("I work as a {job}", "The user works as a {job}.",
     ("What do I do for a living?", "What's my job?", "Do you remember what I work as?", "What is my profession?"),
     ("work", "job"), "You work as a {job}."),
    ("I live in {city}", "The user lives in {city}.",
     ("Where do I live?", "Which city do I live in?", "Do you remember where I live?"), ("live", "home"),
     "You live in {city}."),
    ("my wife's name is {name}", "The user's wife's name is {name}.",
     ("What's my wife's name?", "What is my wife called?", "Do you remember my wife's name?"), ("wife",),
     "Your wife's name is {name}."),
    ("my anniversary is on {date}", "The user's anniversary is on {date}.",
     ("When is my anniversary?", "When's my anniversary?", "Do you remember our anniversary date?"),
     ("anniversary",), "Your anniversary is on {date}.")),
    "heldout": (
    ("my brother's birthday is {date}", "The user's brother's birthday is {date}.", ("When's my brother's birthday?",),
     ("brother", "birthday"), "Your brother's birthday is {date}."),
    ("my cat is called {name}", "The user's cat is called {name}.", ("What is my cat's name?",), ("cat",),
     "Your cat is called {name}."),
    ("I drive a {car}", "The user drives a {car}.", ("What car do I drive?",), ("car", "drive"), "You drive a {car}."),
    ("my favourite drink is {drink}", "The user's favourite drink is {drink}.", ("What's my favourite drink?",),
     ("drink",), "Your favourite drink is {drink}."))}
REMEMBER = {"train": ("Remember that {p}.", "Please remember that {p}.", "Don't forget that {p}.",
                      "remember {p}", "Can you remember that {p}?", "Note for later: {p}. Remember it.",
                      "Note that {p}.", "For the record, {p}.", "Make sure you remember that {p}.",
                      "Store this: {p}.", "Save the fact that {p}.", "Please note down that {p}.", "Jot this down: {p}.",
                      "I want you to remember that {p}.", "Memorise this: {p}.", "Could you save this: {p}?",
                      "Keep this in your memory: {p}.", "Write down that {p}.",
                      "Hold on to this for me: {p}.", "Log this: {p}."),
            "heldout": ("Keep in mind that {p}.", "Save this for later: {p}.", "Make a note that {p}.")}
ABOUT_ME = {"train": ("What do you know about me?", "What have I asked you to remember?",
                      "What facts have you saved about me?", "List everything you know about me.",
                      "What have I told you about myself?"),
            "heldout": ("Tell me what you remember about me.",)}
REMEMBERED = ("Got it, I'll remember that.", "Saved. I'll remember that.", "Noted, I'll remember it.")


def _fact(r: random.Random, split: str) -> tuple[tuple, dict[str, str]]:
    template = r.choice(FACTS[split])
    slots = {key: r.choice(values) for key, values in SLOTS.items()}
    return template, slots


def _remember(r: random.Random, split: str) -> dict[str, Any]:
    (says, fact, *_), slots = _fact(r, split)
    value = next(slots[k] for k in SLOTS if "{" + k + "}" in says)
    return {"question": r.choice(REMEMBER[split]).format(p=says.format(**slots)), "tool": "remember",
            "arguments": {"fact": fact.format(**slots)}, "expect": {"fact": [value]}, "result": "saved",
            "answer": r.choice(REMEMBERED)}


def _recall(r: random.Random, split: str) -> dict[str, Any]:
    (_, fact, asks, words, answer), slots = _fact(r, split)
    if r.random() < 0.15:  # "what do you know about me": every fact, any query
        facts = [_fact(r, "train") for _ in range(2)] + [((None, fact, None, None, answer), slots)]
        lines = "\n".join(f"- {t[1].format(**s)}" for t, s in facts)
        return {"question": r.choice(ABOUT_ME[split]), "tool": "recall", "arguments": {"query": "the user"},
                "expect": {"query": []}, "result": lines,
                "answer": "You told me this: " + " ".join(t[4].format(**s) for t, s in facts)}
    if r.random() < 0.15:
        return {"question": r.choice(asks), "tool": "recall", "arguments": {"query": words[0]},
                "expect": {"query": list(words)}, "result": "nothing remembered about that",
                "answer": "You haven't told me that yet."}
    return {"question": r.choice(asks), "tool": "recall", "arguments": {"query": " ".join(words)}, "expect": {"query": list(words)},
            "result": f"- {fact.format(**slots)}", "answer": answer.format(**slots)}


DRAW = {"arithmetic": _arithmetic, "datetime": _datetime, "remember": _remember, "recall": _recall,
        # training only (the suite draws CATEGORIES): a clock question that names no place. A call
        # with no arguments is rare in the data (every other tool has one), so the model adds a zone.
        "datetime-here": lambda r, split: _datetime(r, split, names_place=False)}


def conversation(case: dict[str, Any], call_id: str) -> list[dict[str, Any]]:
    """The user's question, the call, its result and the answer, as OpenAI messages (what
    JARVIS's tool loop sends back to the model)."""
    return [{"role": "user", "content": case["question"]},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": call_id, "type": "function",
                 "function": {"name": case["tool"], "arguments": json.dumps(case["arguments"])}}]},
            {"role": "tool", "tool_call_id": call_id, "content": case["result"]},
            {"role": "assistant", "content": case["answer"]}]


def draw_case(seed: int, split: str, index: int, category: str) -> dict[str, Any]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    r = random.Random(f"tools-{DATA_VERSION}-{seed}-{split}-{index}-{category}")
    return {"id": f"{category}-{index}", "category": category, **DRAW[category](r, split)}


# -- the held-out suite --------------------------------------------------------------------

NONE_HELDOUT = ("How many legs does a spider have?", "What year did the Second World War end?",
                "Write a haiku about the number seven.", "Who wrote Romeo and Juliet?",
                "Give me three tips for sleeping better.", "What is the boiling point of water in Celsius?",
                "Translate 'thank you' into French.", "Tell me a short joke.", "What's a good name for a goldfish?",
                "Explain what a prime number is in one sentence.", "Hello!", "Thanks, that's all for now.",
                "How do I boil an egg?", "What is the capital of Japan?", "Suggest a title for my blog about hiking.")
# A prompt that asks for arithmetic ("What is 2 plus 2?") wants the calculator once tools are offered.
ASKS_ARITHMETIC = re.compile(r"\d\s*(plus|minus|times|divided|percent|squared|[-+*/x×%])", re.IGNORECASE)
SUITE_MIX = {"arithmetic": 0.4, "datetime": 0.15, "remember": 0.1, "recall": 0.1}  # the rest: no tool


def heldout_suite(seed: int = 0, count: int = 160) -> dict[str, Any]:
    """The suite `prime eval --suite tools` scores: tool cases drawn from the held-out wordings,
    no-tool cases from NONE_HELDOUT and the JARVIS behaviour suite's prompts (both held out of
    every training set); a share of cases offer the two tools JARVIS offers without a store."""
    cases = []
    for category, share in SUITE_MIX.items():
        for i in range(round(count * share)):
            case = draw_case(seed, "heldout", i, category)
            cases.append({"id": case["id"], "category": category, "user": case["question"],
                          "store": category in ("remember", "recall") or i % 4 != 0,
                          "expect": {"tool": case["tool"], "arguments": case["expect"]},
                          **({"result": case["result"]} if category == "arithmetic" else {})})
    prompts = list(NONE_HELDOUT) + [c["user"] for c in load_suite()["cases"] if not ASKS_ARITHMETIC.search(c["user"])]
    for i in range(count - len(cases)):
        cases.append({"id": f"none-{i}", "category": "none", "user": prompts[i % len(prompts)], "store": i % 4 != 0,
                      "expect": {"tool": None}})
    data = jarvis_tools()
    return {"name": "tool-suite", "version": DATA_VERSION, "seed": seed,
            "description": "JARVIS's built-in tools offered as JARVIS offers them (Hermes format; all five with a "
                           "store, calculator and clock without): does the model call the right tool with valid, "
                           "expected arguments, and no tool when none is needed. Drawn by "
                           "jarvis_prime.recipes.tool_data from wordings held out of training.",
            "tools": data["tools"], "without_store": data["without_store"], "cases": cases}


def main() -> None:
    parser = argparse.ArgumentParser(description="write the held-out tool suite")
    parser.add_argument("out", type=Path)
    parser.add_argument("--heldout", type=int, default=160)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    atomic_write(args.out, (json.dumps(heldout_suite(args.seed, args.heldout), indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
