"""The llama.cpp backend: GGUF files through llama-cpp-python (CPU, Apple Metal, CUDA).

Imports no torch. Sampling is set so it means what `GenerationParams` says: no
repetition penalty and no min-p (llama-cpp-python defaults to 1.1 and 0.05, which
would make greedy decoding disagree with the transformers backend).

OpenAI's extras: presence/frequency penalties are llama.cpp's own sampler penalties
(over the last 64 tokens, llama-cpp-python's window); a GBNF `grammar` is a
`LlamaGrammar` in the sampler chain. Log-probabilities need each step's logits, which
`create_completion` reports only for a context that keeps every position's logits
(`logits_all`: n_ctx x vocab floats, 200 MB for this 49k vocabulary at 1k context); so a
request that asks for them is decoded by `_decode_with_logprobs` instead, a short loop
over `Llama.generate` whose logits processor sees each step's logits before sampling.
"""

from __future__ import annotations

import codecs
import os
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

from jarvis_prime.errors import BackendUnavailableError
from jarvis_prime.models.base import Chunk, Generation, GenerationParams, StopStringFilter, TokenLogprob, collect
from jarvis_prime.models.content import Media


_PARAMS_LOCK = threading.Lock()


def open_llama(gguf_path: str | Path, **kwargs: Any):
    """`llama_cpp.Llama(model_path=gguf_path, **kwargs)`, minus llama.cpp's AMX weight repacking.

    On CPUs with AMX_INT8, llama.cpp (ggml 0.25.3, llama-cpp-python 0.3.36) moves Q4_1 and
    Q8_0 weights into its AMX "extra buffer type", and decoding with them segfaults (a
    2-core AMX Xeon: on the first prompt, the embedded default model included). The model
    parameter `use_extra_bufts=False` keeps the plain CPU path; llama-cpp-python does not
    expose it, so its default model parameters are swapped for this construction only.
    Elsewhere (AVX2, AVX512 without AMX, ARM) the repacking is kept: it is a speed-up there.
    """
    import llama_cpp
    from llama_cpp import llama as llama_module

    if b"AMX_INT8 = 1" not in llama_cpp.llama_print_system_info():
        return llama_cpp.Llama(model_path=str(gguf_path), **kwargs)
    library = llama_module.llama_cpp  # the module Llama.__init__ reads its defaults from
    with _PARAMS_LOCK:
        defaults = library.llama_model_default_params

        def without_extra_buffers():
            params = defaults()
            params.use_extra_bufts = False
            return params

        library.llama_model_default_params = without_extra_buffers
        try:
            return llama_cpp.Llama(model_path=str(gguf_path), **kwargs)
        finally:
            library.llama_model_default_params = defaults


class LlamaCppBackend:
    name = "llamacpp"

    def __init__(self, gguf_path: Path, *, n_ctx: int, gpu_offload: bool, n_threads: int | None = None,
                 scoring: bool = False, mmproj: Path | None = None) -> None:
        import llama_cpp  # optional at import time of jarvis_prime; installed by default

        if gpu_offload and not llama_cpp.llama_supports_gpu_offload():
            raise BackendUnavailableError(
                "this llama-cpp-python build has no GPU offload (Metal/CUDA); "
                "use device='cpu' or reinstall llama-cpp-python with GPU support"
            )
        self._llm = open_llama(
            gguf_path,
            n_ctx=n_ctx,
            n_gpu_layers=-1 if gpu_offload else 0,
            n_threads=n_threads or os.cpu_count(),
            logits_all=scoring,  # every position's logits, for token_logprobs (n_ctx x vocab floats)
            verbose=False,
        )
        self.scoring = scoring
        self._vision = self._open_projector(mmproj, gpu_offload) if mmproj is not None else None
        # The mtmd context is shared: tokenizing an image prompt (encode_chat, any thread)
        # waits for an image being encoded into the KV cache, and the other way round.
        self._media_lock = threading.Lock()
        self.bos_token = self._token_text(self._llm.token_bos())
        self.eos_token = self._token_text(self._llm.token_eos())

    def _open_projector(self, mmproj: Path, gpu_offload: bool):
        """The projector, opened now: a text vocabulary without the image tokens fails the load
        (MediaTokenError), not the first image question."""
        from jarvis_prime.models.mtmd import vision_chat_handler

        handler = vision_chat_handler(mmproj, use_gpu=gpu_offload)
        try:
            handler._init_mtmd_context(self._llm)
        except BaseException:
            self._llm.close()
            raise
        return handler

    @property
    def sees_images(self) -> bool:
        return self._vision is not None

    @property
    def image_part(self) -> dict[str, str]:
        """What an image part becomes before the chat template: libmtmd's marker as text."""
        import llama_cpp.mtmd_cpp as mtmd

        return {"type": "text", "text": mtmd.mtmd_default_marker().decode("utf-8")}

    def tokenize_media(self, media: Media) -> list[int]:
        from jarvis_prime.models.mtmd import media_ids

        with self._media_lock:
            return media_ids(self._vision, media.text, media.images)

    def _token_text(self, token_id: int) -> str:
        if token_id < 0:
            return ""
        return self._llm.detokenize([token_id], special=True).decode("utf-8", errors="replace")

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        # `add_bos` is llama.cpp's "add special tokens": the model's own metadata decides.
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)

    def _sampling_args(self, params: GenerationParams) -> dict:
        """What `create_completion` and `generate` both take, meaning what GenerationParams says."""
        grammar = None
        if params.grammar is not None:
            from llama_cpp import LlamaGrammar

            grammar = LlamaGrammar.from_string(params.grammar, verbose=False)
        return dict(top_p=params.top_p, top_k=params.top_k, min_p=0.0, repeat_penalty=1.0,
                    presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                    grammar=grammar)

    def _completion_args(self, prompt_ids: Sequence[int], params: GenerationParams) -> dict:
        return dict(
            prompt=list(prompt_ids),
            max_tokens=params.max_new_tokens,
            temperature=params.temperature,
            stop=list(params.stop),
            seed=params.seed,
            **self._sampling_args(params),
        )

    def _prompt(self, prompt_ids: Sequence[int], media: Media | None) -> Sequence[int]:
        """The ids `create_completion` decodes: with images, the prompt is first decoded here
        (mtmd), and the returned ids are all in the cache, so sampling starts at once."""
        if media is None:
            return prompt_ids
        from jarvis_prime.models.mtmd import evaluate_media

        with self._media_lock:
            return evaluate_media(self._vision, self._llm, media.text, media.images)

    def generate(self, prompt_ids: Sequence[int], params: GenerationParams, media: Media | None = None) -> Generation:
        prompt_ids = self._prompt(prompt_ids, media)
        if params.logprobs is not None:
            text, finish, logprobs = collect(list(self._decode_with_logprobs(prompt_ids, params)), logprobs=True)
            return Generation(text, finish, len(prompt_ids), len(logprobs), logprobs=logprobs)
        result = self._llm.create_completion(**self._completion_args(prompt_ids, params))
        choice, usage = result["choices"][0], result["usage"]
        return Generation(
            text=choice["text"],
            finish_reason=choice["finish_reason"] or "stop",
            prompt_tokens=usage["prompt_tokens"],
            completion_tokens=usage["completion_tokens"],
        )

    def stream(self, prompt_ids: Sequence[int], params: GenerationParams, media: Media | None = None) -> Iterator[Chunk]:
        prompt_ids = self._prompt(prompt_ids, media)
        if params.logprobs is not None:
            yield from self._decode_with_logprobs(prompt_ids, params)
            return
        for part in self._llm.create_completion(**self._completion_args(prompt_ids, params), stream=True):
            choice = part["choices"][0]
            yield Chunk(text=choice["text"], finish_reason=choice["finish_reason"])

    def _decode_with_logprobs(self, prompt_ids: Sequence[int], params: GenerationParams) -> Iterator[Chunk]:
        """Decode token by token, each token's Chunk carrying its TokenLogprob (from the raw
        logits, before penalties, grammar and sampling filters); stops, limits and the seed
        as `create_completion` applies them."""
        import llama_cpp
        import numpy as np

        seen: list[np.ndarray] = []

        def capture(_input_ids, logits):  # the step's logits in token-id order, untouched
            seen[:] = [np.array(logits, dtype=np.float64)]
            return logits

        if params.seed is not None:
            self._llm.set_seed(params.seed)
        vocab = self._llm._model.vocab
        text_of = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops, count, finish = StopStringFilter(params.stop), 0, "length"
        tokens = self._llm.generate(list(prompt_ids), temp=params.temperature,
                                    logits_processor=llama_cpp.LogitsProcessorList([capture]),
                                    **self._sampling_args(params))
        for token in tokens:
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                finish = "stop"
                break
            count += 1
            logprob = TokenLogprob.from_logits(seen[0], token, params.logprobs, self._piece)
            piece = stops.feed(text_of.decode(self._llm.detokenize([token])))
            if stops.stopped:
                yield Chunk(piece, "stop", logprobs=(logprob,))
                return
            if count >= params.max_new_tokens:
                yield Chunk(piece + stops.flush(), "length", logprobs=(logprob,))
                return
            yield Chunk(piece, logprobs=(logprob,))
        yield Chunk(stops.flush() + text_of.decode(b"", final=True), finish)

    def _piece(self, token: int) -> str:
        return self._llm.detokenize([token], special=True).decode("utf-8", errors="replace")

    def token_logprobs(self, ids: Sequence[int]) -> list[float]:
        import numpy as np

        if not self.scoring:
            raise RuntimeError("token_logprobs needs a backend loaded with scoring=True")
        self._llm.reset()
        self._llm.eval(list(ids))
        logits = np.asarray(self._llm.scores[: len(ids) - 1], dtype=np.float64)
        top = logits.max(axis=-1, keepdims=True)
        logz = top[:, 0] + np.log(np.exp(logits - top).sum(axis=-1))
        return (logits[np.arange(len(ids) - 1), list(ids[1:])] - logz).tolist()

    def batcher(self, lock: threading.Lock, slots: int, n_ctx_per_slot: int, on_batch=None):
        """A `ContinuousBatcher` on these weights (models/llamacpp_batching.py): concurrent
        text requests decoded together; this backend's own context stays for single calls."""
        from jarvis_prime.models.llamacpp_batching import ContinuousBatcher

        return ContinuousBatcher(self._llm, lock, slots, n_ctx_per_slot, on_batch=on_batch)

    def close(self) -> None:
        self._llm.close()
