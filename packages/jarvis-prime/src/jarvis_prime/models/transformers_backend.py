"""The transformers backend: safetensors weights, optionally 8/4-bit through bitsandbytes.

Imported only when this backend is chosen, so torch stays out of processes that run
llama.cpp. Generation is transformers' own `generate`; streaming runs it in a worker
thread with a `TextIteratorStreamer`, the pattern transformers documents. A request with
OpenAI's extras (penalties, a grammar, logprobs) is decoded by the batcher's loop instead
(`batching.decode_one`), which does them; `generate` has no grammar and no logprobs.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    BitsAndBytesConfig,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from jarvis_prime.errors import BackendUnavailableError
from jarvis_prime.models.base import Chunk, Generation, GenerationParams, StopStringFilter, collect, cut_at_stop
from jarvis_prime.models.batching import decode_one
from jarvis_prime.models.content import Media


def _dtype_for(device: str) -> torch.dtype:
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32


def _quantization_config(quantization: Literal["8bit", "4bit"] | None, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True
        )
    return None


class _StopFlag(StoppingCriteria):
    """Lets the streaming consumer end generation once it has seen a stop string."""

    def __init__(self) -> None:
        self.stop = threading.Event()

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.stop.is_set(), dtype=torch.bool, device=input_ids.device)


class TransformersBackend:
    name = "transformers"

    def __init__(self, model_dir: Path, *, device: str, quantization: Literal["8bit", "4bit"] | None,
                 vision: bool = False) -> None:
        if device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError("device='cuda' but torch sees no CUDA GPU")
        if device == "mps" and not torch.backends.mps.is_available():
            raise BackendUnavailableError("device='mps' but torch's MPS backend is not available")
        self.device = device
        # bitsandbytes int8 matmuls run in float16; bf16 inputs would be cast every call
        dtype = torch.float16 if quantization == "8bit" and device == "cuda" else _dtype_for(device)
        # A vision model: its processor (image processor + tokenizer) and the image-text-to-text class.
        self.processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True) if vision else None
        self._last_media: tuple[Media, dict] | None = None
        self.tokenizer = self.processor.tokenizer if vision else AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model_class = AutoModelForImageTextToText if vision else AutoModelForCausalLM
        self.model = model_class.from_pretrained(
            model_dir,
            dtype=dtype,
            quantization_config=_quantization_config(quantization, dtype),
            device_map=device if quantization else None,
            local_files_only=True,
            use_safetensors=True,  # never unpickle weights
        )
        if not quantization:
            self.model.to(device)
        self.model.eval()
        self.bos_token = self.tokenizer.bos_token or ""
        self.eos_token = self.tokenizer.eos_token or ""
        eos = self.model.generation_config.eos_token_id
        self.eos_ids: set[int] = set(eos if isinstance(eos, list) else [eos])  # any of them ends a reply
        pad = self.tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else self.tokenizer.eos_token_id

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special)["input_ids"]

    @property
    def sees_images(self) -> bool:
        return self.processor is not None

    # What an image part becomes before the chat template: the template's own image token,
    # which the processor expands to the image's tiles.
    image_part = {"type": "image"}

    def _processed(self, media: Media) -> dict:
        """The processor's tensors for `media`: input_ids with every image expanded, pixel values.
        The last result is kept: `encode_chat` and the generation that follows ask for the same."""
        if self._last_media is not None and self._last_media[0] is media:
            return self._last_media[1]
        from PIL import Image

        images = [Image.open(io.BytesIO(image.data)).convert("RGB") for image in media.images]
        inputs = self.processor(text=media.text, images=[images], return_tensors="pt", add_special_tokens=False)
        tensors = {k: v.to(self.model.device, dtype=self.model.dtype if v.is_floating_point() else v.dtype)
                   for k, v in inputs.items()}
        self._last_media = (media, tensors)
        return tensors

    def tokenize_media(self, media: Media) -> list[int]:
        return self._processed(media)["input_ids"][0].tolist()

    def _generate_kwargs(self, prompt_ids: Sequence[int], params: GenerationParams, media: Media | None = None) -> dict:
        input_ids = torch.tensor([list(prompt_ids)], device=self.model.device)
        sampling = params.temperature > 0
        kwargs = dict(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=params.max_new_tokens,
            do_sample=sampling,
            pad_token_id=self.pad_id,
        )
        if sampling:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        else:  # the model's generation_config may carry sampling defaults; greedy ignores them
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        if media is not None:  # pixel values (and masks) beside the ids tokenize_media made
            kwargs.update({k: v for k, v in self._processed(media).items() if k not in ("input_ids", "attention_mask")})
        return kwargs

    def _finish(self, new_ids: list[int], params: GenerationParams, stopped_by_string: bool) -> str:
        if stopped_by_string or (new_ids and new_ids[-1] in self.eos_ids) or len(new_ids) < params.max_new_tokens:
            return "stop"
        return "length"

    def _own_loop(self, prompt_ids: Sequence[int], params: GenerationParams, media: Media | None) -> bool:
        if not params.asks_extras:
            return False
        if media is not None:
            raise ValueError("penalties, grammars and logprobs work on text prompts only on the transformers backend "
                             "(this one has images)")
        return True

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int], params: GenerationParams, media: Media | None = None) -> Generation:
        if self._own_loop(prompt_ids, params, media):
            text, finish, logprobs = collect(list(decode_one(self, prompt_ids, params)), params.logprobs is not None)
            return Generation(text, finish, len(prompt_ids), len(self.tokenize(text, add_special=False)),
                              logprobs=logprobs)
        output = self.model.generate(**self._generate_kwargs(prompt_ids, params, media))
        new_ids = output[0, len(prompt_ids):].tolist()
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        text, found = cut_at_stop(text, params.stop)
        return Generation(text, self._finish(new_ids, params, found), len(prompt_ids), len(new_ids))

    def stream(self, prompt_ids: Sequence[int], params: GenerationParams, media: Media | None = None) -> Iterator[Chunk]:
        if self._own_loop(prompt_ids, params, media):
            yield from decode_one(self, prompt_ids, params)
            return
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        flag = _StopFlag()
        kwargs = self._generate_kwargs(prompt_ids, params, media)
        kwargs.update(streamer=streamer, stopping_criteria=StoppingCriteriaList([flag]))
        result: dict = {}

        def work() -> None:
            try:
                with torch.inference_mode():
                    result["output"] = self.model.generate(**kwargs)
            except BaseException as err:  # re-raised in the consumer's thread
                result["error"] = err
                streamer.end()

        worker = threading.Thread(target=work, name="prime-transformers-generate", daemon=True)
        worker.start()
        stops = StopStringFilter(params.stop)
        try:
            for piece in streamer:
                text = stops.feed(piece)
                if text:
                    yield Chunk(text)
                if stops.stopped:
                    flag.stop.set()
                    break
        finally:
            flag.stop.set()  # an abandoned stream must not keep the model busy
            worker.join()
        if "error" in result:
            raise result["error"]
        tail = stops.flush()
        new_ids = result["output"][0, len(prompt_ids):].tolist()
        yield Chunk(tail, self._finish(new_ids, params, stops.stopped))

    @torch.no_grad()
    def token_logprobs(self, ids: Sequence[int]) -> list[float]:
        inputs = torch.tensor([list(ids)], device=self.model.device)
        logits = self.model(input_ids=inputs, use_cache=False).logits[0, :-1].float()
        return torch.log_softmax(logits, dim=-1).gather(-1, inputs[0, 1:, None])[:, 0].tolist()

    def close(self) -> None:
        del self.model
        if self.device == "cuda":
            torch.cuda.empty_cache()
