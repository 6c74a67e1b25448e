"""Tokenized examples -> tensors: packed rows, or padded batches.

Packing puts several examples in one row of `max_seq_length` tokens so a batch is not
mostly padding. The examples must not see each other: attention is block-diagonal
(causal inside each example) and each example's positions start again at 0, so every
example is computed exactly as if it ran alone. Hugging Face models (transformers 5)
build that mask themselves from `position_ids` alone: with `attention_mask=None` and no
KV cache, `masking_utils.find_packed_sequence_indices` starts a new segment wherever a
position does not follow the one before it by 1, and `create_causal_mask` allows
attention only inside a segment. Hence the calling contract for a packed `Batch`:

    model(input_ids=b.input_ids, position_ids=b.position_ids, attention_mask=None,
          use_cache=False)

`use_cache=False` is not optional: with the config default (`use_cache=True`) the model
creates a cache, skips segment detection, and every example attends to the ones before
it in the row, silently.

Padding at the end of a packed row is one more segment: pad tokens, labels
IGNORE_INDEX, positions 0, 1, 2, ... The loss cannot leak across examples either: the
model shifts labels by one, so an example's last token is asked for the next example's
first token, and that token (the template's opening header) is never labelled.

Without packing, `collate_padded` pads a batch to its longest example and returns a
normal attention mask. Examples with images (vision models, never packed) get their
pixels in `with_images`: the image processor runs there, once per micro-batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from reactor_core.data.images import open_rgb
from reactor_core.data.native import backend
from reactor_core.data.tokenize import IGNORE_INDEX, TokenizedExample


@dataclass(frozen=True)
class Batch:
    """Model inputs for one micro-batch, all (B, T) int64.

    attention_mask is None for packed rows (see the module docstring for why) and
    1/0 for real/pad tokens otherwise. num_loss_tokens counts labels that are not
    IGNORE_INDEX: the loss's denominator when micro-batches are accumulated.
    num_tokens counts real (non-pad) tokens, for throughput.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    num_loss_tokens: int
    num_tokens: int
    # vision models: (E, tiles, C, H, W) for the E examples with images, in batch order,
    # padded to the largest tile count with all-zero tiles (Idefics3 drops those), and
    # (E, tiles, H, W) which pixels are image rather than padding; None without images
    pixel_values: torch.Tensor | None = None
    pixel_attention_mask: torch.Tensor | None = None

    def vision_inputs(self) -> dict[str, torch.Tensor]:
        """The image keyword arguments of a vision model's forward ({} without images)."""
        if self.pixel_values is None:
            return {}
        return {"pixel_values": self.pixel_values, "pixel_attention_mask": self.pixel_attention_mask}

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments for a Hugging Face causal LM's forward (labels left out).

        `use_cache=False` is part of the contract: packed rows are only kept apart
        when the model builds its mask without a cache (module docstring).
        """
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "attention_mask": self.attention_mask,
            "use_cache": False,
        }

    def without_loss(self) -> Batch:
        """The same inputs with every label ignored: a rank whose share of an epoch's
        last micro-batch is empty runs this, so FSDP's collectives stay in step while
        it contributes nothing to the loss or the gradient."""
        return dataclasses.replace(self, labels=torch.full_like(self.labels, IGNORE_INDEX), num_loss_tokens=0,
                                   num_tokens=0)

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with its tensors on `device`."""
        to = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(
            self,
            input_ids=self.input_ids.to(device),
            labels=self.labels.to(device),
            position_ids=self.position_ids.to(device),
            attention_mask=to(self.attention_mask),
            pixel_values=to(self.pixel_values),
            pixel_attention_mask=to(self.pixel_attention_mask),
        )


def pack_examples(
    examples: Sequence[TokenizedExample], max_seq_length: int
) -> list[list[TokenizedExample]]:
    """Group examples into rows of at most `max_seq_length` tokens: first-fit decreasing.

    Longest examples first (ties in input order), each into the first row with room for
    it. This wastes little (first-fit decreasing never uses more than 11/9 of the
    optimal number of rows, plus one) and is deterministic: the same examples always
    give the same rows. The data kernels' `ffd_pack` (MLForge's C++, or its numpy twin:
    `native.py`) finds "the first row with room" in a max-tree over the rows' free
    space, O(log rows), so packing a million examples takes seconds.
    """
    if max_seq_length < 1:
        raise ValueError(f"`max_seq_length` must be positive, got {max_seq_length}")
    for example in examples:
        if len(example) > max_seq_length:
            raise ValueError(
                f"{example.source}: {len(example)} tokens do not fit in max_seq_length "
                f"{max_seq_length} (tokenize_dataset reports such examples)"
            )
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))  # the kernel's order
    row_of = backend().ffd_pack(np.array([len(e) for e in examples], dtype=np.int64), max_seq_length)
    rows: list[list[TokenizedExample]] = [[] for _ in range(int(row_of.max()) + 1 if len(examples) else 0)]
    for i in order:
        rows[row_of[i]].append(examples[i])
    return rows


def collate_packed(
    rows: Sequence[Sequence[TokenizedExample]], max_seq_length: int, pad_id: int
) -> Batch:
    """Packed rows -> a (len(rows), max_seq_length) batch with restarting positions."""
    if not rows:
        raise ValueError("collate_packed needs at least one row")
    input_ids, labels, position_ids = [], [], []
    num_tokens = 0
    for row in rows:
        used = sum(len(example) for example in row)
        if used > max_seq_length:
            raise ValueError(
                f"a packed row holds {used} tokens, more than max_seq_length {max_seq_length}"
            )
        pad = max_seq_length - used
        input_ids.append([t for ex in row for t in ex.input_ids] + [pad_id] * pad)
        labels.append([t for ex in row for t in ex.labels] + [IGNORE_INDEX] * pad)
        # Positions restart for every example and for the padding after them: each is
        # its own segment of the block-diagonal mask.
        segments = [len(example) for example in row] + ([pad] if pad else [])
        position_ids.append([p for length in segments for p in range(length)])
        num_tokens += used
    return _batch(input_ids, labels, position_ids, None, num_tokens)


def collate_padded(examples: Sequence[TokenizedExample], pad_id: int) -> Batch:
    """Examples -> one batch padded on the right to its longest example."""
    if not examples:
        raise ValueError("collate_padded needs at least one example")
    width = max(len(example) for example in examples)
    input_ids, labels, position_ids, attention_mask = [], [], [], []
    for example in examples:
        pad = width - len(example)
        input_ids.append(example.input_ids + [pad_id] * pad)
        labels.append(example.labels + [IGNORE_INDEX] * pad)
        position_ids.append(list(range(width)))
        attention_mask.append([1] * len(example) + [0] * pad)
    num_tokens = sum(len(example) for example in examples)
    return _batch(input_ids, labels, position_ids, attention_mask, num_tokens)


def with_images(batch: Batch, examples: Sequence[TokenizedExample], image_processor: Any) -> Batch:
    """`batch` (of `examples`) with the pixels of their images: the images decoded (RGB)
    and run through the model's image processor, which tiles them and pads the batch to
    its largest tile count (Idefics3: all-zero tiles, which the model skips, plus
    `pixel_attention_mask`). Examples without images add nothing: the model merges image
    features at the image tokens in batch order, so only the images' order matters."""
    per_example = [[open_rgb(image) for image in example.images] for example in examples if example.images]
    if not per_example:
        return batch
    pixels = image_processor(images=per_example, return_tensors="pt")
    mask = pixels.get("pixel_attention_mask")
    return dataclasses.replace(batch, pixel_values=pixels["pixel_values"],
                               pixel_attention_mask=None if mask is None else mask.bool())


def _batch(
    input_ids: list[list[int]],
    labels: list[list[int]],
    position_ids: list[list[int]],
    attention_mask: list[list[int]] | None,
    num_tokens: int,
) -> Batch:
    labels_tensor = torch.tensor(labels, dtype=torch.long)  # (B, T)
    return Batch(
        input_ids=torch.tensor(input_ids, dtype=torch.long),
        labels=labels_tensor,
        position_ids=torch.tensor(position_ids, dtype=torch.long),
        attention_mask=(
            None if attention_mask is None else torch.tensor(attention_mask, dtype=torch.long)
        ),
        # Counted from lengths and labels, never from pad_id: the pad token is often
        # also the end-of-turn token (SmolLM2's is <|im_end|>), which replies contain.
        num_loss_tokens=int((labels_tensor != IGNORE_INDEX).sum()),
        num_tokens=num_tokens,
    )
