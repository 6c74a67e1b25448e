"""Importance matrices for 4-bit GGUF exports (what `llama-quantize --imatrix` uses).

Rounding a weight to 4 bits costs the most where the layer's inputs are large. Given,
per input column, the mean squared activation a layer sees on calibration text,
llama.cpp's quantizers pick each block's scale (and k-quant minimums) to minimise the
rounding error weighted by it instead of the plain error. On prime-135m-chat-v1 this
takes q4_k_m from 1.113x to about 1.04x the f16 perplexity, at the same file size.

The activations come from the transformers model (the `[transformers]` extra), with a
forward hook on every linear layer, over calibration text shipped with the package
(`quant_data/calibration.txt`, disjoint from the held-out evaluation text) plus the
JARVIS prompts rendered through the model's own chat template, the format it serves.

llama-cpp-python's `llama_model_quantize` takes an imatrix only as a C++ map pointer,
which ctypes cannot build, so `round_with_importance` keeps the tensor types llama.cpp
chose for the quantization (its q4_k_m mix) and rounds every tensor again through
`ggml_quantize_chunk`, the C function llama-quantize calls with the matrix.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from jarvis_prime.export.metadata import copy_metadata
from jarvis_prime.files import atomic_path
from jarvis_prime.gguf_names import VISION_ARCHITECTURES
from jarvis_prime.persona import load_prompts

CHUNK_TOKENS = 512


@dataclass
class ImportanceMatrix:
    """Per GGUF tensor name, the mean squared input activation of each column."""

    columns: dict[str, np.ndarray]
    tokens: int
    calibration_sha256: str

    def record(self) -> dict[str, Any]:
        """What prime.json keeps about it: enough to tell two exports apart."""
        return {"method": "imatrix", "calibration": "quant_data/calibration.txt + JARVIS prompts (chat template)",
                "calibration_sha256": self.calibration_sha256, "tokens": self.tokens}


def calibration_texts(tokenizer) -> list[str]:
    """The package's calibration prose, then every JARVIS prompt as the chat template renders it."""
    prose = resources.files("jarvis_prime").joinpath("quant_data", "calibration.txt").read_text(encoding="utf-8")
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=False,
                                           add_generation_prompt=True) for p in load_prompts()]
    return [prose, "".join(chats)]


def importance_matrix(model_dir: Path, *, arch: str, progress: bool = True) -> ImportanceMatrix:
    """Run the model over the calibration text and average each linear layer's squared inputs,
    keyed by the tensor names llama.cpp gives them in a GGUF of architecture `arch` (the
    converted file's `general.architecture`: llama, qwen2, gemma2, phi3, ...).

    Raises ImportError without torch/transformers (the caller decides what to do), ValueError
    for an architecture the gguf package has no tensor names for.
    """
    import gguf
    import torch
    from rich.progress import Progress
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # A vision model (Idefics3 / SmolVLM): its text model is what the text GGUF holds; it runs
    # on text alone, and only its layers (`model.text_model.*`, `lm_head`) are hooked.
    vision = AutoConfig.from_pretrained(model_dir).model_type in VISION_ARCHITECTURES
    auto = AutoModelForImageTextToText if vision else AutoModelForCausalLM
    # The checkpoint's own dtype: a bf16 7B model needs 14 GB here, not 28; squares are summed in float64.
    model = auto.from_pretrained(model_dir, dtype="auto").to(device).eval()
    text_config = model.config.text_config if vision else model.config
    names = gguf.get_tensor_name_map(gguf_arch(arch), text_config.num_hidden_layers)
    tied = text_config.tie_word_embeddings if vision else model.config.tie_word_embeddings
    output = "token_embd.weight" if tied else "output.weight"

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def accumulate(name: str):
        def hook(module, inputs, _output) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    hooks = []
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if vision and module_name != "lm_head" and ".text_model." not in module_name:
                continue  # the image encoder and connector: the projector GGUF, not quantized here
            module_name = module_name.replace("text_model.", "")  # as llama.cpp's converter renames them
            name = output if module_name == "lm_head" else names.get_name(module_name + ".weight",
                                                                          try_suffixes=(".weight",))
            if name is not None:
                hooks.append(module.register_forward_hook(accumulate(name)))

    texts = calibration_texts(tokenizer)
    chunks = [ids[start:start + CHUNK_TOKENS]
              for ids in (tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts)
              for start in range(0, len(ids), CHUNK_TOKENS)]
    try:
        with torch.no_grad(), Progress(disable=not progress) as bar:
            task = bar.add_task("importance matrix", total=len(chunks))
            for chunk in chunks:
                model(torch.tensor([chunk], device=device))
                bar.advance(task)
    finally:
        for hook in hooks:
            hook.remove()
    digest = hashlib.sha256("\0".join(texts).encode("utf-8")).hexdigest()
    columns = {name: (total / counts[name]).float().cpu().numpy() for name, total in sums.items()}
    return ImportanceMatrix(columns, sum(len(c) for c in chunks), digest)


def gguf_arch(name: str):
    """The gguf package's MODEL_ARCH for a GGUF's `general.architecture` string."""
    import gguf

    for arch, arch_name in gguf.MODEL_ARCH_NAMES.items():
        if arch_name == name:
            return arch
    raise ValueError(f"the gguf package has no tensor names for architecture {name!r}")


def round_with_importance(source: Path, typed: Path, importance: ImportanceMatrix,
                          threads: int | None = None) -> None:
    """Rewrite `typed` (a llama.cpp quantization of `source`): same metadata, same tensor
    types, each quantized tensor rounded again from `source`'s weights with `importance`.

    Tensors are written as they are rounded (one in memory at a time), into a temporary
    file that replaces `typed` only when complete (`files.atomic_path`), with `typed`'s file mode.
    """
    import gguf

    quantize_chunk = _ggml_quantize_chunk()
    weights = {tensor.name: tensor for tensor in gguf.GGUFReader(source).tensors}
    reader = gguf.GGUFReader(typed)
    threads = threads or os.cpu_count() or 1
    with atomic_path(typed, mode=stat.S_IMODE(typed.stat().st_mode)) as tmp:
        writer = gguf.GGUFWriter(tmp, arch=reader.fields["general.architecture"].contents())
        try:
            copy_metadata(reader, writer)
            writer.add_string("quantize.imatrix.dataset", importance.record()["calibration"])
            writer.add_int32("quantize.imatrix.entries_count", len(importance.columns))
            writer.add_int32("quantize.imatrix.chunks_count", -(-importance.tokens // CHUNK_TOKENS))
            for tensor in reader.tensors:
                writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.n_bytes,
                                       raw_dtype=tensor.tensor_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            with ThreadPoolExecutor(threads) as pool:
                for tensor in reader.tensors:
                    if tensor.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                        writer.write_tensor_data(tensor.data)  # norms and the like: nothing to round
                        continue
                    src = weights[tensor.name]
                    shape = tuple(reversed([int(n) for n in src.shape]))  # GGUF lists dimensions innermost first
                    full = gguf.quants.dequantize(src.data, src.tensor_type).reshape(shape)
                    writer.write_tensor_data(_round(quantize_chunk, pool, threads, full, tensor.tensor_type,
                                                    importance.columns.get(tensor.name), tensor.name))
        finally:
            writer.close()


def _round(quantize_chunk, pool: ThreadPoolExecutor, threads: int, weights: np.ndarray, kind,
           columns: np.ndarray | None, name: str) -> np.ndarray:
    """One tensor in llama.cpp's `kind` blocks, rows split over the pool's threads
    (ctypes releases the GIL for the call).

    ggml aborts the process on a bad argument instead of raising, so everything it
    asserts is checked here first.
    """
    import gguf

    weights = np.ascontiguousarray(weights.reshape(-1, weights.shape[-1]), dtype=np.float32)
    rows, per_row = weights.shape
    block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    if per_row % block:
        raise ValueError(f"{name}: rows of {per_row} values do not split into {kind.name} blocks of {block}")
    matrix = None
    if columns is not None:
        matrix = np.ascontiguousarray(columns, dtype=np.float32)
        if matrix.shape != (per_row,) or not np.isfinite(matrix).all():
            raise ValueError(f"{name}: importance vector of shape {matrix.shape} (finite: "
                             f"{bool(np.isfinite(matrix).all())}) for rows of {per_row} values")
    out = np.zeros((rows, per_row // block * block_bytes), dtype=np.uint8)
    pointer = None if matrix is None else matrix.ctypes.data
    step = max(1, -(-rows // (threads * 4)))
    jobs = [pool.submit(quantize_chunk, int(kind), weights.ctypes.data, out.ctypes.data, start * per_row,
                        min(step, rows - start), per_row, pointer) for start in range(0, rows, step)]
    for job in jobs:
        job.result()
    return out


@cache
def _ggml_quantize_chunk():
    """`ggml_quantize_chunk` from the ggml library llama-cpp-python ships."""
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(lib_dir.glob("*ggml-base.*")) + sorted(lib_dir.glob("*ggml.*"))
    if not candidates:
        raise OSError(f"no ggml library in {lib_dir}")
    lib = ctypes.CDLL(str(candidates[0]))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    return fn  # it builds the lookup tables a type needs on first use, under ggml's own lock
