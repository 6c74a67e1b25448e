"""The arithmetic word problems `prime-135m-reasoning-v1` is trained and scored on (issue #22).

A problem is a *structure* (the arithmetic: `each_left` is a * b - c) told in one of
its *wordings*; a template is one (structure, wording) pair with an id such as
`each_left/2`. Each structure keeps one or two wordings for the held-out split only, so
the held-out figure measures whether the model learnt to read a problem, not the
training sentences. Numbers, names and objects are drawn per problem.

Every structure has at least 12 training wordings (data version 3; version 2 had 4 or 5,
and the first model read held-out sentences that name the operation in other words --
"double that", "a 20 dollar note", "What is the change?" -- at 40.8 %). They vary the
sentence frame, where the question stands, and the words for the operation (more,
another, altogether, combined, sum; left, remain, still, spent, used up, fewer; each,
every, per, apiece, costs; equally, split, divided; twice, double, 2 times, doubled;
half, halved, one half; bill, note, change, money back, left over; a day, per hour, each
week). No training wording repeats a held-out one or one with a word swapped.

  add       a + b                 "Ava has 35 shells. She finds 48 more. ..."
  left      a - b                 "... gives 12 to Omar. How many are left?"
  each      a * b                 "6 boxes with 9 pencils in each box"
  share     a / b (exact)         "shares 72 stickers equally among 8 friends"
  twice     a * 2                 "twice as many"
  half      a / 2 (exact)         "half as many"
  times     a * b                 "4 times as many"
  groups    a / b (exact)         "72 pencils packed in boxes of 8: how many boxes"
  two and three steps combine them: each_left, add_left, twice_total, half_total,
  change (bill - n * price), rate_days (rate * (d1 + d2)), share_left ((a - b) / c),
  each_add_left (a * b + c - d), twice_total_left (a + 2a - c), each_half_left.

The target is what a 135M model can learn: one short line per step with the arithmetic
written out, then the answer line that `jarvis_prime.answers.extract_answer` reads:

  <think>
  6 * 9 = 54
  54 - 14 = 40
  </think>
  The answer is 40.

SmolLM2 tokenizes digits one by one, so a one-digit times many-digit product is written
as the easy products it is made of ("7 * 23 = 7 * 20 + 7 * 3 = 140 + 21 = 161"), a quotient
of 10 or more as its tens and units ("144 / 9 = 90 / 9 + 54 / 9 = 10 + 6 = 16"), and a
sum or difference one place value at a time ("264 + 196 = 264 + 100 + 90 + 6 = 364 + 90 + 6
= 454 + 6 = 460"): the first model, trained with sums written in one go, got 3-digit sums
and differences wrong about half the time (held-out add 33 %, left 17 %).

Every problem is drawn from its own random stream, seeded by (seed, split, index), so a
split is reproducible and independent of its size.

    python -m jarvis_prime.recipes.reasoning_data OUT_DIR --train 4000 --heldout 200 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from jarvis_prime.answers import THINK_END, THINK_START
from jarvis_prime.files import atomic_write, sha256_file
from jarvis_prime.progress import Log

DATA_VERSION = 4  # bump when what is drawn or how it is written changes: scores of different versions do not compare
# version 3: 12 or more training wordings per structure (was 4 or 5), and 5 training wordings that read wrong for
# some draws reworded (eaten coins, 9 work days in a week); the held-out problems are those of version 2
# version 4: products of a one-digit number and a number of 3 digits, and quotients of 10 or more, written
# in parts (`Step.line`): 31 of version 3's 57 held-out errors were slips (the operands right, the result
# wrong), 14 of them in products and quotients
SPLITS: tuple[str, ...] = ("train", "heldout")

NAMES = ("Ava", "Ben", "Mia", "Omar", "Lena", "Raj", "Sofia", "Tom", "Yuki", "Kofi", "Nora", "Leo", "Ines", "Sam",
         "Priya", "Hugo", "Zara", "Ali", "Emma", "Jonas", "Chloe", "Diego", "Hana", "Ivan", "Maya", "Noah", "Lucy")
OBJECTS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "shells", "stamps", "cards", "flowers",
           "eggs", "coins", "balloons", "candles", "crayons", "buttons", "oranges", "toy cars", "beads", "cupcakes")
CONTAINERS = ("boxes", "bags", "baskets", "jars", "packs", "crates", "trays", "shelves")
PLACES = ("a box", "a basket", "a jar", "a shop", "the library", "a classroom", "a bag")


@dataclass(frozen=True)
class Step:
    """One line of the solution: `a op b = result`."""
    a: int
    op: str  # + - * /
    b: int
    result: int

    def line(self) -> str:
        """The step as written in the target. A 135M model cannot add, subtract or multiply
        multi-digit numbers in one go, so the step is written as the easy steps it is made
        of: a one-digit times many-digit product as the products of the big number's place
        values, a quotient of 10 or more as the quotients of its tens and its units (the
        model picks the multiple of the divisor that gives the tens, then divides what is
        left), a sum or difference one place value of the second number at a time (each move
        changes one digit of the running total, plus a carry)."""
        if self.op == "*":
            small, big = sorted((self.a, self.b))
            parts = place_values(big)
            if 2 <= small <= 9 and len(parts) > 1:
                return (f"{self.a} * {self.b} = " + " + ".join(f"{small} * {part}" for part in parts) + " = "
                        + " + ".join(str(small * part) for part in parts) + f" = {self.result}")
        if self.op == "/" and self.result >= 10 and self.result % 10:
            tens, units = self.result - self.result % 10, self.result % 10
            return (f"{self.a} / {self.b} = {self.b * tens} / {self.b} + {self.b * units} / {self.b} = "
                    f"{tens} + {units} = {self.result}")
        if self.op in "+-":
            parts = place_values(self.b)
            if len(parts) > 1:
                chain, total = [f"{self.a} {self.op} " + f" {self.op} ".join(map(str, parts))], self.a
                for i, part in enumerate(parts[:-1]):
                    total = total + part if self.op == "+" else total - part
                    chain.append(f"{total} {self.op} " + f" {self.op} ".join(map(str, parts[i + 1:])))
                return f"{self.a} {self.op} {self.b} = " + " = ".join(chain) + f" = {self.result}"
        return f"{self.a} {self.op} {self.b} = {self.result}"


def place_values(n: int) -> list[int]:
    """`n`'s non-zero place values, largest first: 196 -> [100, 90, 6], 40 -> [40]."""
    digits = str(n)
    return [int(d) * 10 ** (len(digits) - 1 - i) for i, d in enumerate(digits) if d != "0"] or [0]


def step(a: int, op: str, b: int) -> Step:
    """A step with its result; division must be exact and nothing goes below zero."""
    if op == "+":
        result = a + b
    elif op == "-":
        result = a - b
    elif op == "*":
        result = a * b
    elif op == "/":
        if b == 0 or a % b:
            raise ValueError(f"{a} / {b} is not a whole number")
        result = a // b
    else:
        raise ValueError(f"unknown operation {op!r}")
    if result < 0:
        raise ValueError(f"{a} {op} {b} is negative")
    return Step(a, op, b, result)


# A structure draws its numbers and returns (values for the wordings, the steps).
Draw = Callable[[random.Random], tuple[dict[str, int], list[Step]]]


def _add(r):
    a, b = r.randint(5, 300), r.randint(3, 200)
    return {"a": a, "b": b}, [step(a, "+", b)]


def _left(r):
    a = r.randint(10, 400)
    b = r.randint(1, a - 1)
    return {"a": a, "b": b}, [step(a, "-", b)]


def _each(r):
    a, b = r.randint(2, 9), r.randint(2, 40)
    return {"a": a, "b": b}, [step(a, "*", b)]


def _share(r):
    b, q = r.randint(2, 9), r.randint(2, 30)
    return {"a": b * q, "b": b}, [step(b * q, "/", b)]


def _twice(r):
    a = r.randint(3, 150)
    return {"a": a}, [step(a, "*", 2)]


def _half(r):
    a = 2 * r.randint(2, 150)
    return {"a": a}, [step(a, "/", 2)]


def _times(r):
    a, k = r.randint(2, 40), r.randint(3, 9)
    return {"a": a, "k": k}, [step(a, "*", k)]


def _groups(r):
    b, q = r.randint(2, 12), r.randint(2, 25)
    return {"a": b * q, "b": b}, [step(b * q, "/", b)]


def _each_left(r):
    a, b = r.randint(2, 9), r.randint(3, 30)
    c = r.randint(1, a * b - 1)
    first = step(a, "*", b)
    return {"a": a, "b": b, "c": c}, [first, step(first.result, "-", c)]


def _add_left(r):
    a, b = r.randint(10, 200), r.randint(5, 150)
    c = r.randint(1, a + b - 1)
    first = step(a, "+", b)
    return {"a": a, "b": b, "c": c}, [first, step(first.result, "-", c)]


def _twice_total(r):
    a = r.randint(3, 120)
    first = step(a, "*", 2)
    return {"a": a}, [first, step(a, "+", first.result)]


def _half_total(r):
    a = 2 * r.randint(3, 120)
    first = step(a, "/", 2)
    return {"a": a}, [first, step(a, "+", first.result)]


def _change(r):
    n, p = r.randint(2, 9), r.randint(2, 15)
    bill = next(x for x in (10, 20, 50, 100, 200) if x >= n * p)
    first = step(n, "*", p)
    return {"n": n, "p": p, "bill": bill}, [first, step(bill, "-", first.result)]


def _rate_days(r):
    rate, d1, d2 = r.randint(3, 25), r.randint(2, 9), r.randint(2, 9)
    first = step(d1, "+", d2)
    return {"rate": rate, "d1": d1, "d2": d2}, [first, step(rate, "*", first.result)]


def _share_left(r):
    c, q = r.randint(2, 9), r.randint(2, 25)
    b = r.randint(1, 60)
    a = c * q + b
    first = step(a, "-", b)
    return {"a": a, "b": b, "c": c}, [first, step(first.result, "/", c)]


def _each_add_left(r):
    a, b, c = r.randint(2, 9), r.randint(3, 25), r.randint(2, 60)
    d = r.randint(1, a * b + c - 1)
    first = step(a, "*", b)
    second = step(first.result, "+", c)
    return {"a": a, "b": b, "c": c, "d": d}, [first, second, step(second.result, "-", d)]


def _twice_total_left(r):
    a = r.randint(3, 90)
    c = r.randint(1, 3 * a - 1)
    first = step(a, "*", 2)
    second = step(a, "+", first.result)
    return {"a": a, "c": c}, [first, second, step(second.result, "-", c)]


def _each_half_left(r):
    a, b = r.randint(2, 9), r.randint(2, 20)
    if (a * b) % 2:
        b += 1
    first = step(a, "*", b)
    return {"a": a, "b": b}, [first, step(first.result, "/", 2)]


# structure -> (draw, wordings); the last `HELDOUT_WORDINGS[structure]` wordings are held out.
# Wordings are str.format templates over the drawn numbers and {n1} {n2} (names), {obj}
# (plural object), {box} (plural container), {place}.
STRUCTURES: dict[str, tuple[Draw, tuple[str, ...]]] = {
    "add": (_add, (
        "{n1} has {a} {obj}. {n2} gives {n1} {b} more. How many {obj} does {n1} have now?",
        "{n1} collected {a} {obj} in the morning and {b} in the afternoon. How many {obj} did {n1} collect in all?",
        "There are {a} {obj} in {place}. {n1} puts in {b} more. How many {obj} are there now?",
        "{n1} counted {a} {obj} and then {b} more. How many {obj} did {n1} count?",
        "{n1} has {a} {obj} and {n2} has {b} {obj}. How many {obj} do they have together?",
        "{n1} has {a} {obj} and {n2} has {b} {obj}. How many {obj} do {n1} and {n2} have combined?",
        "{n1} puts {a} {obj} in a pile, and {n2} adds another {b}. How many {obj} are in the pile?",
        "How many {obj} are there altogether if {n1} brings {a} and {n2} brings {b}?",
        "{n1} had {a} {obj}. For a birthday, {n1} got another {b}. How many {obj} does {n1} have in total?",
        "{n1} sold {a} {obj} last week and {b} {obj} this week. How many {obj} did {n1} sell in the two weeks?",
        "A school bought {a} {obj} and later bought {b} more. How many {obj} did the school buy in all?",
        "{n1} spent {a} dollars on a bike and {b} dollars on a helmet. How many dollars did {n1} spend altogether?",
        "{n1} walked {a} steps to the park and {b} steps to the shop. How many steps did {n1} walk in total?",
        "There are {a} big {obj} and {b} small {obj}. How many {obj} are there?",
        "If {n1} has {a} {obj} and {n2} gives {n1} another {b}, how many {obj} will {n1} have?",
        "A library has {a} books on one floor and {b} books on another. How many books are on the two floors combined?",
        "{n1} scored {a} points in the first game and {b} points in the second. What is the sum of the two scores?",
        "{n1} and {n2} pool their {obj}: {n1} brings {a} and {n2} brings {b}. How many {obj} do they have now?",
        "{n1} had {a} {obj} and found {b} more. What is the total number of {obj} {n1} has?",
        "A shelf holds {a} {obj}. Then {b} more {obj} are added. How many {obj} are on the shelf altogether?",
    )),
    "left": (_left, (
        "{n1} has {a} {obj}. {n1} gives {b} {obj} to {n2}. How many {obj} does {n1} have left?",
        "There were {a} {obj} in {place}. {n1} took {b} of them. How many {obj} are left?",
        "{n1} bought {a} {obj} and used {b}. How many {obj} are left?",
        "{n1} had {a} {obj}. After giving away {b}, how many {obj} does {n1} have?",
        "There are {a} {obj}. {b} of them are sold. How many {obj} are not sold?",
        "{n1} took {a} {obj} on a trip and lost {b} of them on the way. How many {obj} came back home?",
        "{n1} baked {a} cookies and ate {b} of them. How many cookies are left?",
        "{n1} had {a} dollars and spent {b} dollars on a book. How many dollars does {n1} have now?",
        "A farmer grew {a} pumpkins and sold {b} at the market. How many pumpkins did the farmer not sell?",
        "{n1} had {a} {obj} and used up {b} of them. How many {obj} does {n1} still have?",
        "How many {obj} are left if {n1} has {a} and gives {b} away?",
        "{n1} needs {a} {obj} and already has {b}. How many more {obj} does {n1} need?",
        "A book has {a} pages. {n1} has read {b} of them. How many pages are still to read?",
        "{n1} had {a} {obj}. {n2} took {b} of them. How many {obj} does {n1} have now?",
        "There were {a} people at a party. {b} of them went home. How many people are still at the party?",
        "{n1} had {a} stamps and used {b} of them on letters. How many stamps are not used?",
        "{n1} has {a} {obj}, and {n2} has {b} fewer. How many {obj} does {n2} have?",
        "A tank holds {a} litres of water. After {b} litres are used up, how many litres remain in the tank?",
        "{n1} starts with {a} {obj} and loses {b}. How many {obj} remain?",
        "A store had {a} {obj}. It sold {b} of them. How many {obj} does the store still have?",
    )),
    "each": (_each, (
        "{n1} has {a} {box} with {b} {obj} in each. How many {obj} does {n1} have?",
        "There are {a} {box}. Each holds {b} {obj}. How many {obj} are there in total?",
        "{n1} buys {a} {box} of {obj}. Each has {b} {obj}. How many {obj} did {n1} buy?",
        "{n1} fills {a} {box}, putting {b} {obj} in every one. How many {obj} is that?",
        "Each of {a} {box} contains {b} {obj}. How many {obj} are in all the {box}?",
        "{n1} buys {a} {obj}. Each one costs {b} dollars. How many dollars does {n1} spend?",
        "There are {a} rows of chairs with {b} chairs in every row. How many chairs are there?",
        "A pack holds {b} {obj}. How many {obj} are in {a} packs?",
        "{n1} wants {a} {obj}, and they cost {b} dollars apiece. How much must {n1} pay in dollars?",
        "{n1} gives {b} {obj} to each of {a} friends. How many {obj} does {n1} give away?",
        "How many {obj} are in {a} {box} if there are {b} {obj} in each of them?",
        "A runner trains {b} minutes a day for {a} days. How many minutes does the runner train?",
        "A box of chocolates costs {b} dollars. {n1} buys {a} boxes. How many dollars does {n1} pay?",
        "Tickets to a show are {b} dollars per person. How many dollars do {a} people pay?",
        "{a} teams have {b} players apiece. How many players are there in all?",
        "{n1} packs {a} bags with {b} {obj} per bag. How many {obj} does {n1} pack?",
        "What is the total number of {obj} in {a} {box} with {b} {obj} in each?",
        "{a} children each bring {b} {obj}. How many {obj} do they bring altogether?",
        "One ticket costs {b} dollars. How many dollars do {a} tickets cost?",
    )),
    "share": (_share, (
        "{n1} has {a} {obj} and shares them equally among {b} friends. How many {obj} does each friend get?",
        "{a} {obj} are put into {b} {box} with the same number in each. How many {obj} are in each?",
        "{n1} splits {a} {obj} into {b} equal groups. How many {obj} are in each group?",
        "{a} {obj} are shared equally by {b} children. How many {obj} does each child get?",
        "{n1} divides {a} {obj} evenly into {b} {box}. How many {obj} go in each?",
        "{a} {obj} are divided among {b} friends so that each gets the same number. How many {obj} does each friend get?",
        "{b} people split {a} {obj} equally between them. How many {obj} is that per person?",
        "{n1} puts {a} {obj} into {b} {box}, the same number in each. How many {obj} go into each of the {box}?",
        "A prize of {a} dollars is split equally among {b} winners. How many dollars does each winner get?",
        "How many {obj} does each of {b} children get if {a} {obj} are shared out equally?",
        "{a} {obj} are divided equally into {b} piles. How many {obj} are in one pile?",
        "{n1} has {a} {obj} to hand out equally to {b} classmates. How many {obj} will each classmate get?",
        "{n1} spends {a} dollars on {b} tickets that all cost the same. How many dollars does one ticket cost?",
        "A coach divides {a} players equally into {b} teams. How many players are on each team?",
        "A rope {a} metres long is cut into {b} equal pieces. How many metres long is each piece?",
        "A teacher gives {a} {obj} to {b} students equally. How many {obj} does each student get?",
    )),
    "twice": (_twice, (
        "{n1} has {a} {obj}. {n2} has twice as many {obj} as {n1}. How many {obj} does {n2} have?",
        "{n1} made {a} {obj}. {n2} made twice as many. How many {obj} did {n2} make?",
        "{n1} has {a} {obj}. {n2} has double the number {n1} has. How many {obj} does {n2} have?",
        "{n1} scored {a} points. {n2} scored two times as many. How many points did {n2} score?",
        "{n1} collected {a} {obj}, and {n2} collected double that. How many {obj} did {n2} collect?",
        "{n1} had {a} {obj}. Then the number of {obj} doubled. How many {obj} does {n1} have now?",
        "{n2} has 2 times as many {obj} as {n1}. {n1} has {a}. How many {obj} does {n2} have?",
        "A small box holds {a} {obj}. A large box holds twice as many. How many {obj} fit in the large box?",
        "{n1} ran {a} metres. {n2} ran two times that distance. How many metres did {n2} run?",
        "A plant was {a} centimetres tall. A month later it was twice as tall. How many centimetres tall is it now?",
        "{n1} saved {a} dollars. {n2} saved twice as much. How many dollars did {n2} save?",
        "How many {obj} does {n2} have if {n2} has twice as many as {n1}, who has {a}?",
        "{n1} doubled a pile of {a} {obj}. How many {obj} are in the pile now?",
        "A recipe needs {a} grams of flour. {n1} makes the recipe two times. How many grams of flour does {n1} use?",
        "{n1} owns {a} {obj}, and {n2} owns twice that number. How many {obj} does {n2} own?",
    )),
    "half": (_half, (
        "{n1} has {a} {obj}. {n2} has half as many {obj} as {n1}. How many {obj} does {n2} have?",
        "{n1} had {a} {obj} and gave half of them to {n2}. How many {obj} does {n1} have left?",
        "{n1} has {a} {obj}. {n2} has half of that. How many {obj} does {n2} have?",
        "{n1} sorted {a} {obj} into two equal piles. How many {obj} are in one pile?",
        "{n1} has {a} {obj}. {n2} has one half of that number. How many {obj} does {n2} have?",
        "{n1} had {a} {obj} and sold half of them. How many {obj} did {n1} sell?",
        "A pile of {a} {obj} is split in two equal parts. How many {obj} are in each part?",
        "The price of a bike was {a} dollars. In a sale the price was halved. What is the new price in dollars?",
        "{n1} and {n2} share {a} {obj} equally. How many {obj} does each of them get?",
        "A road is {a} metres long. {n1} has walked half of it. How many metres has {n1} walked?",
        "{n1} has {a} {obj} and uses half of them. How many {obj} are left?",
        "How many {obj} does {n2} get if {n1} gives {n2} half of {n1}'s {a} {obj}?",
        "{n1}'s class collected {a} {obj}. Half of them went to a school fair. How many {obj} went to the fair?",
        "{n2} has half as many {obj} as {n1}, and {n1} has {a}. How many {obj} does {n2} have?",
        "Half of the {a} {obj} in {place} are red. How many red {obj} are there?",
    )),
    "times": (_times, (
        "{n1} has {a} {obj}. {n2} has {k} times as many. How many {obj} does {n2} have?",
        "A small jar holds {a} {obj}. A big jar holds {k} times as many. How many {obj} does the big jar hold?",
        "{n2} has {k} times the {obj} that {n1} has. {n1} has {a}. How many {obj} does {n2} have?",
        "A bus carries {a} people. A train carries {k} times as many. How many people does the train carry?",
        "{n1} has {a} {obj}. {n2} has {k} times that number. How many {obj} does {n2} have?",
        "A pencil costs {a} cents. A pen costs {k} times as much. How many cents does the pen cost?",
        "How many {obj} does {n2} have if {n2} has {k} times as many as {n1}, and {n1} has {a}?",
        "A shed is {a} feet tall. A tower is {k} times as tall. How many feet tall is the tower?",
        "{n1} walked for {a} minutes on Monday and {k} times as long on Sunday. How many minutes did {n1} walk on Sunday?",
        "A puppy weighs {a} kilograms. A big dog weighs {k} times as much. How many kilograms does the big dog weigh?",
        "{n1} saved {a} dollars. {n2} saved {k} times as much money. How many dollars did {n2} save?",
        "A small bag holds {a} {obj}; a sack holds {k} times as many. How many {obj} does the sack hold?",
        "A farm has {a} goats and {k} times as many chickens. How many chickens does the farm have?",
        "{n1} is {a} years old. {n1}'s grandfather is {k} times as old. How old is the grandfather?",
    )),
    "groups": (_groups, (
        "{n1} packs {a} {obj} into {box} of {b}. How many {box} does {n1} fill?",
        "There are {a} {obj}. They are put in groups of {b}. How many groups are there?",
        "{n1} has {a} {obj} and puts {b} in each bag. How many bags does {n1} need?",
        "{a} {obj} are sold in packs of {b}. How many packs are there?",
        "{n1} has {a} {obj} and wants to put {b} in each bag. How many bags will {n1} fill?",
        "Each of the {box} holds {b} {obj}. How many {box} are needed for {a} {obj}?",
        "{a} people are waiting for cars that take {b} people each. How many cars are needed?",
        "A ribbon is {a} centimetres long. {n1} cuts it into pieces {b} centimetres long. How many pieces does {n1} get?",
        "How many packs of {b} can {n1} make from {a} {obj}?",
        "{n1} reads {b} pages a day. How many days does it take {n1} to read {a} pages?",
        "Tickets cost {b} dollars each. How many tickets can {n1} buy with {a} dollars?",
        "{n1} lines up {a} {obj} in rows of {b}. How many rows does {n1} make?",
        "A baker has {a} cupcakes and puts {b} on every tray. How many trays does the baker use?",
        "{a} chairs are set out in rows with {b} chairs per row. How many rows are there?",
        "A class of {a} students is split into teams of {b}. How many teams are there?",
    )),
    "each_left": (_each_left, (
        "{n1} has {a} {box} with {b} {obj} in each. {n1} gives away {c} {obj}. How many {obj} are left?",
        "There are {a} {box} of {obj} with {b} in each. {c} {obj} are given away. How many {obj} are left?",
        "{n1} bought {a} {box} of {obj} with {b} in each and lost {c}. How many {obj} does {n1} have now?",
        "Each of {a} {box} holds {b} {obj}. {n1} removes {c} {obj}. How many {obj} remain in the {box}?",
        "{n1} buys {a} packs of {obj} with {b} in every pack and gives {c} to {n2}. How many {obj} does {n1} keep?",
        "{n1} has {a} {box}, each holding {b} {obj}. {c} of the {obj} are sold. How many {obj} are not sold?",
        "A teacher hands out {b} {obj} to each of {a} students and later collects {c} of them back. How many {obj} do the students still have?",
        "{n1} earns {b} dollars a day for {a} days and spends {c} dollars. How many dollars does {n1} have left?",
        "A theatre has {a} rows of {b} seats. {c} seats are taken. How many seats are empty?",
        "How many {obj} are left if {n1} fills {a} {box} with {b} {obj} each and then takes out {c}?",
        "{n1} bakes {a} trays of cookies with {b} cookies on each tray. {n1}'s family eats {c} of them. How many cookies are left?",
        "{obj_cap} come in {box} of {b}. {n1} buys {a} {box} and uses {c} of the {obj}. How many {obj} are still unused?",
        "Every one of {a} {box} has {b} {obj} in it. After {c} of the {obj} are taken away, how many {obj} remain?",
        "{n1} has {a} {box} of {obj}, {b} in each. {n1} sells {c} of them. How many {obj} does {n1} have now?",
        "A parking lot has {a} rows with {b} cars in each row. {c} cars leave. How many cars are still there?",
    )),
    "add_left": (_add_left, (
        "{n1} had {a} {obj}. {n1} got {b} more and then gave {c} to {n2}. How many {obj} does {n1} have now?",
        "There were {a} {obj} in {place}. {b} more were added and {c} were taken out. How many {obj} are there now?",
        "{n1} has {a} {obj}, gets {b} more, then loses {c}. How many {obj} does {n1} have?",
        "A bus has {a} people. At a stop {b} get on and {c} get off. How many people are on the bus?",
        "{n1} had {a} {obj} and bought another {b}. Then {n1} gave {c} away. How many {obj} does {n1} have?",
        "A library had {a} books. It bought {b} new books and gave {c} old books away. How many books does the library have now?",
        "{n1} has {a} {obj} and {n2} has {b}. They put them together and give {c} to friends. How many {obj} remain?",
        "There are {a} people on a train. {b} more get on, and then {c} get off. How many people are on the train now?",
        "{n1} collected {a} {obj} on Monday and {b} on Tuesday, then lost {c} of them. How many {obj} does {n1} have left?",
        "How many {obj} are left if {n1} has {a}, gets {b} more from {n2}, and uses {c}?",
        "A farmer picked {a} apples in the morning and {b} in the afternoon. {c} of them were sold. How many apples were not sold?",
        "{n1} had {a} dollars in a piggy bank and put in {b} more. Then {n1} took out {c} dollars for a game. How many dollars are in the piggy bank now?",
        "There were {a} {obj} in {place}. {n1} added {b}, and {n2} took away {c}. How many {obj} are there now?",
        "{n1} saved {a} dollars and earned {b} more, then spent {c} dollars. How many dollars are left?",
    )),
    "twice_total": (_twice_total, (
        "{n1} has {a} {obj}. {n2} has twice as many. How many {obj} do they have together?",
        "{n1} read {a} pages on Monday and twice as many on Tuesday. How many pages did {n1} read in the two days?",
        "{n1} has {a} {obj}. {n2} has two times as many. How many {obj} do the two have in all?",
        "A red box holds {a} {obj} and a blue box holds twice as many. How many {obj} are in both boxes?",
        "{n1} has {a} {obj}. The number of {obj} {n2} has is double that. How many {obj} do {n1} and {n2} have combined?",
        "{n1} ran {a} metres and {n2} ran two times as far. How many metres did they run altogether?",
        "A shop had {a} customers on Monday and 2 times as many on Tuesday. How many customers came on the two days?",
        "How many {obj} are there in all if {n1} has {a} and {n2} has twice as many?",
        "{n1} saved {a} dollars in May. In June {n1} saved double the May amount. How many dollars did {n1} save in the two months?",
        "A small tank holds {a} litres and a big tank holds twice as much. How many litres do both tanks hold together?",
        "{n1} picked {a} {obj}. {n2} picked twice that many. What is the total number of {obj} they picked?",
        "{n2} has twice as many {obj} as {n1}. {n1} has {a}. How many {obj} do {n1} and {n2} have in total?",
        "A book has {a} pages in part one and twice as many pages in part two. How many pages does the book have?",
        "On Saturday {n1} sold {a} {obj}. On Sunday {n1} sold double that. How many {obj} were sold over the weekend?",
    )),
    "half_total": (_half_total, (
        "{n1} has {a} {obj}. {n2} has half as many. How many {obj} do they have together?",
        "A farm has {a} cows and half as many horses. How many cows and horses are there in all?",
        "{n1} has {a} {obj} and {n2} has half that many. How many {obj} do the two have altogether?",
        "A red box holds {a} {obj} and a blue box holds half as many. How many {obj} are in both boxes?",
        "{n1} has {a} {obj}, and {n2} has half of that number. How many {obj} do they have in total?",
        "A shop sold {a} {obj} on Friday and half as many on Saturday. How many {obj} did it sell on the two days?",
        "How many {obj} are there altogether if {n1} has {a} and {n2} has half as many?",
        "A big jug holds {a} millilitres and a small jug holds half as much. How many millilitres do the two jugs hold together?",
        "{n1} read {a} pages. {n2} read half that number of pages. How many pages did they read combined?",
        "{n2} has half as many {obj} as {n1}, who has {a}. How many {obj} do the two of them have?",
        "A club has {a} girls and half as many boys. How many children are in the club?",
        "{n1} earned {a} dollars last week and half that amount this week. How many dollars did {n1} earn over the two weeks?",
        "There are {a} {obj} in one pile and half as many in another pile. How many {obj} are in the two piles?",
        "{n1} walked {a} metres before lunch and half that distance after lunch. How many metres did {n1} walk?",
    )),
    "change": (_change, (
        "{n1} buys {n} {obj} at {p} dollars each and pays with a {bill} dollar bill. How much change does {n1} get?",
        "{obj_cap} cost {p} dollars each. {n1} buys {n} of them with {bill} dollars. How many dollars are left?",
        "{n1} has {bill} dollars and buys {n} {obj} that cost {p} dollars each. How many dollars does {n1} have left?",
        "{n} {obj} cost {p} dollars each. {n1} pays {bill} dollars. How much money does {n1} get back?",
        "{n1} pays for {n} {obj} with a {bill} dollar note. Each one costs {p} dollars. How many dollars does {n1} get back?",
        "A ticket costs {p} dollars. {n1} buys {n} tickets and hands over {bill} dollars. What is {n1}'s change?",
        "{n1} has a {bill} dollar bill and buys {n} {obj} for {p} dollars apiece. How much money is left over?",
        "How much change does {n1} get from {bill} dollars after buying {n} {obj} at {p} dollars each?",
        "{n} {obj} at {p} dollars each are paid for with a {bill} dollar note. How many dollars of change are given?",
        "{n1} buys {n} notebooks that cost {p} dollars each and pays with {bill} dollars. How much money does {n1} receive back?",
        "{n1} takes {bill} dollars to the shop and buys {n} {obj}, paying {p} dollars for each. How many dollars does {n1} bring home?",
        "{n1} had {bill} dollars. {n1} bought {n} {obj} costing {p} dollars each. How much money is left?",
        "The price of one cake is {p} dollars. {n1} buys {n} cakes and pays with a {bill} dollar bill. How much change should {n1} get?",
        "With a {bill} dollar note, {n1} pays for {n} {obj} priced at {p} dollars each. What change does {n1} get?",
        "A shop sells {obj} for {p} dollars each. {n1} buys {n} and pays with a {bill} dollar note. What is the change?",
    )),
    "rate_days": (_rate_days, (
        "{n1} earns {rate} dollars a day. {n1} works {d1} days one month and {d2} days the next. How many dollars does {n1} earn?",
        "A machine makes {rate} {obj} an hour. It runs {d1} hours on Monday and {d2} hours on Tuesday. How many {obj} does it make?",
        "{n1} saves {rate} dollars a week for {d1} weeks and then {d2} more weeks. How many dollars does {n1} save?",
        "A baker makes {rate} {obj} a day. The baker works {d1} days, then {d2} days more. How many {obj} are made?",
        "{n1} is paid {rate} dollars per hour. {n1} works {d1} hours on Saturday and {d2} hours on Sunday. How many dollars does {n1} earn?",
        "A pump fills {rate} buckets a minute. It runs for {d1} minutes, stops, and then runs for {d2} minutes. How many buckets does it fill?",
        "{n1} walks {rate} kilometres each week for {d1} weeks in spring and {d2} weeks in autumn. How many kilometres does {n1} walk in those weeks?",
        "{n1} practises the piano {rate} minutes a day. Last month {n1} practised on {d1} days and this month on {d2} days. How many minutes did {n1} practise?",
        "A printer prints {rate} pages per minute. It prints for {d1} minutes, then for another {d2} minutes. How many pages does it print?",
        "{n1} sells {rate} {obj} a day at a market. The market is open {d1} days in May and {d2} days in June. How many {obj} does {n1} sell?",
        "A factory packs {rate} crates every day. It works {d1} days and then {d2} days more. How many crates does it pack?",
        "How many {obj} does {n1} make in {d1} days and then {d2} more days if {n1} makes {rate} {obj} every day?",
        "A car uses {rate} litres of fuel per hour. It drives {d1} hours in the morning and {d2} hours in the evening. How many litres does it use?",
        "{n1} reads {rate} pages each day for {d1} days, then {d2} more days. How many pages does {n1} read?",
    )),
    "share_left": (_share_left, (
        "{n1} had {a} {obj} and lost {b}. {n1} shared the rest equally among {c} friends. How many {obj} did each friend get?",
        "There are {a} {obj}. {b} are broken and the rest go into {c} {box} equally. How many {obj} are in each?",
        "{n1} has {a} {obj}, gives {b} to {n2}, and puts the rest equally into {c} {box}. How many {obj} are in each?",
        "Out of {a} {obj}, {b} are kept and the rest are shared equally by {c} friends. How many {obj} does each friend get?",
        "{n1} has {a} {obj}. After giving {b} to {n2}, {n1} divides the rest equally into {c} {box}. How many {obj} go in each?",
        "There are {a} {obj} in {place}. {b} of them are sold, and the others are split equally among {c} children. How many {obj} does each child get?",
        "{n1} baked {a} cookies, ate {b}, and packed the rest equally into {c} bags. How many cookies are in each bag?",
        "{n1} had {a} dollars, spent {b} dollars, and shared the money left over equally among {c} friends. How many dollars did each friend get?",
        "From {a} {obj}, {n1} removes {b} and then makes {c} equal piles of the rest. How many {obj} are in each pile?",
        "How many {obj} does each of {c} friends get if {a} {obj} are shared out equally after {b} are taken away?",
        "A class has {a} students, and {b} are absent today. The others form {c} equal groups. How many students are in each group?",
        "There were {a} {obj}. {b} were lost, and the remaining {obj} were divided equally among {c} {box}. How many {obj} went into each of the {box}?",
        "{a} people came to a show. {b} of them left early, and the rest sat in {c} equal rows. How many people sat in each row?",
        "{n1} picked {a} {obj}, kept {b}, and split the others equally between {c} neighbours. How many {obj} did each neighbour get?",
    )),
    "each_add_left": (_each_add_left, (
        "{n1} has {a} {box} with {b} {obj} in each and {c} loose {obj}. {n1} gives {d} {obj} to {n2}. How many {obj} does {n1} have left?",
        "A shop gets {a} {box} of {obj} with {b} in each, and has {c} already. It sells {d}. How many {obj} does it have now?",
        "{n1} buys {a} {box} of {b} {obj}, already has {c}, and gives away {d}. How many {obj} does {n1} have?",
        "There are {a} {box} with {b} {obj} in each and {c} extra {obj}. {d} are used. How many {obj} are left?",
        "{n1} has {c} {obj}. {n1} buys {a} {box} of {obj} with {b} in each, then gives {d} to {n2}. How many {obj} does {n1} have now?",
        "A baker makes {a} trays of {b} cupcakes and has {c} cupcakes left from yesterday. {d} cupcakes are sold. How many cupcakes does the baker have now?",
        "{n1} earns {b} dollars a day for {a} days and also gets a {c} dollar gift. Then {n1} spends {d} dollars. How many dollars does {n1} have left?",
        "There are {a} {box} holding {b} {obj} each, plus {c} {obj} outside them. If {d} of the {obj} are given away, how many {obj} are left?",
        "A theatre has {a} rows of {b} seats and {c} extra chairs. {d} of the seats and chairs are taken. How many places are still free?",
        "{n1} has {a} {box} with {b} {obj} in every one and {c} more {obj} in a drawer. {n1} uses {d} of them. How many {obj} does {n1} still have?",
        "How many {obj} remain if {n1} buys {a} packs of {b} {obj}, already has {c}, and sells {d}?",
        "{n1} puts {b} {obj} in each of {a} {box} and {c} more in {place}. Then {d} of the {obj} are lost. How many {obj} are left?",
        "A shop has {c} {obj} and gets a delivery of {a} {box} holding {b} {obj} each. It sells {d} {obj}. How many {obj} does the shop have now?",
        "There are {a} {box} of {b} {obj} and {c} more {obj} on a table. {n1} takes {d}. How many {obj} remain?",
    )),
    "twice_total_left": (_twice_total_left, (
        "{n1} has {a} {obj} and {n2} has twice as many. Together they give away {c}. How many {obj} do they have left?",
        "On Monday {a} people visited and on Tuesday twice as many. {c} of all the visitors were children. How many visitors were adults?",
        "{n1} picked {a} {obj} and {n2} picked twice as many. They gave {c} away. How many {obj} do they still have?",
        "A shop sold {a} {obj} in the morning and twice as many in the afternoon. {c} were returned. How many {obj} stayed sold?",
        "{n2} has double the number of {obj} that {n1} has, and {n1} has {a}. If they lose {c} of them, how many {obj} do they still have together?",
        "A farm had {a} ducks and twice as many hens. {c} of the birds were sold. How many birds are left on the farm?",
        "{n1} has {a} dollars and {n2} has two times as much. Together they spend {c} dollars. How many dollars do the two of them have left?",
        "There are {a} red {obj} and twice as many blue {obj}. {c} of all the {obj} are used. How many {obj} are not used?",
        "How many {obj} are left if {n1} collects {a}, {n2} collects twice as many, and they give {c} to a school?",
        "On day one a shop sold {a} tickets and on day two it sold twice as many. {c} of the tickets were refunded. How many tickets were not refunded?",
        "A small box has {a} {obj} and a big box has twice as many. {n1} takes {c} {obj} out of the boxes. How many {obj} remain in the boxes?",
        "{n2} has 2 times as many {obj} as {n1}, who has {a}. Together they give {c} {obj} to friends. How many {obj} do the two of them have now?",
        "{n1} baked {a} {obj}, and {n2} baked double that. They sold {c} of them. How many {obj} are left?",
    )),
    "each_half_left": (_each_half_left, (
        "{n1} has {a} {box} with {b} {obj} in each. {n1} gives half of the {obj} to {n2}. How many {obj} does {n1} keep?",
        "There are {a} {box} of {b} {obj}. Half of them are sold. How many {obj} are not sold?",
        "{n1} gets {a} {box} with {b} {obj} in each and uses half of them. How many {obj} are left?",
        "There are {a} {box} with {b} {obj} each. Half of the {obj} are given away. How many {obj} remain?",
        "{n1} buys {a} {box} of {obj} with {b} in every one and sells half of them. How many {obj} does {n1} have left?",
        "There are {a} {box}, each holding {b} {obj}. {n1} takes half of all the {obj}. How many {obj} does {n1} take?",
        "{n1} bakes {a} trays of {b} cookies and gives half of the cookies to neighbours. How many cookies does {n1} give away?",
        "A class has {a} tables with {b} students at each. Half of the students are girls. How many girls are there?",
        "{n1} earns {b} dollars a day for {a} days and saves half of the money. How many dollars does {n1} save?",
        "How many {obj} are left if {a} {box} hold {b} {obj} each and half of the {obj} are used?",
        "{n1} has {a} packs of {b} {obj} and splits all the {obj} equally with {n2}. How many {obj} does each of them get?",
        "A bus has {a} rows of {b} seats, and half of the seats are taken. How many seats are free?",
        "A garden has {a} rows of {b} {obj}. Half of them are picked. How many {obj} are still in the garden?",
    )),
}
# Held out: the last wording of every structure (the last two of add, left, each). The training
# wordings come first; more of them were added in data version 2, and more in data version 3
# (12 to 18 per structure); the held-out ones are unchanged, so the held-out split's problems are
# those of version 2 (test_the_heldout_problems_are_those_of_data_version_2 pins them).
HELDOUT_WORDINGS: dict[str, int] = {name: 2 if name in ("add", "left", "each") else 1 for name in STRUCTURES}


def template_ids(split: str) -> list[str]:
    """The template ids (`structure/wording`) a split draws from."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    ids = []
    for name, (_, wordings) in STRUCTURES.items():
        held = range(len(wordings) - HELDOUT_WORDINGS[name], len(wordings))
        ids += [f"{name}/{i}" for i in range(len(wordings)) if (i in held) == (split == "heldout")]
    return ids


def solution(steps: list[Step]) -> str:
    """The target text: the steps inside the thinking tags, then the answer line."""
    lines = "\n".join(s.line() for s in steps)
    return f"{THINK_START}\n{lines}\n{THINK_END}\nThe answer is {steps[-1].result}."


def draw_problem(seed: int, split: str, index: int) -> dict[str, Any]:
    """Problem `index` of `split`, from its own random stream."""
    rng = random.Random(f"reasoning/{seed}/{split}/{index}")
    template = rng.choice(template_ids(split))
    structure, wording = template.split("/")
    draw, wordings = STRUCTURES[structure]
    values, steps = draw(rng)
    n1, n2 = rng.sample(NAMES, 2)
    obj = rng.choice(OBJECTS)
    question = wordings[int(wording)].format(n1=n1, n2=n2, obj=obj, obj_cap=obj.capitalize(), box=rng.choice(CONTAINERS),
                                             place=rng.choice(PLACES), **values)
    return {"question": question, "answer": str(steps[-1].result), "solution": solution(steps),
            "template": template, "steps": len(steps),
            "ops": [s.op for s in steps], "numbers": values}


def write_split(path: Path, seed: int, split: str, count: int) -> dict[str, Any]:
    """A split as chat SFT JSONL (user question -> thinking + answer), with each record's
    `answer` and `template` kept for scoring and tests."""
    rows = []
    for index in range(count):
        p = draw_problem(seed, split, index)
        rows.append({"messages": [{"role": "user", "content": p["question"]},
                                  {"role": "assistant", "content": p["solution"]}],
                     "answer": p["answer"], "template": p["template"], "steps": p["steps"]})
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {"file": path.name, "examples": count, "sha256": sha256_file(path)}


def write_grpo_prompts(path: Path, seed: int, count: int) -> dict[str, Any]:
    """Prompts with checked answers for a GRPO stage after SFT (issue #22): training
    templates, a stream of their own (`split` "grpo"), so they are not the SFT problems.

        {"prompt": [{"role": "user", "content": q}], "answer": "48"}
    """
    rows = []
    for index in range(count):
        rng = random.Random(f"reasoning/{seed}/grpo/{index}")
        p = draw_problem(seed, "train", 10**9 + rng.randrange(10**9))  # train templates, indices no SFT run reaches
        rows.append({"prompt": [{"role": "user", "content": p["question"]}], "answer": p["answer"]})
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return {"file": path.name, "examples": count, "sha256": sha256_file(path)}


def build_reasoning_dataset(out: Path, *, train: int, heldout: int, grpo: int = 0, seed: int = 0,
                            log: Log = print) -> dict[str, Any]:
    """train.jsonl, heldout.jsonl (and grpo.jsonl) in `out`, with dataset-report.json last
    (its presence says the folder is complete)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"version": DATA_VERSION, "seed": seed,
                              "train": write_split(out / "train.jsonl", seed, "train", train),
                              "heldout": write_split(out / "heldout.jsonl", seed, "heldout", heldout),
                              "templates": {s: template_ids(s) for s in SPLITS}}
    if grpo:
        report["grpo"] = write_grpo_prompts(out / "grpo.jsonl", seed, grpo)
    atomic_write(out / "dataset-report.json", json.dumps(report, indent=1))
    log(f"reasoning data: {train} training and {heldout} held-out problems"
        + (f", {grpo} GRPO prompts" if grpo else "") + f" in {out}")
    return report


def load_problems(path: Path) -> list[dict[str, Any]]:
    """Problems from a split file: [{"question", "answer", "template"}], errors naming file:line."""
    problems = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            problems.append({"question": row["messages"][0]["content"], "answer": str(row["answer"]),
                             "template": row.get("template", "")})
        except (json.JSONDecodeError, KeyError, IndexError, TypeError) as err:
            raise ValueError(f"{path}:{number}: not a reasoning record ({type(err).__name__}: {err})") from err
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--heldout", type=int, default=200)
    parser.add_argument("--grpo", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build_reasoning_dataset(args.out, train=args.train, heldout=args.heldout, grpo=args.grpo, seed=args.seed)


if __name__ == "__main__":
    main()
