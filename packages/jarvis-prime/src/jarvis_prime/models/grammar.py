"""GBNF grammars for structured replies: any JSON object, JSON matching a schema.

`GenerationParams.grammar` is GBNF, llama.cpp's grammar language, on both backends (the
transformers backend hands it to llguidance, which reads GBNF). A schema becomes GBNF
through llama-cpp-python's own converter (`json_schema_to_gbnf`, pure Python, imported
when called), so there is one JSON-schema compiler, the one llama.cpp's server uses.

Whitespace in the grammar is at most one space between tokens: a small model given a
grammar that allows any whitespace can fill its whole reply with newlines.
"""

from __future__ import annotations

import json
from typing import Any, Mapping


class GrammarError(ValueError):
    """A JSON schema that cannot become a grammar; the message says what was wrong."""


def json_schema_gbnf(schema: Mapping[str, Any] | None = None) -> str:
    """GBNF for a JSON value matching `schema`; None: any JSON object (`json_object`)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        gbnf = json_schema_to_gbnf(json.dumps(dict(schema) if schema is not None else {"type": "object"}))
    except Exception as err:  # noqa: BLE001  (the converter raises bare Exceptions and ValueErrors)
        raise GrammarError(f"cannot constrain decoding to this JSON schema: {err}") from err
    return flatten_repetitions(gbnf)


def rename_root(gbnf: str, name: str) -> str:
    """The grammar with its `root` rule named `name`, to embed it in a larger grammar."""
    lines = []
    for line in gbnf.splitlines():
        lines.append(f"{name} ::={line[len('root ::='):]}" if line.startswith("root ::=") else line)
    return "\n".join(lines)


def flatten_repetitions(gbnf: str) -> str:
    """`(x (x (x)?)?)?` (how the converter writes "up to n of x") as `(x){0,3}`: the same
    language in GBNF's repetition operator, which llama.cpp reads, and which llguidance
    needs past a few levels (its Lark reader refuses deep nesting: a maxLength of 30 is
    30 levels)."""
    out, i = [], 0
    while i < len(gbnf):
        if gbnf[i] == "(" and (j := gbnf.find(" (", i)) != -1:
            item = gbnf[i + 1:j]
            unit = f"({item} "
            n = 1
            while gbnf.startswith(unit, i + n * len(unit)):
                n += 1
            tail = f"({item}" + ")?" * (n + 1)
            if "(" not in item and ")" not in item and gbnf.startswith(tail, i + n * len(unit)):
                out.append(f"({item}){{0,{n + 1}}}")
                i += n * len(unit) + len(tail)
                continue
        out.append(gbnf[i])
        i += 1
    return "".join(out)
