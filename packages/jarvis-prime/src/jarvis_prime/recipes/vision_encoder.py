"""Stage 0 of `prime-135m-vision-v1`: a small SigLIP encoder learns to read what vision_data draws.

No pretrained vision weights are reachable offline, so the encoder starts from random
weights. Trained only through the answer tokens of the 135M language model, it would see
a few thousand examples in the recipe's budget (every step runs the whole LM forward and
backward): enough for colours, nowhere near enough for shapes, counts or digits. Here it
learns first, on its own, from labels that come for free with synthetic images, which
costs the encoder alone (a few hundred views a second).

What it learns is a *readout*: each 2 x 2 block of patches (one LM token after the
connector's pixel shuffle) is trained to name one word of what the view shows, in a fixed
layout (`SLOTS`): the digits of a printed number in order, or the leftmost and rightmost
shape's colour, kind and side, and how many shapes there are. The connector trains beside
it: it learns to map each token onto the LM's embedding of the word the token reads as
(`WORDS`), scored by which word's embedding it lands nearest, which is what the LM sees.
(A ridge fit after the encoder had trained lost part of what the encoder read: side
95 % -> 81 % on held-out overviews.) The LM's LoRA (stage 1, Reactor Core) only has to learn
which token answers which question: copying a word it already knows, which a few hundred steps teach. Spatial
features alone (each token describing what covers it) left counting, sides and digit
order to the LM, which the budget could not teach (count 23 %, number 1 % on held-out).
Per-patch colour, shape and digit labels stay as an auxiliary loss: they give the encoder
local features to build the readout from.

Every view is read the same way, the overview (the whole image squeezed into one tile)
and each tile (sides relative to the tile, only what lies in it): the encoder cannot tell
them apart, so their targets must not contradict. The LM learns to answer from the
overview, the last view before the question. Views are cut exactly as transformers'
Idefics3ImageProcessor and llama.cpp's libmtmd tile (longest edge to `longest_edge`, then
up to a multiple of `tile` on each side, cut into tiles, plus the overview); labels go
through the same resizes (nearest neighbour).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jarvis_prime.errors import PrimeError
from jarvis_prime.idefics3 import EncoderShape
from jarvis_prime.progress import Log
from jarvis_prime.recipes.vision_data import CATEGORIES, COLOURS, SHAPES, make_example

if TYPE_CHECKING:  # Pillow is imported when images are drawn
    from PIL import Image

# torch and numpy are imported when the encoder trains (never at module level: `prime`
# commands that never train must not pay for them); annotations name them through these.
Tensor = Any  # torch.Tensor
Array = Any  # numpy.ndarray

COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
N_COLOURS, N_SHAPES, N_DIGITS = len(COLOURS) + 1, len(SHAPES) + 1, 11  # class 0: nothing there
N_CENTRES = 2  # a patch holds a shape's centre, or not
INK_LUMINANCE = 150  # darker than any background pixel (>= 176), lighter than no ink's core

# The words a token can be read as, spelt as the LM's tokenizer sees them after "is" or
# alone: " " is "nothing here". SmolLM2 writes numbers digit by digit, so digits are bare.
WORDS: tuple[str, ...] = (" ", *"0123456789", *(" " + c for c in COLOUR_NAMES), *(" " + s for s in SHAPES),
                          " left", " right")
WORD_INDEX = {word: i for i, word in enumerate(WORDS)}
# Which token (row-major in the view's 3 x 3 token grid) says what. A number's digits and
# the shapes never share a view, so they share tokens 0-3.
SLOTS: dict[str, tuple[int, ...]] = {
    "digits": (0, 1, 2, 3),
    "first": (0, 1, 2),  # the leftmost shape: colour, kind, side
    "last": (3, 4, 5),  # the rightmost shape when there are several
    "count": (8,),
}
MAX_DIGITS = 4
CURVE_POINTS = 10  # held-out readouts logged during the encoder's run (the last is its result)
COSINE_TEMPERATURE = 0.05  # of the word loss's cosine logits: a margin between words that are near in the LM


@dataclass(frozen=True)
class EncoderTraining:
    # 15,000 steps (~50 min on a 2-core Intel Xeon): at 3,000 the held-out overviews' numbers
    # read 8 % (9 % by the encoder's own head) and were still climbing at 7,500 (47 %).
    steps: int = 15000
    batch_size: int = 64  # views per step
    overview_share: float = 0.75  # of each batch: the LM answers from the overview, so it is read best
    learning_rate: float = 1.5e-3
    # Images drawn once; their views (overview and tiles) are sampled each step. Digits need
    # many more images than colours and shapes: with 800 number images among 4000 the encoder
    # memorised them (first digit 43 % on the pool, 18 % held out) instead of learning digits.
    # Count images weigh twice what colours do (1.2.0: 3, the same): counts were the one
    # category below target, and the number images stay 12,000.
    pool_images: int = 34500  # ~146,000 views, 4 GB of pixels; each overview seen ~21 times
    pool_mix: tuple[tuple[str, int], ...] = (("colour", 3), ("shape", 3), ("count", 6), ("side", 3), ("number", 8))
    # Per-patch "a shape's centre is here" labels in the auxiliary loss (1.2.0 had none): one
    # mark per shape, however many patches it covers, which the count token can add up.
    # Without them, held-out counts read 87 % by the encoder's head (3 and 4 about half right).
    centre_labels: bool = True
    heldout_images: int = 300  # images never trained on: the readout accuracy reported
    seed: int = 0
    first_index: int = 10_000_000  # images drawn from vision_data's train stream past any training split


@dataclass(frozen=True)
class LabelMaps:
    """Per-pixel classes of one image (uint8 arrays, height x width)."""

    colour: Array
    shape: Array
    digit: Array


def label_maps(image: Image.Image, scene: dict[str, Any]) -> LabelMaps:
    """What is where, read off the drawing: shapes are drawn without anti-aliasing in exact
    palette colours (so a pixel's colour is its label), a shape's pixels are its colour
    inside its box, and a number's ink is split into equal-width slots, one per digit
    (DejaVu Sans digits are tabular: all the same width)."""
    import numpy as np

    pixels = np.asarray(image.convert("RGB")).astype(np.int16)
    height, width = pixels.shape[:2]
    colour = np.zeros((height, width), np.uint8)
    shape = np.zeros((height, width), np.uint8)
    digit = np.zeros((height, width), np.uint8)
    for obj in scene.get("objects", []):  # only inside the boxes: a full-image match per colour costs more than drawing
        x0, y0, x1, y1 = obj["box"]
        k = COLOUR_NAMES.index(obj["colour"]) + 1
        inside = (pixels[y0:y1 + 1, x0:x1 + 1] == COLOURS[obj["colour"]]).all(-1)
        colour[y0:y1 + 1, x0:x1 + 1][inside] = k
        shape[y0:y1 + 1, x0:x1 + 1][inside] = SHAPES.index(obj["shape"]) + 1
    if "text" in scene:
        value, (x0, y0, x1, y1) = scene["text"]["value"], scene["text"]["box"]
        ink = pixels[y0:y1 + 1, x0:x1 + 1].mean(-1) < INK_LUMINANCE
        slot = np.minimum((np.arange(x1 - x0 + 1) * len(value) / (x1 - x0 + 1)).astype(int), len(value) - 1)
        classes = np.broadcast_to(np.array([int(c) + 1 for c in value], np.uint8)[slot], ink.shape)
        digit[y0:y1 + 1, x0:x1 + 1][ink] = classes[ink]
    return LabelMaps(colour, shape, digit)


def centres_in(scene: dict[str, Any], region: tuple[float, ...]) -> list[tuple[float, float, dict[str, Any]]]:
    """(cx, cy, shape) for each shape whose centre lies in `region` (x0, y0, x1, y1 in the
    image's pixels, end exclusive), left to right: a shape belongs to the view holding its centre."""
    x0, y0, x1, y1 = region
    inside = []
    for obj in scene.get("objects", []):
        bx0, by0, bx1, by1 = obj["box"]
        cx, cy = (bx0 + bx1 + 1) / 2, (by0 + by1 + 1) / 2
        if x0 <= cx < x1 and y0 <= cy < y1:
            inside.append((cx, cy, obj))
    return sorted(inside, key=lambda item: item[0])


def view_slots(scene: dict[str, Any], region: tuple[float, float, float, float], tokens: int) -> list[int]:
    """The word (index into WORDS) each of a view's `tokens` should read as, for the part of
    the image `region` (x0, y0, x1, y1 in the image's pixels, end exclusive) covers.

    A digit or a shape belongs to the view holding its centre; "left"/"right" is the shape
    centre's side of the view's middle (the image's for the overview, where vision_data
    keeps a margin around the middle)."""
    x0, y0, x1, y1 = region
    slots = [0] * tokens
    if "text" in scene:
        value, (bx0, by0, bx1, by1) = scene["text"]["value"], scene["text"]["box"]
        width, cy = bx1 - bx0 + 1, (by0 + by1 + 1) / 2
        inside = [d for i, d in enumerate(value) if x0 <= bx0 + (i + 0.5) * width / len(value) < x1 and y0 <= cy < y1]
        for token, d in zip(SLOTS["digits"], inside[:MAX_DIGITS]):
            slots[token] = WORD_INDEX[d]
    shapes = centres_in(scene, region)
    if shapes:
        slots[SLOTS["count"][0]] = WORD_INDEX[str(len(shapes))]
    for slot, (cx, _, obj) in zip(("first", "last"), (shapes[0], shapes[-1]) if len(shapes) > 1 else shapes):
        colour, kind, side = SLOTS[slot]
        slots[colour], slots[kind] = WORD_INDEX[" " + obj["colour"]], WORD_INDEX[" " + obj["shape"]]
        slots[side] = WORD_INDEX[" left" if cx < (x0 + x1) / 2 else " right"]
    return slots


def tiling(width: int, height: int, shape: EncoderShape) -> tuple[tuple[int, int], tuple[int, int]]:
    """(resized, refined) sizes: the longest edge to `longest_edge` keeping the aspect
    (even sides, as libmtmd rounds), then each side up to a multiple of the tile."""
    if width >= height:
        resized = (shape.longest_edge, int(shape.longest_edge / (width / height)))
        resized = (resized[0], max(2, resized[1] + resized[1] % 2))
    else:
        resized = (int(shape.longest_edge * (width / height)), shape.longest_edge)
        resized = (max(2, resized[0] + resized[0] % 2), resized[1])
    tiles_x, tiles_y = math.ceil(resized[0] / shape.tile), math.ceil(resized[1] / shape.tile)
    return resized, (tiles_x * shape.tile, tiles_y * shape.tile)


def patch_classes(labels: Array, classes: int, share: float, patch: int) -> Array:
    """(patches,) the most common non-zero class of each patch when it covers `share` of it, else 0."""
    import numpy as np

    side = labels.shape[0] // patch
    grid = labels.reshape(side, patch, side, patch).transpose(0, 2, 1, 3).reshape(side * side, patch * patch)
    counts = (grid[:, :, None] == np.arange(1, classes)[None, None, :]).sum(1)
    return np.where(counts.max(1) >= share * patch * patch, counts.argmax(1) + 1, 0).astype(np.int64)


def centre_patches(scene: dict[str, Any], region: tuple[float, ...], side: int) -> Array:
    """(patches,) 1 where a shape's centre (`centres_in`, as `view_slots` places it) falls in
    the view covering `region` of the image, row-major over its side x side patches, else 0."""
    import numpy as np

    x0, y0, x1, y1 = region
    marks = np.zeros(side * side, np.int64)
    for cx, cy, _ in centres_in(scene, region):
        column = min(side - 1, int((cx - x0) / (x1 - x0) * side))
        row = min(side - 1, int((cy - y0) / (y1 - y0) * side))
        marks[row * side + column] = 1
    return marks


@dataclass(frozen=True)
class View:
    """One tile the encoder sees (or the overview) and what it should read from it."""

    pixels: Array  # uint8, tile x tile x 3
    patches: Array  # int64, 4 x patches: colour, shape and digit class of each patch, 1 where a shape's centre is
    slots: Array  # int64, tokens: a WORDS index per LM token
    overview: bool


def image_views(image: Image.Image, scene: dict[str, Any], shape: EncoderShape) -> list[View]:
    """Every view of an image the processor makes: the overview first, then the tiles row by row."""
    import numpy as np
    from PIL import Image

    maps = label_maps(image, scene)
    resized, refined = tiling(*image.size, shape)
    big = image.convert("RGB").resize(resized, Image.LANCZOS).resize(refined, Image.LANCZOS)
    layers = [Image.fromarray(m).resize(resized, Image.NEAREST).resize(refined, Image.NEAREST)
              for m in (maps.colour, maps.shape, maps.digit)]
    scale_x, scale_y = refined[0] / image.size[0], refined[1] / image.size[1]

    def view(pixels: Image.Image, labels: list[Image.Image], region: tuple[float, ...], overview: bool) -> View:
        colour, kind, digit = (np.asarray(layer) for layer in labels)
        patches = np.stack([patch_classes(colour, N_COLOURS, 0.15, shape.patch),
                            patch_classes(kind, N_SHAPES, 0.15, shape.patch),
                            patch_classes(digit, N_DIGITS, 0.04, shape.patch),  # thin strokes: a little ink is a digit
                            centre_patches(scene, region, shape.patches_per_side)])
        return View(np.asarray(pixels, np.uint8), patches,
                    np.array(view_slots(scene, region, shape.tokens_per_tile)), overview)

    size = (shape.tile, shape.tile)
    views = [view(big.resize(size, Image.LANCZOS), [layer.resize(size, Image.NEAREST) for layer in layers],
                  (0, 0, *image.size), True)]
    for top in range(0, refined[1], shape.tile):
        for left in range(0, refined[0], shape.tile):
            box = (left, top, left + shape.tile, top + shape.tile)
            region = (left / scale_x, top / scale_y, box[2] / scale_x, box[3] / scale_y)
            views.append(view(big.crop(box), [layer.crop(box) for layer in layers], region, False))
    return views


def pool_categories(mix: tuple[tuple[str, int], ...]) -> list[str]:
    """One cycle of categories, each as often as its weight in `mix`, interleaved."""
    cycle = [name for round_ in range(max(w for _, w in mix)) for name, weight in mix if round_ < weight]
    unknown = {name for name, _ in mix} - set(CATEGORIES)
    if unknown:
        raise PrimeError(f"pool_mix names unknown categories {sorted(unknown)}; categories: {', '.join(CATEGORIES)}")
    return cycle


def view_pool(shape: EncoderShape, seed: int, first: int, images: int, advance=lambda: None,
              mix: tuple[tuple[str, int], ...] = EncoderTraining.pool_mix) -> dict[str, Tensor]:
    """All views of `images` fresh images (categories in turn, as often as `mix` weighs
    them), stacked: pixels (uint8), patches, slots, overview flags and each view's category."""
    import numpy as np
    import torch

    cycle = pool_categories(mix)
    views, categories = [], []
    for index in range(first, first + images):
        category = cycle[index % len(cycle)]
        image, record = make_example(seed, "train", index, category)
        for v in image_views(image, record["scene"], shape):
            views.append(v)
            categories.append(CATEGORIES.index(category))
        advance()
    return {"pixels": torch.from_numpy(np.stack([v.pixels for v in views])),
            "patches": torch.from_numpy(np.stack([v.patches for v in views])),
            "slots": torch.from_numpy(np.stack([v.slots for v in views])),
            "overview": torch.tensor([v.overview for v in views]),
            "category": torch.tensor(categories)}


def normalise(pixels: Tensor) -> Tensor:
    """uint8 (views, h, w, 3) -> the processor's input: rescaled to [0, 1], then mean 0.5, std 0.5."""
    return pixels.float().div(127.5).sub(1.0).permute(0, 3, 1, 2)


def pixel_shuffle(features: Tensor, scale: int) -> Tensor:
    """(views, patches, d) -> (views, tokens, d * scale^2): transformers' Idefics3Connector.pixel_shuffle
    (it does not read `self`), so tokens group patches exactly as the connector will."""
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    return Idefics3Connector.pixel_shuffle(None, features, scale)


def patch_classes_per_label(centres: bool) -> list[int]:
    """The patch head's outputs, label by label: colour, shape, digit (and shape centre)."""
    return [N_COLOURS, N_SHAPES, N_DIGITS] + ([N_CENTRES] if centres else [])


def encoder_loss(slot_logits: Tensor, patch_logits: Tensor, batch: dict[str, Tensor], centres: bool = True) -> Tensor:
    """The encoder's own loss: cross-entropy of each token's word (its linear readout head)
    plus half the per-patch colour/shape/digit (and, with `centres`, shape-centre) loss."""
    import torch.nn.functional as F

    patches = batch["patches"]
    aux = sum(F.cross_entropy(logits.flatten(0, 1), patches[:, k].flatten())
              for k, logits in enumerate(patch_logits.split(patch_classes_per_label(centres), dim=-1)))
    return F.cross_entropy(slot_logits.flatten(0, 1), batch["slots"].flatten()) + 0.5 * aux


def connector_loss(tokens: Tensor, words: Tensor, slots: Tensor) -> Tensor:
    """How far each connector output (`tokens`, views x tokens x text hidden) is from its
    word's embedding: cross-entropy over the cosine to every word (it must be nearest its
    own) plus the squared distance relative to the words' mean square norm (it should *be*
    that embedding, the vector the LM knows)."""
    import torch.nn.functional as F

    target = slots.flatten()
    flat = tokens.flatten(0, 1)
    distance = (flat - words[target]).pow(2).sum(-1).mean() / words.pow(2).sum(-1).mean()
    return F.cross_entropy(word_cosines(flat, words) / COSINE_TEMPERATURE, target) + distance


def word_cosines(tokens: Tensor, words: Tensor) -> Tensor:
    """(..., len(WORDS)) the cosine of each connector output to each word's embedding: what
    the connector's loss ranks and `nearest_words` reads."""
    import torch.nn.functional as F

    return F.normalize(tokens, dim=-1) @ F.normalize(words, dim=-1).T


def nearest_words(tokens: Tensor, words: Tensor) -> Tensor:
    """(views, tokens) the WORDS index each connector output is nearest to (cosine): the word
    the LM reads it as."""
    return word_cosines(tokens, words).argmax(-1)


def readout_accuracy(predicted: Tensor, pool: dict[str, Tensor]) -> dict[str, float]:
    """On overviews: the share of images whose tokens answer each category's question right
    (colour: the first shape's colour; shape: its kind; count; side: every shape's side;
    number: every digit and the blank after the last)."""
    slots, category = pool["slots"][pool["overview"]], pool["category"][pool["overview"]]
    tokens = {"colour": SLOTS["first"][:1], "shape": SLOTS["first"][1:2], "count": SLOTS["count"],
              "side": (SLOTS["first"][2], SLOTS["last"][2]), "number": SLOTS["digits"]}
    accuracy = {}
    for k, name in enumerate(CATEGORIES):
        rows = category == k
        columns = list(tokens[name])
        right = (predicted[rows][:, columns] == slots[rows][:, columns]).all(1)
        accuracy[name] = round(right.float().mean().item(), 3)
    return accuracy


def pretrain_encoder(shape: EncoderShape, training: EncoderTraining, words: Tensor, *, log: Log = print,
                     progress: bool = True) -> dict[str, Any]:
    """Train a fresh encoder to read views into WORDS (its own linear head) and, beside it, the
    connector's projection to land each token on the LM's embedding (`words`, see
    `word_vectors`) of the word it reads as. The connector learns from the encoder's
    features without steering them (detached): trained into the encoder, its loss took the
    early steps' clipped gradient and the encoder read shapes 76 % instead of 98 %.
    Returns the encoder's state dict (the keys of transformers' Idefics3VisionTransformer),
    the connector's weight (text hidden x vision hidden * scale^2, as Idefics3's
    `modality_projection.proj`) and, on held-out overviews, the share read right through the
    connector (each token's nearest word: what the LM sees) and by the encoder's own head, at
    the end and `CURVE_POINTS` times during the run (`curve`: a long run shows it learning)."""
    import torch
    from rich.progress import Progress
    from transformers import Idefics3VisionConfig
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionTransformer

    torch.manual_seed(training.seed)
    encoder = Idefics3VisionTransformer(Idefics3VisionConfig(**shape.vision_config()))
    features = shape.hidden_size * shape.scale_factor ** 2
    slot_head = torch.nn.Linear(features, len(WORDS))
    patch_head = torch.nn.Linear(shape.hidden_size, sum(patch_classes_per_label(training.centre_labels)))
    connector = torch.nn.Linear(features, words.shape[1], bias=False)
    params = [*encoder.parameters(), *slot_head.parameters(), *patch_head.parameters(), *connector.parameters()]
    optimizer = torch.optim.AdamW(params, lr=training.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=training.learning_rate,
                                                   total_steps=training.steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(training.seed)
    words = words.float()
    start, loss = time.perf_counter(), torch.tensor(0.0)
    with Progress(disable=not progress) as bar:
        drawing = bar.add_task("drawing the encoder's images", total=training.pool_images + training.heldout_images)
        pool = view_pool(shape, training.seed, training.first_index, training.pool_images,
                         lambda: bar.advance(drawing), training.pool_mix)
        heldout = view_pool(shape, training.seed, training.first_index + training.pool_images, training.heldout_images,
                            lambda: bar.advance(drawing), training.pool_mix)
        overviews, tiles = pool["overview"].nonzero().squeeze(1), (~pool["overview"]).nonzero().squeeze(1)
        n_overviews = round(training.batch_size * training.overview_share)
        task = bar.add_task("vision encoder reading scenes", total=training.steps)
        every, curve = max(1, training.steps // CURVE_POINTS), []
        for step in range(1, training.steps + 1):
            rows = torch.cat([overviews[torch.randint(len(overviews), (n_overviews,), generator=generator)],
                              tiles[torch.randint(len(tiles), (training.batch_size - n_overviews,), generator=generator)]])
            batch = {k: v[rows] for k, v in pool.items()}
            hidden = encoder(pixel_values=normalise(batch["pixels"])).last_hidden_state
            shuffled = pixel_shuffle(hidden, shape.scale_factor)
            loss = (encoder_loss(slot_head(shuffled), patch_head(hidden), batch, training.centre_labels)
                    + connector_loss(connector(shuffled.detach()), words, batch["slots"]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            bar.advance(task)
            if step % every == 0 or step == training.steps:
                accuracy, readout = heldout_readout(encoder, slot_head, connector, heldout, words, shape)
                curve.append({"step": step, "accuracy": accuracy, "readout": readout})
                log(f"encoder step {step}/{training.steps}, {time.perf_counter() - start:.0f} s, loss {loss.item():.3f}; "
                    "held-out overviews read through the connector (by the encoder's own head): "
                    + ", ".join(f"{k} {accuracy[k]:.0%} ({readout[k]:.0%})" for k in accuracy))
    encoder.eval()
    return {"state_dict": encoder.state_dict(), "connector": connector.weight.detach().contiguous(),
            "accuracy": accuracy, "readout": readout, "loss": round(loss.item(), 4),
            "seconds": round(time.perf_counter() - start, 1), "curve": curve}


def heldout_readout(encoder, slot_head, connector, heldout: dict[str, Tensor], words: Tensor,
                    shape: EncoderShape) -> tuple[dict[str, float], dict[str, float]]:
    """(through the connector, by the encoder's own head): `readout_accuracy` on the held-out
    overviews. Evaluation only (no gradient, no random draw), so logging the curve leaves the
    run's weights as they would be without it."""
    import torch

    encoder.eval()
    with torch.no_grad():
        shuffled = pixel_shuffle(encoder(pixel_values=normalise(heldout["pixels"][heldout["overview"]])).last_hidden_state,
                                 shape.scale_factor)
        readout = readout_accuracy(slot_head(shuffled).argmax(-1), heldout)
        accuracy = readout_accuracy(nearest_words(connector(shuffled), words), heldout)
    encoder.train()
    return accuracy, readout


def word_vectors(tokenizer, embeddings: Tensor) -> Tensor:
    """(len(WORDS), hidden): the LM's input embedding of each word (a word the tokenizer
    splits gets the mean of its pieces)."""
    import torch

    return torch.stack([embeddings[tokenizer.encode(word, add_special_tokens=False)].mean(0) for word in WORDS])
