"""The synthetic images and questions `prime-135m-vision-v1` is trained and scored on (issue #20).

No pretrained vision weights are reachable offline, so the small vision model learns from
scratch on what this module draws: exactly what its model card says it can see.

  colour   one shape; "What colour is the triangle?"                    -> "red"
  shape    one shape; "Which shape is shown?"                            -> "triangle"
  count    1-5 shapes of one kind, any colours, none tiny; "How many squares ...?"  -> "3"
  side     a shape in the outer quarter of the left or right half (in four of five, a
           different one on the other side); "Is the red circle on the left or the right?" -> "left"
  number   a printed number of 1-4 digits; "Which number is shown?"     -> "4096"

Shapes are circle, square, triangle in red, green, blue, yellow, orange, purple, drawn
without anti-aliasing (a shape's pixels are exactly its palette colour) on light plain or
lightly speckled grey backgrounds, in images of any size and aspect (48-384 px a side).
Shapes never overlap: their bounding boxes keep a gap.

Every record is drawn from its own random stream, seeded by (seed, split, index), so a
split is byte-for-byte reproducible and each record is independent of how many come
before it. Questions come from templates; a few phrasings per category are reserved for
the held-out split (`phrasing: "unseen"`), which measures whether the model learnt the
task or the training sentences. Training answers are canonical ("red", "3") or, for a
share of records, a short sentence around it; held-out answers are always canonical.

Output is the multimodal chat SFT format Reactor Core trains on, image paths relative to
the JSONL:

  {"messages": [{"role": "user", "content": [{"type": "image", "path": "images/train/000123.png"},
                                             {"type": "text", "text": "Count the circles."}]},
                {"role": "assistant", "content": "3"}],
   "category": "count", "answer": "3", "phrasing": "seen", "scene": {...}}

`scene` says what was drawn where (boxes are inclusive pixel coordinates), for tests and
error analysis. `jarvis_prime.evaluation.run_vqa_suite` scores a model on such a file.

    python -m jarvis_prime.recipes.vision_data OUT_DIR --train 2000 --heldout 500 --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from jarvis_prime.errors import PrimeError
from jarvis_prime.files import atomic_write, sha256_file
from jarvis_prime.progress import Log

if TYPE_CHECKING:  # Pillow is imported when images are drawn, not when the module is
    from PIL import Image

DATA_VERSION = 3  # bump when what is drawn or asked changes: scores of different versions do not compare
CATEGORIES: tuple[str, ...] = ("colour", "shape", "count", "side", "number")
SPLITS: tuple[str, ...] = ("train", "heldout")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 30), "orange": (245, 130, 20), "purple": (140, 60, 180),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
INKS: tuple[tuple[int, int, int], ...] = ((20, 20, 20), (50, 50, 60), (30, 30, 90), (90, 25, 25))  # dark, legible
MIN_SIDE, MAX_SIDE = 48, 384
MIN_RADIUS = 5  # px: a smaller triangle is no longer recognisably one
COUNT_LEAST = 0.08  # a counted shape's least radius, as a share of the image's longer side (see scene_for)
# Side images with a second shape on the other side. At one in two, three in four side
# questions were answered by the leftmost shape's side (a lone shape's, or the left one of
# two), and the LM learnt exactly that: every two-shape question answered "left" (v2).
SIDE_PAIR_SHARE = 0.8
SENTENCE_SHARE = 0.35  # training answers wrapped in a short sentence
UNSEEN_SHARE = 0.5  # held-out questions asked in a phrasing training never saw
FONT_FILES = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
              "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf")

# {shape}, {shapes} (plural), {colour}: filled from the scene. "seen" phrasings are the
# training split's; "unseen" ones are asked only in the held-out split.
QUESTIONS: dict[str, dict[str, tuple[str, ...]]] = {
    "seen": {
        "colour": ("What colour is the {shape}?", "What color is the {shape}?", "What is the colour of the {shape}?",
                   "Which colour does the {shape} have?", "The {shape} is what colour?",
                   "What colour is the {shape} in the image?", "Name the colour of the {shape}.",
                   "Which color is the {shape}?", "What color is the shape?"),
        "shape": ("Which shape is shown?", "What shape is this?", "What shape do you see?",
                  "What is the shape in the image?", "Name the shape.", "What kind of shape is in the picture?",
                  "Which shape is in the image?", "What is the {colour} shape?"),
        "count": ("How many {shapes} are there?", "How many {shapes} are in the image?", "How many {shapes} do you see?",
                  "What is the number of {shapes}?", "How many shapes are there?",
                  "How many {shapes} can you see in the picture?", "Give the number of {shapes}."),
        "side": ("Is the {colour} {shape} on the left or the right?", "Is the {colour} {shape} on the left or right side?",
                 "Which side is the {colour} {shape} on?", "On which side is the {colour} {shape}, left or right?",
                 "Where is the {colour} {shape}: left or right?", "Is the {colour} {shape} left or right of the centre?"),
        "number": ("What number is shown?", "What number is written in the image?", "What is the number in the picture?",
                   "Which number do you see?", "What number is printed here?", "What does the number say?"),
    },
    "unseen": {
        "colour": ("Tell me the colour of the {shape}.", "What's the {shape}'s color?",
                   "Identify the colour of the {shape}."),
        "shape": ("What shape is drawn here?", "Tell me which shape you see.", "Identify the shape in the picture."),
        "count": ("Count the {shapes}.", "How many {shapes} does the image contain?", "Tell me how many {shapes} there are."),
        "side": ("Tell me whether the {colour} {shape} is on the left or the right.",
                 "Left or right: where is the {colour} {shape}?",
                 "Which half of the image holds the {colour} {shape}, left or right?"),
        "number": ("Which number is shown?", "Read the number in the image.", "Tell me the number you see."),
    },
}
# Short sentences a training answer may be wrapped in ({answer} is the canonical answer).
SENTENCES: dict[str, tuple[str, ...]] = {
    "colour": ("It is {answer}.", "The {shape} is {answer}.", "{Answer}."),
    "shape": ("It is a {answer}.", "A {answer}.", "That is a {answer}."),
    "count": ("There {are} {answer} {noun}.", "I count {answer}.", "{answer}."),
    "side": ("It is on the {answer}.", "The {colour} {shape} is on the {answer}.", "On the {answer}."),
    "number": ("The number is {answer}.", "It says {answer}.", "{answer}."),
}


Box = tuple[int, int, int, int]  # x0, y0, x1, y1, inclusive


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    cx: int
    cy: int
    r: int  # half-extent: the circle's radius, half the square's side, the triangle's circumradius

    @property
    def box(self) -> Box:
        return shape_box(self.kind, self.cx, self.cy, self.r)


def shape_box(kind: str, cx: int, cy: int, r: int) -> Box:
    """The inclusive pixel box a shape is drawn in (the triangle is upright, inscribed in radius r)."""
    if kind == "triangle":
        half = round(r * math.sqrt(3) / 2)
        return cx - half, cy - r, cx + half, cy + round(r / 2)
    return cx - r, cy - r, cx + r, cy + r


def plural(kind: str) -> str:
    return kind + "s"


# -- scenes: what is drawn where -------------------------------------------------------------


def boxes_apart(a: Box, b: Box, gap: int) -> bool:
    """True when the boxes are at least `gap` pixels apart on one axis (so the shapes cannot touch)."""
    return a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1]


def side_limits(side: str | None, width: int) -> tuple[int, int]:
    """The x range a box must lie in: either half minus a margin around the centre line, so a
    side question never hinges on a pixel."""
    margin = max(2, round(0.06 * width))
    if side == "left":
        return 0, width // 2 - margin
    if side == "right":
        return (width + 1) // 2 + margin, width - 1
    return 0, width - 1


def centre_limits(side: str | None, width: int) -> tuple[int, int]:
    """The x range a shape's centre must lie in: the outer quarter of its half.

    Why so far out: the processor cuts a wide image into two columns of tiles at its
    centre line, and each tile is read on its own ("left"/"right" of the tile's middle,
    vision_encoder). A shape in the outer quarter is on the same side of its tile as of the
    image, so the tiles and the overview never contradict each other about a side."""
    if side == "left":
        return 0, math.ceil(width / 4) - 2  # the box's centre, cx + 0.5, stays a pixel short of width / 4
    if side == "right":
        return math.ceil(3 * width / 4 + 0.5), width - 1
    return 0, width - 1


def place(rng: random.Random, width: int, height: int, wanted: Sequence[tuple[str, str, str | None]],
          scale: float, *, base: float | None = None, least: float = MIN_RADIUS) -> list[Shape]:
    """Shapes (kind, colour, side) at random sizes and positions, none overlapping.

    `scale` bounds the radius as a share of `base` (the shorter side unless given); radii
    are drawn from at least `least` (and 40 % of that bound) up to it. A crowded image that
    does not fit is redrawn with smaller shapes (never below MIN_RADIUS).
    """
    base = min(width, height) if base is None else base
    for _ in range(40):
        placed: list[Shape] = []
        for kind, colour, side in wanted:
            x_lo, x_hi = side_limits(side, width)
            c_lo, c_hi = centre_limits(side, width)
            room = (x_hi - x_lo) / 2 - 1 if side is None else min(c_hi - x_lo, x_hi - c_lo) - 1
            hi = max(MIN_RADIUS, min(scale * base, room, height / 2 - 1))
            for _ in range(60):
                r = round(rng.uniform(min(hi, max(MIN_RADIUS, least, 0.4 * hi)), hi))
                x0, y0, x1, y1 = shape_box(kind, 0, 0, r)
                lo_x, hi_x = max(x_lo - x0, c_lo), min(x_hi - x1, c_hi)
                if lo_x > hi_x or y1 - y0 > height - 1:
                    continue
                cx = rng.randint(lo_x, hi_x)
                cy = rng.randint(-y0, height - 1 - y1)
                shape = Shape(kind, colour, cx, cy, r)
                if all(boxes_apart(shape.box, other.box, gap=2) for other in placed):
                    placed.append(shape)
                    break
            else:
                break
        if len(placed) == len(wanted):
            return placed
        scale *= 0.85
    raise PrimeError(f"cannot place {len(wanted)} shapes in {width}x{height}")  # unreachable within MAX/MIN sides


def scene_for(category: str, rng: random.Random, width: int, height: int) -> tuple[dict[str, Any], list[Shape]]:
    """What to ask about (the answer and the template's slots) and the shapes to draw."""
    colours = list(COLOURS)
    if category in ("colour", "shape"):
        kind, colour = rng.choice(SHAPES), rng.choice(colours)
        shapes = place(rng, width, height, [(kind, colour, None)], scale=0.4)
        return {"answer": colour if category == "colour" else kind, "shape": kind, "colour": colour}, shapes
    if category == "count":
        # Sized on the image's geometric mean, at least COUNT_LEAST of its longer side: the
        # overview squeezes the whole image into one tile, where a shape sized on a long
        # thin image's short side shrank to a few pixels and could no longer be counted.
        kind, n = rng.choice(SHAPES), rng.randint(1, 5)
        shapes = place(rng, width, height, [(kind, rng.choice(colours), None) for _ in range(n)], scale=0.4 / math.sqrt(n),
                       base=math.sqrt(width * height), least=COUNT_LEAST * max(width, height))
        return {"answer": str(n), "shape": kind, "colour": shapes[0].colour}, shapes
    if category == "side":
        kind, colour, side = rng.choice(SHAPES), rng.choice(colours), rng.choice(("left", "right"))
        wanted = [(kind, colour, side)]
        if rng.random() < SIDE_PAIR_SHARE:  # a different shape on the other side: the question must be read, not just the image
            other = "right" if side == "left" else "left"
            wanted.append((rng.choice([k for k in SHAPES if k != kind]), rng.choice([c for c in colours if c != colour]),
                           other))
        return {"answer": side, "shape": kind, "colour": colour}, place(rng, width, height, wanted, scale=0.3)
    raise PrimeError(f"unknown category {category!r}; categories: {', '.join(CATEGORIES)}")


def random_number(rng: random.Random) -> str:
    """1-4 digits, each length equally likely (uniform values would be 90 % four-digit)."""
    digits = rng.randint(1, 4)
    return str(rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1))


# -- drawing ------------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def font(size: int):
    """Pillow's bundled scalable font (FreeType) at `size` px, else a Debian font file if present."""
    from PIL import ImageFont

    default = ImageFont.load_default(size=size)
    if isinstance(default, ImageFont.FreeTypeFont):
        return default
    for path in FONT_FILES:
        if Path(path).is_file():
            return ImageFont.truetype(path, size)
    raise PrimeError("drawing numbers needs Pillow built with FreeType (or DejaVu Sans installed)")


def background(rng: random.Random, width: int, height: int) -> tuple[Image.Image, str]:
    """A light, nearly grey canvas, plain or lightly speckled with darker grey dots (never a
    shape colour: speckles stay light and unsaturated)."""
    import numpy as np
    from PIL import Image

    level = rng.randint(228, 255)
    tint = [level - rng.randint(0, 12) for _ in range(3)]
    pixels = np.empty((height, width, 3), dtype=np.int16)
    pixels[:] = tint
    kind = "plain"
    if rng.random() < 0.5:
        kind = "speckled"
        noise = np.random.default_rng(rng.getrandbits(63))
        dots = noise.random((height, width)) < rng.uniform(0.02, 0.08)
        pixels[dots] -= noise.integers(8, 40, size=(int(dots.sum()), 1), dtype=np.int16)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB"), kind


def draw_shape(draw, shape: Shape) -> None:
    fill = COLOURS[shape.colour]
    x0, y0, x1, y1 = shape.box
    if shape.kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape.kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([(shape.cx, y0), (x0, y1), (x1, y1)], fill=fill)


def draw_number(draw, rng: random.Random, text: str, width: int, height: int) -> dict[str, Any]:
    """Print `text` as large as a random share of the image allows; its ink box is returned."""
    probe = font(100).getbbox(text)
    largest = int(min(0.85 * width / (probe[2] - probe[0]), 0.7 * height / (probe[3] - probe[1])) * 100)
    size = rng.randint(max(10, round(0.7 * largest)), max(10, largest))  # large: the overview squeezes it
    face = font(size)
    left, top, right, bottom = face.getbbox(text)
    while size > 10 and (right - left > width - 2 or bottom - top > height - 2):
        size -= 1
        face = font(size)
        left, top, right, bottom = face.getbbox(text)
    x = rng.randint(1, max(1, width - 1 - (right - left)))
    y = rng.randint(1, max(1, height - 1 - (bottom - top)))
    ink = rng.choice(INKS)
    draw.text((x - left, y - top), text, font=face, fill=ink)
    return {"value": text, "size": size, "ink": list(ink), "box": [x, y, x + right - left - 1, y + bottom - top - 1]}


# -- records ------------------------------------------------------------------------------------


def question_for(rng: random.Random, split: str, category: str, slots: dict[str, str]) -> tuple[str, str]:
    """(question, "seen" | "unseen"): training asks seen phrasings only."""
    phrasing = "unseen" if split == "heldout" and rng.random() < UNSEEN_SHARE else "seen"
    template = rng.choice(QUESTIONS[phrasing][category])
    return template.format(shape=slots["shape"], shapes=plural(slots["shape"]), colour=slots["colour"]), phrasing


def reply_for(rng: random.Random, split: str, category: str, slots: dict[str, str]) -> str:
    """The canonical answer, or in training sometimes a short sentence around it."""
    answer = slots["answer"]
    if split != "train" or rng.random() >= SENTENCE_SHARE:
        return answer
    one = answer == "1"
    return rng.choice(SENTENCES[category]).format(
        answer=answer, Answer=answer.capitalize(), shape=slots["shape"], colour=slots["colour"],
        are="is" if one else "are", noun=slots["shape"] if one else plural(slots["shape"]))


def make_example(seed: int, split: str, index: int, category: str) -> tuple[Image.Image, dict[str, Any]]:
    """One image and its record (image path left to the writer), from its own random stream."""
    from PIL import ImageDraw

    if split not in SPLITS:
        raise PrimeError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    rng = random.Random(f"prime-vision-{DATA_VERSION}/{seed}/{split}/{index}")
    width, height = rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE)
    image, backdrop = background(rng, width, height)
    draw = ImageDraw.Draw(image)
    scene: dict[str, Any] = {"width": width, "height": height, "background": backdrop}
    if category == "number":
        value = random_number(rng)
        scene["text"] = draw_number(draw, rng, value, width, height)
        slots = {"answer": value, "shape": "", "colour": ""}
    else:
        slots, shapes = scene_for(category, rng, width, height)
        for shape in shapes:
            draw_shape(draw, shape)
        scene["objects"] = [{"shape": s.kind, "colour": s.colour, "box": list(s.box)} for s in shapes]
    question, phrasing = question_for(rng, split, category, slots)
    record = {"messages": [{"role": "user", "content": [{"type": "image", "path": ""}, {"type": "text", "text": question}]},
                           {"role": "assistant", "content": reply_for(rng, split, category, slots)}],
              "category": category, "answer": slots["answer"], "phrasing": phrasing, "scene": scene}
    return image, record


def balanced_categories(count: int, seed: int, split: str) -> list[str]:
    """Each category equally often (within one), in a seeded order."""
    order = [CATEGORIES[i % len(CATEGORIES)] for i in range(count)]
    random.Random(f"prime-vision-{DATA_VERSION}/{seed}/{split}/order").shuffle(order)
    return order


@dataclass
class SplitReport:
    split: str
    records: int = 0
    by_category: dict[str, int] = field(default_factory=dict)
    unseen_phrasings: int = 0
    sha256: str = ""
    seconds: float = 0.0


def write_split(out_dir: Path, split: str, count: int, seed: int = 0) -> SplitReport:
    """`out_dir/<split>.jsonl` and its images under `out_dir/images/<split>/`."""
    out_dir = Path(out_dir)
    image_dir = out_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    report, start, lines = SplitReport(split), time.perf_counter(), []
    for index, category in enumerate(balanced_categories(count, seed, split)):
        image, record = make_example(seed, split, index, category)
        relative = f"images/{split}/{index:06d}.png"
        image.save(out_dir / relative, format="PNG", compress_level=1)  # 10x faster than the default 6
        record["messages"][0]["content"][0]["path"] = relative
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        report.by_category[category] = report.by_category.get(category, 0) + 1
        report.unseen_phrasings += record["phrasing"] == "unseen"
    data = out_dir / f"{split}.jsonl"
    atomic_write(data, "".join(lines))
    report.records, report.sha256 = count, sha256_file(data)
    report.seconds = round(time.perf_counter() - start, 2)
    return report


def build_vision_dataset(out_dir: Path, *, train: int = 2000, heldout: int = 500, seed: int = 0,
                         log: Log = print) -> dict[str, Any]:
    """Both splits and `dataset-report.json` (counts, sha256 of each JSONL, seconds)."""
    out_dir = Path(out_dir)
    reports = {}
    for split, count in (("train", train), ("heldout", heldout)):
        report = write_split(out_dir, split, count, seed)
        reports[split] = asdict(report)
        log(f"{split}: {report.records} records in {report.seconds:.1f} s -> {out_dir / f'{split}.jsonl'} "
            + ", ".join(f"{c} {n}" for c, n in sorted(report.by_category.items())))
    summary = {"data_version": DATA_VERSION, "seed": seed, "splits": reports}
    atomic_write(out_dir / "dataset-report.json", json.dumps(summary, indent=1) + "\n")
    return summary


def write_eval_items(out_dir: Path, split: str = "heldout") -> Path:
    """`out_dir/<split>-items.json`: each record's user turn as Reactor Core's data pipeline
    reads it for deduplication and decontamination, its image as `<image SHA256>` (the
    bytes' sha256) then its question (`reactor_core.data.pipeline`, `_texts`). A training
    record is contaminated only when it is such an item, that image with that question:
    the questions alone are shared by every split on purpose (`QUESTIONS`)."""
    out_dir = Path(out_dir)
    items = []
    for line in (out_dir / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
        image, text = json.loads(line)["messages"][0]["content"]
        items.append(f"<image {sha256_file(out_dir / image['path'])}> {text['text']}")
    target = out_dir / f"{split}-items.json"
    atomic_write(target, json.dumps(items))
    return target


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jarvis_prime.recipes.vision_data",
                                     description="Write the synthetic VQA data of prime-135m-vision-v1.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train", type=int, default=2000, help="training records")
    parser.add_argument("--heldout", type=int, default=500, help="held-out records (half in unseen phrasings)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    build_vision_dataset(args.out_dir, train=args.train, heldout=args.heldout, seed=args.seed)


if __name__ == "__main__":
    main()
