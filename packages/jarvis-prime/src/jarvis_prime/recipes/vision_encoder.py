"""Stage 0 of `prime-135m-vision-v1`: a small SigLIP encoder learns to see what vision_data draws.

No pretrained vision weights are reachable offline, so the encoder starts from random
weights. Trained only through the answer tokens of the 135M language model, it would see
a few thousand examples in the recipe's budget (every step runs the whole LM forward and
backward): enough for colours, nowhere near enough for digits. Here it learns first, on
its own, from dense labels that come for free with synthetic images: for every patch,
which palette colour covers it, which shape kind, which digit, and whether a shape's centre
lies in it. That costs the encoder alone (a thousand images a minute), and afterwards its
patch features say what is where, which the connector and the LM's LoRA then learn to read
(stage 1, Reactor Core).

The encoder sees exactly what it will see at inference: the image tiled the way
transformers' Idefics3ImageProcessor and llama.cpp's libmtmd tile it (longest edge to
`longest_edge`, then up to a multiple of `tile` on each side, cut into tiles, plus the
whole image squeezed into one tile), so each training view is one such tile or the
overview. Labels go through the same resizes (nearest neighbour).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
INK_LUMINANCE = 150  # darker than any background pixel (>= 176), lighter than no ink's core
OVERVIEW_SHARE = 0.4  # views that are the whole image squeezed into one tile; the rest are tiles


@dataclass(frozen=True)
class EncoderTraining:
    steps: int = 400
    batch_size: int = 64  # views per step, one per image
    learning_rate: float = 1e-3
    seed: int = 0
    first_index: int = 10_000_000  # images drawn from vision_data's train stream past any training split


@dataclass(frozen=True)
class LabelMaps:
    """Per-pixel classes of one image (uint8 arrays, height x width) and the shapes' centres."""

    colour: Array
    shape: Array
    digit: Array
    centres: tuple[tuple[float, float], ...]


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
    for k, name in enumerate(COLOUR_NAMES):
        colour[(pixels == COLOURS[name]).all(-1)] = k + 1
    centres = []
    for obj in scene.get("objects", []):
        x0, y0, x1, y1 = obj["box"]
        inside = colour[y0:y1 + 1, x0:x1 + 1] == COLOUR_NAMES.index(obj["colour"]) + 1
        shape[y0:y1 + 1, x0:x1 + 1][inside] = SHAPES.index(obj["shape"]) + 1
        centres.append(((x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2))
    if "text" in scene:
        value, (x0, y0, x1, y1) = scene["text"]["value"], scene["text"]["box"]
        ink = pixels[y0:y1 + 1, x0:x1 + 1].mean(-1) < INK_LUMINANCE
        slot = np.minimum((np.arange(x1 - x0 + 1) * len(value) / (x1 - x0 + 1)).astype(int), len(value) - 1)
        classes = np.broadcast_to(np.array([int(c) + 1 for c in value], np.uint8)[slot], ink.shape)
        digit[y0:y1 + 1, x0:x1 + 1][ink] = classes[ink]
    return LabelMaps(colour, shape, digit, tuple(centres))


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


def training_view(image: Image.Image, maps: LabelMaps, shape: EncoderShape, rng: random.Random
                  ) -> tuple[Tensor, dict[str, Tensor]]:
    """One tile the encoder would see for this image (a random tile or the overview) and its patch targets."""
    import numpy as np
    import torch
    from PIL import Image

    resized, refined = tiling(*image.size, shape)
    big = image.convert("RGB").resize(resized, Image.LANCZOS).resize(refined, Image.LANCZOS)
    layers = [Image.fromarray(m).resize(resized, Image.NEAREST).resize(refined, Image.NEAREST)
              for m in (maps.colour, maps.shape, maps.digit)]
    scale_x, scale_y = refined[0] / image.size[0], refined[1] / image.size[1]
    centres = [(x * scale_x, y * scale_y) for x, y in maps.centres]
    if rng.random() < OVERVIEW_SHARE:
        size = (shape.tile, shape.tile)
        view, layers = big.resize(size, Image.LANCZOS), [layer.resize(size, Image.NEAREST) for layer in layers]
        centres = [(x * shape.tile / refined[0], y * shape.tile / refined[1]) for x, y in centres]
    else:
        left = rng.randrange(refined[0] // shape.tile) * shape.tile
        top = rng.randrange(refined[1] // shape.tile) * shape.tile
        box = (left, top, left + shape.tile, top + shape.tile)
        view, layers = big.crop(box), [layer.crop(box) for layer in layers]
        centres = [(x - left, y - top) for x, y in centres if left <= x < box[2] and top <= y < box[3]]
    side = shape.patches_per_side
    centre = np.zeros(side * side, np.float32)
    for x, y in centres:
        centre[min(int(y) // shape.patch, side - 1) * side + min(int(x) // shape.patch, side - 1)] = 1.0
    colour, kind, digit = (np.asarray(layer) for layer in layers)
    targets = {
        "colour": patch_classes(colour, N_COLOURS, 0.15, shape.patch),
        "shape": patch_classes(kind, N_SHAPES, 0.15, shape.patch),
        "digit": patch_classes(digit, N_DIGITS, 0.04, shape.patch),  # thin strokes: a little ink is a digit
        "centre": centre,
    }
    # the processor's normalisation: rescale to [0, 1], then mean 0.5, std 0.5
    pixels = torch.from_numpy(np.asarray(view, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
    return pixels, {k: torch.from_numpy(v) for k, v in targets.items()}


def scene_batch(shape: EncoderShape, training: EncoderTraining, step: int, rng: random.Random
                ) -> tuple[Tensor, dict[str, Tensor]]:
    """`batch_size` fresh images (categories in turn), one view each: never the same image twice."""
    import torch

    views, targets = [], []
    for i in range(training.batch_size):
        index = training.first_index + step * training.batch_size + i
        image, record = make_example(training.seed, "train", index, CATEGORIES[index % len(CATEGORIES)])
        pixels, target = training_view(image, label_maps(image, record["scene"]), shape, rng)
        views.append(pixels)
        targets.append(target)
    return torch.stack(views), {k: torch.stack([t[k] for t in targets]) for k in targets[0]}


def scene_loss(logits: Tensor, targets: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy per patch for colour, shape and digit, plus the centre flags (weighted:
    a centre is one patch in dozens); returns the loss and each label's accuracy on the
    patches that hold something (a patch of background is easy and would flatter it)."""
    import torch
    import torch.nn.functional as F

    colour, kind, digit, centre = logits.split([N_COLOURS, N_SHAPES, N_DIGITS, 1], dim=-1)
    loss = (F.cross_entropy(colour.flatten(0, 1), targets["colour"].flatten())
            + F.cross_entropy(kind.flatten(0, 1), targets["shape"].flatten())
            + F.cross_entropy(digit.flatten(0, 1), targets["digit"].flatten())
            + F.binary_cross_entropy_with_logits(centre.squeeze(-1), targets["centre"], pos_weight=torch.tensor(5.0)))
    accuracy = {}
    with torch.no_grad():
        for name, out in (("colour", colour), ("shape", kind), ("digit", digit)):
            present = targets[name] > 0
            accuracy[name] = ((out.argmax(-1) == targets[name]) & present).sum().item() / max(present.sum().item(), 1)
    return loss, accuracy


def pretrain_encoder(shape: EncoderShape, training: EncoderTraining, *, log: Log = print,
                     progress: bool = True) -> dict[str, Any]:
    """Train a fresh encoder on scene labels; returns its state dict (the keys of transformers'
    Idefics3VisionTransformer) and the last step's accuracies."""
    import torch
    from rich.progress import Progress
    from transformers import Idefics3VisionConfig
    from transformers.models.idefics3.modeling_idefics3 import Idefics3VisionTransformer

    torch.manual_seed(training.seed)
    rng = random.Random(f"prime-vision-encoder/{training.seed}")
    encoder = Idefics3VisionTransformer(Idefics3VisionConfig(**shape.vision_config()))
    heads = torch.nn.Linear(shape.hidden_size, N_COLOURS + N_SHAPES + N_DIGITS + 1)
    params = [*encoder.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=training.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=training.learning_rate,
                                                   total_steps=training.steps, pct_start=0.05)
    start, accuracy, loss = time.perf_counter(), {}, torch.tensor(0.0)
    with Progress(disable=not progress) as bar:
        task = bar.add_task("vision encoder on scene labels", total=training.steps)
        for step in range(training.steps):
            pixels, targets = scene_batch(shape, training, step, rng)
            loss, accuracy = scene_loss(heads(encoder(pixel_values=pixels).last_hidden_state), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            bar.advance(task)
    seconds = time.perf_counter() - start
    log(f"encoder: {training.steps} steps in {seconds:.0f} s, loss {loss.item():.3f}, patch accuracy "
        + ", ".join(f"{k} {v:.2f}" for k, v in accuracy.items()))
    return {"state_dict": encoder.state_dict(), "accuracy": accuracy, "loss": loss.item(), "seconds": round(seconds, 1)}


def word_vectors(tokenizer, embeddings: Tensor) -> dict[str, Tensor]:
    """The LM's input embedding of each label's word (" red", " circle", "7"; a word the
    tokenizer splits gets the mean of its pieces) and of " " for a patch of background."""
    import torch

    def vector(word: str) -> Tensor:
        return embeddings[tokenizer.encode(word, add_special_tokens=False)].mean(0)

    return {"colour": torch.stack([vector(" " + name) for name in COLOUR_NAMES]),
            "shape": torch.stack([vector(" " + name) for name in SHAPES]),
            "digit": torch.stack([vector(str(d)) for d in range(10)]),
            "background": vector(" ")}


def align_connector(encoder_state: dict[str, Tensor], shape: EncoderShape, training: EncoderTraining,
                    words: dict[str, Tensor], *, batches: int = 40, ridge: float = 1e-2,
                    log: Log = print) -> dict[str, Any]:
    """The connector's projection, fitted in closed form so each image token lands on the
    words for what it covers.

    A fresh connector maps the encoder's patches to vectors the LM has never seen, and
    learning that map through the LM's answers alone took more steps than the budget has
    (about chance after 2,000 examples). Instead: pixel-shuffle the encoder's features as
    the connector does, pixel-shuffle the patch labels the same way, and solve the ridge
    regression from a token's features to the mix of its labels' word embeddings (a token
    that is half red circle, half background -> half " red"/" circle", half " "). The LM
    then reads an image as words it knows, and stage 1 fine-tunes from there.
    """
    import torch
    import torch.nn.functional as F
    from transformers import Idefics3Config, Idefics3VisionConfig
    from transformers.models.idefics3.modeling_idefics3 import (
        Idefics3Connector,
        Idefics3VisionTransformer,
    )

    encoder = Idefics3VisionTransformer(Idefics3VisionConfig(**shape.vision_config()))
    encoder.load_state_dict(encoder_state)
    encoder.eval()
    hidden = words["background"].shape[0]
    connector = Idefics3Connector(Idefics3Config(text_config={"hidden_size": hidden}, vision_config=shape.vision_config(),
                                                 scale_factor=shape.scale_factor))
    rng = random.Random(f"prime-vision-connector/{training.seed}")
    features, targets, start = [], [], time.perf_counter()
    with torch.no_grad():
        for step in range(batches):
            pixels, labels = scene_batch(shape, training, training.steps + step, rng)  # images the encoder never saw
            features.append(connector.pixel_shuffle(encoder(pixel_values=pixels).last_hidden_state, shape.scale_factor))
            patches = torch.cat([F.one_hot(labels["colour"], N_COLOURS), F.one_hot(labels["shape"], N_SHAPES),
                                 F.one_hot(labels["digit"], N_DIGITS)], dim=-1).float()
            tokens = connector.pixel_shuffle(patches, shape.scale_factor)
            tokens = tokens.view(*tokens.shape[:2], shape.scale_factor ** 2, -1).mean(2)  # label shares per token
            colour, kind, digit = tokens.split([N_COLOURS, N_SHAPES, N_DIGITS], dim=-1)
            background = (colour[..., 0] + kind[..., 0] + digit[..., 0]) / 3
            mix = colour[..., 1:] @ words["colour"] + kind[..., 1:] @ words["shape"] + digit[..., 1:] @ words["digit"]
            weight = colour[..., 1:].sum(-1) + kind[..., 1:].sum(-1) + digit[..., 1:].sum(-1) + background
            targets.append((mix + background[..., None] * words["background"]) / weight[..., None])
    x, y = torch.cat(features).flatten(0, 1).double(), torch.cat(targets).flatten(0, 1).double()
    gram = x.T @ x
    solution = torch.linalg.solve(gram + ridge * gram.diagonal().mean() * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y)
    r2 = 1 - ((x @ solution - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()).item()
    log(f"connector: ridge fit on {x.shape[0]} image tokens in {time.perf_counter() - start:.0f} s, R^2 {r2:.3f}")
    return {"weight": solution.T.float().contiguous(), "r2": round(r2, 4)}  # (text hidden, vision hidden * s^2)
