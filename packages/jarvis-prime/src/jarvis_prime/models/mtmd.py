"""Images through llama.cpp's multimodal library (libmtmd) and llama-cpp-python's MTMDChatHandler.

mtmd puts text tokens around every image it tokenizes (llama.cpp tools/mtmd/mtmd.cpp, the
`mtmd_context` constructor: `tok_ov_img_start = {lookup_token("\\n\\n"),
lookup_token("<fake_token_around_image>"), lookup_token("<global-img>")}` for IDEFICS3 /
SmolVLM). `lookup_token` searches the *text* model's vocabulary for a token whose piece is
exactly that string and, when there is none, returns LLAMA_TOKEN_NULL (-1) without a word.
The -1 then sits in a text chunk and fails far from its cause:

* MTMDChatHandler evaluates text chunks with `Llama.eval`; llama.cpp's `llama_batch_compat`
  reads id -1 as "no token", so that entry has neither token nor embedding while its
  neighbours have tokens: `llama_decode` -1, "all entries in the batch must have the same
  content types" (src/llama-batch.cpp, llama_batch_allocr::init).
* `mtmd_helper_eval_chunks` adds it with `llama_batch_ext_add_token`, which refuses id -1
  (returns -2) and aborts the process: `GGML_ASSERT(idx >= 0)` (tools/mtmd/mtmd-helper.cpp).

The ctypes bindings are not at fault (llama_batch, mtmd_context_params, mtmd_input_text and
the mtmd_helper_eval_* signatures match the vendored headers of llama-cpp-python 0.3.36).
The fix belongs in the model: its tokenizer must hold the tokens the projector brackets
images with, as every released SmolVLM / Idefics3 tokenizer does (added special tokens).
`VisionChatHandler` checks that when it opens the projector and says which tokens are
missing, instead of failing on the first image.
"""

from __future__ import annotations

import ctypes
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from jarvis_prime.errors import ImageInputError, PrimeError
from jarvis_prime.idefics3 import IDEFICS3_SPECIAL_TOKENS
from jarvis_prime.models.content import EncodedImage

LLAMA_TOKEN_NULL = -1

# The text pieces mtmd.cpp looks up in the text model's vocabulary per projector type
# (llama.cpp vendored by llama-cpp-python 0.3.36). Used to name what is missing; the check
# itself tokenizes a probe image, so it covers projector types not listed here too.
MEDIA_TOKENS: dict[str, tuple[str, ...]] = {
    "idefics3": ("\n\n", "<fake_token_around_image>", "<global-img>", "\n"),
}


class MediaTokenError(PrimeError, ValueError):
    """A text model whose vocabulary lacks the tokens its projector puts around images."""


def projector_type(mmproj_path: str | Path) -> str | None:
    """`clip.projector_type` of an mmproj GGUF ("idefics3", "gemma3", ...), or None."""
    try:
        import gguf

        field = gguf.GGUFReader(str(mmproj_path)).fields.get("clip.projector_type")
        return None if field is None else str(field.contents())
    except Exception:  # noqa: BLE001 - only used to word an error message
        return None


@contextmanager
def tokenized(mtmd_ctx: Any, text: str, bitmaps: list[Any]) -> Iterator[Any]:
    """The mtmd input chunks of `text` (one media marker per bitmap), freed on exit."""
    import llama_cpp.mtmd_cpp as mtmd

    data = text.encode("utf-8")
    inp = mtmd.mtmd_input_text()
    inp.text, inp.text_len, inp.add_special, inp.parse_special = data, len(data), True, True
    chunks = mtmd.mtmd_input_chunks_init()
    try:
        array = (mtmd.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
        rc = mtmd.mtmd_tokenize(mtmd_ctx, chunks, ctypes.byref(inp), array, len(bitmaps))
        if rc == 1:
            raise ImageInputError(f"the prompt has {text.count(mtmd.mtmd_default_marker().decode())} image "
                                  f"marker(s) for {len(bitmaps)} image(s)")
        if rc != 0:
            raise MediaTokenError(f"mtmd_tokenize failed with {rc}")
        yield chunks
    finally:
        mtmd.mtmd_input_chunks_free(chunks)


def chunk_list(chunks: Any) -> list[tuple[Any, list[int] | None]]:
    """(chunk, its text token ids) for text chunks and (chunk, None) for image chunks, in order."""
    import llama_cpp.mtmd_cpp as mtmd

    out = []
    for i in range(mtmd.mtmd_input_chunks_size(chunks)):
        chunk = mtmd.mtmd_input_chunks_get(chunks, i)
        if mtmd.mtmd_input_chunk_get_type(chunk) != mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
            out.append((chunk, None))
            continue
        n = ctypes.c_size_t()
        tokens = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
        out.append((chunk, [tokens[j] for j in range(n.value)]))
    return out


def null_tokens(mtmd_ctx: Any, text: str, bitmaps: list[Any]) -> list[tuple[int, int]]:
    """(chunk, position) of every LLAMA_TOKEN_NULL in the text chunks mtmd makes of `text`."""
    with tokenized(mtmd_ctx, text, bitmaps) as chunks:
        return [(i, j) for i, (_, ids) in enumerate(chunk_list(chunks)) if ids is not None
                for j, token in enumerate(ids) if token == LLAMA_TOKEN_NULL]


def probe_image_tokens(mtmd_ctx: Any) -> list[tuple[int, int]]:
    """`null_tokens` for one grey 96x64 image (big enough to be sliced by tiling projectors)."""
    import llama_cpp.mtmd_cpp as mtmd

    width, height = 96, 64
    pixels = (ctypes.c_uint8 * (width * height * 3))(*([128] * (width * height * 3)))
    bitmap = mtmd.mtmd_bitmap_init(width, height, pixels)
    if not bitmap:
        raise MediaTokenError("mtmd_bitmap_init failed")
    try:
        return null_tokens(mtmd_ctx, mtmd.mtmd_default_marker().decode(), [bitmap])
    finally:
        mtmd.mtmd_bitmap_free(bitmap)


def missing_vocab_pieces(llama: Any, pieces: tuple[str, ...]) -> list[str]:
    """The pieces no single token of `llama`'s vocabulary renders exactly (mtmd's lookup_token)."""
    missing = []
    for piece in pieces:
        ids = llama.tokenize(piece.encode("utf-8"), add_bos=False, special=True)
        if len(ids) != 1 or llama.detokenize(ids, special=True) != piece.encode("utf-8"):
            missing.append(piece)
    return missing


def check_media_tokens(mtmd_ctx: Any, llama: Any, mmproj_path: str | Path,
                       nulls: list[tuple[int, int]] | None = None) -> None:
    """Raise MediaTokenError, naming the missing tokens, when an image would tokenize to -1s."""
    nulls = probe_image_tokens(mtmd_ctx) if nulls is None else nulls
    if not nulls:
        return
    kind = projector_type(mmproj_path) or "unknown"
    missing = missing_vocab_pieces(llama, MEDIA_TOKENS.get(kind, ()))
    named = ", ".join(repr(p) for p in missing) if missing else f"{len(nulls)} token(s)"
    hint = (f" Add {', '.join(IDEFICS3_SPECIAL_TOKENS[:3])} and the <row_R_col_C> tags to the tokenizer as "
            "special tokens (as SmolVLM's tokenizer has them) before converting the text model."
            if kind == "idefics3" else "")
    raise MediaTokenError(
        f"{Path(mmproj_path).name}: projector {kind!r} brackets images with text tokens the text model's "
        f"vocabulary lacks: {named}. llama.cpp would put LLAMA_TOKEN_NULL (-1) in their place and "
        f"llama_decode would fail ('all entries in the batch must have the same content types').{hint}")


def route_mtmd_logs() -> None:
    """Send libmtmd's log lines ("decoding image batch 1/1", ...) through llama-cpp-python's
    own log callback, which prints only what `Llama(verbose=...)` lets through; by default
    mtmd writes every image step to stderr, under a JARVIS answer."""
    import ctypes as c

    import llama_cpp.mtmd_cpp as mtmd
    from llama_cpp._logger import llama_log_callback

    mtmd.mtmd_log_set(llama_log_callback, c.c_void_p(0))
    mtmd.mtmd_helper_log_set(llama_log_callback, c.c_void_p(0))


def vision_chat_handler(clip_model_path: str | Path, *, verbose: bool = False, use_gpu: bool = False):
    """An MTMDChatHandler that checks the text model's media tokens when it first opens the projector."""
    from llama_cpp.llama_chat_format import MTMDChatHandler

    route_mtmd_logs()

    class VisionChatHandler(MTMDChatHandler):
        media_tokens_checked = False

        def _init_mtmd_context(self, llama_model):
            super()._init_mtmd_context(llama_model)
            if not self.media_tokens_checked:  # until it passes: every image chat is refused
                from llama_cpp._utils import suppress_stdout_stderr

                with suppress_stdout_stderr(disable=self.verbose):  # mtmd logs each tokenize step
                    nulls = probe_image_tokens(self.mtmd_ctx)
                if nulls:
                    check_media_tokens(self.mtmd_ctx, llama_model, self.clip_model_path, nulls=nulls)
                self.media_tokens_checked = True

    return VisionChatHandler(clip_model_path=str(clip_model_path), verbose=verbose, use_gpu=use_gpu)


# Prompt ids of image positions: never a real token, so llama-cpp-python's prefix cache
# never takes a later prompt's text for the image embeddings in the KV cache.
IMAGE_POSITION = LLAMA_TOKEN_NULL


@contextmanager
def bitmaps(handler: Any, images: Sequence[EncodedImage]) -> Iterator[list[Any]]:
    """mtmd bitmaps of `images` (decoded by llama.cpp's stb_image), freed on exit."""
    import llama_cpp.mtmd_cpp as mtmd

    with ExitStack() as stack:
        out = []
        for image in images:
            try:
                bitmap = handler._create_bitmap_from_bytes(image.data)
            except ValueError:
                raise ImageInputError(f"{image.where}: llama.cpp cannot decode this image "
                                      f"({len(image.data)} bytes; PNG, JPEG, GIF or BMP)") from None
            stack.callback(mtmd.mtmd_bitmap_free, bitmap)
            out.append(bitmap)
        yield out


def media_ids(handler: Any, text: str, images: Sequence[EncodedImage]) -> list[int]:
    """The prompt's token ids as llama.cpp will decode them, IMAGE_POSITION for each image
    embedding: what a caller counts against the context, without encoding any image."""
    import llama_cpp.mtmd_cpp as mtmd

    with bitmaps(handler, images) as maps, tokenized(handler.mtmd_ctx, text, maps) as chunks:
        return [token for chunk, ids in chunk_list(chunks)
                for token in (ids if ids is not None else [IMAGE_POSITION] * mtmd.mtmd_input_chunk_get_n_tokens(chunk))]


def evaluate_media(handler: Any, llama: Any, text: str, images: Sequence[EncodedImage]) -> list[int]:
    """Decode the prompt into `llama`'s KV cache, text chunks with `Llama.eval` and images
    with mtmd (encoder, projector, then their embeddings), as MTMDChatHandler does; returns
    the prompt ids to hand `create_completion`, which finds them all cached and samples.

    Image positions are set to IMAGE_POSITION in `llama.input_ids` (the handler leaves
    whatever was there, so a later text prompt could reuse image embeddings as its own text)."""
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    with bitmaps(handler, images) as maps, tokenized(handler.mtmd_ctx, text, maps) as chunks:
        listed = chunk_list(chunks)
        if listed and listed[-1][1] is None:  # the next token's logits come from a text chunk
            raise ValueError("a prompt must end with text after its last image (the chat template's generation prompt)")
        llama.reset()
        llama._ctx.kv_cache_clear()
        for chunk, ids in listed:
            n = len(ids) if ids is not None else mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            if llama.n_tokens + n > llama.n_ctx():
                raise ValueError(f"the prompt with its images ({llama.n_tokens + n}+ tokens) exceeds the context "
                                 f"length ({llama.n_ctx()})")
            if ids is not None:
                llama.eval(ids)
                continue
            start, new_n_past = llama.n_tokens, llama_cpp.llama_pos(0)
            rc = mtmd.mtmd_helper_eval_chunk_single(handler.mtmd_ctx, llama._ctx.ctx, chunk, llama_cpp.llama_pos(start),
                                                    llama_cpp.llama_seq_id(0), llama.n_batch, False,
                                                    ctypes.byref(new_n_past))
            if rc != 0:
                raise RuntimeError(f"llama.cpp failed to encode an image (mtmd error {rc})")
            llama.input_ids[start:new_n_past.value] = IMAGE_POSITION
            llama.n_tokens = new_n_past.value
        return llama.input_ids[: llama.n_tokens].tolist()
