"""Exact arithmetic for the `calculator` tool: a small evaluator over Python's AST, never `eval`.

Only numbers, parentheses and + - * / // % ** (and unary + -) are accepted; every number is a
`Fraction`, so 0.1 + 0.2 is 3/10 and 1/3 * 3 is 1, exactly. Each step is bounded before it runs:
the expression's length, its depth, whole-number exponents up to `MAX_EXPONENT`, and results of
at most `MAX_BITS` bits (a power's size is estimated before it is computed), so no input makes the
evaluator run for long or eat memory; the tool loop's timeout is the last guard.
"""

from __future__ import annotations

import ast
import math
from decimal import Decimal, localcontext
from fractions import Fraction

MAX_CHARS = 500
MAX_DEPTH = 50
MAX_EXPONENT = 10_000
MAX_BITS = 20_000  # ~6000 decimal digits, numerator and denominator each
DECIMALS = 20  # digits of a non-terminating quotient's approximation


class CalculatorError(ValueError):
    """An expression the calculator refuses or cannot evaluate; the message says why (for the model)."""


def evaluate(expression: str) -> Fraction:
    if len(expression) > MAX_CHARS:
        raise CalculatorError(f"expression is {len(expression)} characters; at most {MAX_CHARS}")
    text = expression.strip().replace("^", "**").replace("\u00d7", "*").replace("\u00f7", "/")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as err:
        raise CalculatorError(f"not an arithmetic expression: {expression!r} ({err.msg})") from None
    return _value(tree.body, 0)


def _value(node: ast.AST, depth: int) -> Fraction:
    if depth > MAX_DEPTH:
        raise CalculatorError(f"expression nested deeper than {MAX_DEPTH}")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if isinstance(node.value, int):
            return _checked(Fraction(node.value))
        if not math.isfinite(node.value):
            raise CalculatorError(f"a number in the expression is too large")
        # a decimal literal as written (0.1 is 1/10, not the binary double nearest it): read back from its repr
        return Fraction(repr(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _value(node.operand, depth + 1)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _value(node.left, depth + 1), _value(node.right, depth + 1)
        return _checked(_OPERATORS[type(node.op)](left, right))
    if isinstance(node, ast.Name):
        raise CalculatorError(f"unknown name {node.id!r}: only numbers and + - * / // % ** are allowed")
    raise CalculatorError(f"{type(node).__name__} is not allowed: only numbers, parentheses and + - * / // % **")


def _divide(a: Fraction, b: Fraction) -> Fraction:
    if b == 0:
        raise CalculatorError("division by zero")
    return a / b


def _floor_divide(a: Fraction, b: Fraction) -> Fraction:
    if b == 0:
        raise CalculatorError("division by zero")
    return Fraction(a // b)


def _modulo(a: Fraction, b: Fraction) -> Fraction:
    if b == 0:
        raise CalculatorError("modulo by zero")
    return a % b


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1:
        raise CalculatorError(f"exponent {exponent} is not a whole number: exact arithmetic has no roots")
    if abs(exponent) > MAX_EXPONENT:
        raise CalculatorError(f"exponent {exponent} is beyond {MAX_EXPONENT}")
    if base == 0 and exponent < 0:
        raise CalculatorError("zero to a negative power")
    bits = max(base.numerator.bit_length(), base.denominator.bit_length()) * abs(int(exponent))
    if bits > MAX_BITS:
        raise CalculatorError(f"the result would have about {bits} bits; at most {MAX_BITS}")
    return base ** int(exponent)


_OPERATORS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
              ast.Div: _divide, ast.FloorDiv: _floor_divide, ast.Mod: _modulo, ast.Pow: _power}


def _checked(value: Fraction) -> Fraction:
    if max(value.numerator.bit_length(), value.denominator.bit_length()) > MAX_BITS:
        raise CalculatorError(f"a result is larger than {MAX_BITS} bits")
    return value


def format_number(value: Fraction) -> str:
    """An integer as an integer; a terminating decimal exactly (3/8 -> 0.375); any other
    fraction as p/q with its first `DECIMALS` significant digits."""
    if value.denominator == 1:
        return str(value.numerator)
    q = value.denominator
    for factor in (2, 5):
        while q % factor == 0:
            q //= factor
    with localcontext() as ctx:
        if q == 1:  # terminates: exact digits
            ctx.prec = value.denominator.bit_length() + value.numerator.bit_length() + 2
            return format(Decimal(value.numerator) / Decimal(value.denominator), "f")
        ctx.prec = DECIMALS
        return f"{value.numerator}/{value.denominator} (\u2248 {Decimal(value.numerator) / Decimal(value.denominator)})"
