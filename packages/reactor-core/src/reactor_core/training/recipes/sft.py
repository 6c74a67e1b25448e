"""`method: sft`: supervised fine-tuning on chat data, the assistant's tokens labelled.

    from reactor_core import Trainer, TrainingConfig
    result = Trainer(TrainingConfig(model_name="smollm2-135m-instruct", use_lora=True,
                                    lora_rank=16, num_epochs=3)).train("./data/train.jsonl")
    result.output_dir, result.model_dir, result.metrics

Items are packed rows of examples (or single examples without `packing`); the loss is
the token-mean cross-entropy, plus the optional KL-to-base term (`kl_to_base`) on the
batch or on separate anchor text (`kl_anchor_path`).

Vision models (config.json with `vision_config`): the processor's chat template renders
each example and expands its images into image tokens at setup (tokenized once); the
images stay on the example and become pixels in `collate` (the image processor, once
per micro-batch); items are single examples (no packing); the loss, eval and samples
take the images to the model.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch

from reactor_core.data import (
    Batch,
    ChatExample,
    ImageLimits,
    ImageTokens,
    TokenizedExample,
    collate_packed,
    collate_padded,
    load_chat_file,
    open_rgb,
    pack_examples,
    tokenize_dataset,
    with_images,
)
from reactor_core.data.anchor import AnchorRows, load_text_file
from reactor_core.files import sha256_file
from reactor_core.training import distributed
from reactor_core.training.recipes.base import Recipe

Item = list[TokenizedExample]  # one packed row, or a single example when not packing


class SFTRecipe(Recipe):
    def setup_data(self, data_path: Path) -> None:
        c = self.config
        self.anchor: AnchorRows | None = None  # kl_anchor_path's text
        limits = ImageLimits(c.max_images_per_example, c.max_image_bytes, c.max_image_pixels)
        train, val = self.read_splits(data_path, partial(load_chat_file, on_bad_example=c.on_bad_example,
                                                         image_limits=limits))
        images = None
        if self.family is not None:  # the vision processor renders; images expand to their tokens
            images = ImageTokens(self.processor, self.processor.image_token, partial(self.family.image_text, self.processor))
        train_tok, _ = tokenize_dataset(train, self.tokenizer, max_seq_length=c.max_seq_length,
                                        on_bad_example=c.on_bad_example, images=images)
        val_tok, _ = tokenize_dataset(val, self.tokenizer, max_seq_length=c.max_seq_length,
                                      on_bad_example=c.on_bad_example, images=images)
        if not train_tok:
            raise ValueError(f"{data_path}: no usable training examples")
        self.train_items: list[Item] = pack_examples(train_tok, c.max_seq_length) if c.packing else [[e] for e in train_tok]
        self.val_items: list[Item] = pack_examples(val_tok, c.max_seq_length) if c.packing else [[e] for e in val_tok]
        self.val_examples = val
        if c.kl_anchor_path:
            texts, anchor_report = load_text_file(c.kl_anchor_path, on_bad_example=c.on_bad_example)
            self.anchor = AnchorRows(texts, self.tokenizer, c.kl_anchor_path, seed=c.seed)
            self.data_files.append({"path": c.kl_anchor_path, "sha256": sha256_file(c.kl_anchor_path),
                                    "examples": anchor_report.examples, "split": "kl_anchor"})

    def collate(self, items: list[Item]) -> Batch:
        c = self.config
        pad_id = self.tokenizer.pad_token_id
        if c.packing:
            # Compiled layers keep a graph per input shape: an epoch's short last batch,
            # filled up with empty rows (all padding, no loss, no gradient), runs the graph
            # already compiled instead of compiling a dynamic one (a minute on 2 cores).
            rows = list(items) + [[]] * (c.batch_size - len(items)) if c.compile else items
            return collate_packed(rows, c.max_seq_length, pad_id)
        examples = [row[0] for row in items]
        batch = collate_padded(examples, pad_id)
        return with_images(batch, examples, self.processor.image_processor) if self.processor else batch

    def batch_weight(self, batch: Batch) -> int:
        """Labelled tokens: every one weighs the same."""
        return batch.num_loss_tokens

    def loss_sum(self, batch: Batch, training: bool = False) -> torch.Tensor:
        """The SFT loss sum; training adds the KL-to-base term when configured, eval never does."""
        kl_weight, anchor_ids = (self.config.kl_to_base, self.anchor_batch()) if training else (0.0, None)
        vision = {key: value.to(self.device) for key, value in batch.vision_inputs().items()}
        with self.autocast_context():
            return self.loss_module(*self.model_inputs(batch), kl_weight=kl_weight,
                                    anchor_ids=None if anchor_ids is None else anchor_ids.to(self.device),
                                    vision=vision or None)

    def anchor_batch(self) -> torch.Tensor | None:
        """This micro-step's rows of anchor text (a function of the micro-step: resumes exactly)."""
        if self.anchor is None:
            return None
        return self.anchor.batch(self.state.micro_step, self.config.kl_anchor_tokens, self.dist.rank, self.dist.world_size)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-mean validation loss and perplexity over every validation item."""
        if not self.val_items:
            return {}
        self.loss_module.eval()
        loss_sum, tokens = 0.0, 0
        for batch in self.eval_batches():
            loss_sum += self.loss_sum(batch).item()
            tokens += batch.num_loss_tokens
        loss_sum, tokens = distributed.all_reduce([loss_sum, tokens])
        loss = loss_sum / max(tokens, 1)
        return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}

    @torch.no_grad()
    def samples(self) -> list[dict[str, str]]:
        """Greedy replies to a few validation prompts, to read beside the loss.

        Single-process runs only: generating from FSDP shards would need every rank
        in lockstep through `generate`, for a log line.
        """
        if self.dist.enabled:
            return []
        self.model.eval()
        out = []
        # compiled layers (`compile: true`) would recompile for every decode length: eager here;
        # autocast as in training: a half-precision frozen base feeds float32 trainable parts
        # (a vision model's projector) that only autocast reconciles
        with torch.compiler.set_stance("force_eager"), self.autocast_context():
            for example in self.val_examples[: self.config.num_samples]:
                self.check_interrupted()  # a preemption notice does not wait for the samples
                out.append(self._sample(example))
        return out

    def _sample(self, example: ChatExample) -> dict[str, str]:
        if self.processor is not None:  # the texts to log, an image as <image>
            messages = [{"role": m["role"], "content": "".join(p.get("text", "<image>") for p in m["content"])}
                        for m in example.processor_messages()]
        else:
            messages = example.to_dicts()
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        if self.processor is not None:
            inputs = self._vision_prompt(example, last)
        else:
            inputs = self.tokenizer.apply_chat_template(
                messages[:last], add_generation_prompt=True, return_tensors="pt", return_dict=True
            ).to(self.device)
        ids = self.model.generate(**inputs, max_new_tokens=self.config.sample_max_new_tokens, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id)
        reply = self.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return {"prompt": messages[last - 1]["content"], "reply": reply, "reference": messages[last]["content"]}

    def _vision_prompt(self, example: ChatExample, last: int):
        """The processor's inputs (ids, pixels) for the conversation before message `last`."""
        prompt = self.processor.apply_chat_template(example.processor_messages()[:last], add_generation_prompt=True,
                                                    tokenize=False)
        shown = prompt.count(self.processor.image_token)  # the images of the turns before `last`
        images = [open_rgb(image) for image in example.images[:shown]]
        return self.processor(text=prompt, images=images or None, add_special_tokens=False,
                              return_tensors="pt").to(self.device)
