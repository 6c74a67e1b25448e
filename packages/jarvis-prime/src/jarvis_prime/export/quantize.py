"""Quantized GGUF files from the full-precision one: llama.cpp's `llama_model_quantize`
through llama-cpp-python's C API (what `llama-quantize` runs), then, for the 4-6-bit
types, each tensor rounded again with the model's importance matrix (`export.imatrix`)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from pathlib import Path
from typing import Any

from jarvis_prime.errors import ExportError
from jarvis_prime.export.imatrix import importance_matrix, round_with_importance
from jarvis_prime.gguf_names import FILE_TYPES
from jarvis_prime.hardware import detect_libraries
from jarvis_prime.progress import Log, captured_stderr, log_tail

# Rounded with an importance matrix when one can be computed (q8_0 does not use it).
IMPORTANCE_QUANTS = ("q4_0", "q4_k_s", "q4_k_m", "q5_k_m", "q6_k")


def quantize_files(base: Path, targets: dict[str, Path], hf_dir: Path | None, *, progress: bool = True,
                   log: Log = lambda message: None) -> dict[str, dict[str, Any]]:
    """Quantize the full-precision GGUF `base` to each `targets` quant -> path with llama.cpp.

    When `hf_dir` (the same weights as Hugging Face safetensors) is given and torch and
    transformers are installed, the IMPORTANCE_QUANTS are then rounded again with the
    model's importance matrix. Returns, per quant rounded that way, the record of the
    matrix for prime.json.
    """
    matrix = None
    if hf_dir is not None and any(q in IMPORTANCE_QUANTS for q in targets):
        matrix = _importance_matrix(base, hf_dir, progress, log)
    records: dict[str, dict[str, Any]] = {}
    for quant, out in targets.items():
        log(f"quantizing to {quant} with llama.cpp")
        quantize(base, out, quant)
        if matrix is not None and quant in IMPORTANCE_QUANTS:
            log(f"rounding {quant} with the importance matrix")
            try:
                round_with_importance(base, out, matrix)
            except (OSError, ValueError, AttributeError) as err:  # no ggml library / symbol, or a bad matrix
                raise ExportError(f"could not round {quant} with the importance matrix: {err}") from err
            records[quant] = matrix.record()
    return records


def _importance_matrix(base: Path, hf_dir: Path, progress: bool, log: Log):
    """The importance matrix of the model (named as in the GGUF `base`), or None (and why) when
    transformers is missing or cannot run it."""
    if not detect_libraries().transformers:
        log("transformers is not installed: files below 8 bits are rounded without an importance matrix "
            "(pip install 'jarvis-prime[transformers]' for better 4-bit quality)")
        return None
    log("measuring the importance matrix on calibration text (transformers)")
    try:
        import gguf

        arch = gguf.GGUFReader(base).fields["general.architecture"].contents()
        matrix = importance_matrix(hf_dir, arch=arch, progress=progress)
    except (OSError, ValueError, RuntimeError) as err:  # a model transformers cannot run here, out of memory
        log(f"no importance matrix ({type(err).__name__}: {err}); rounding plainly")
        return None
    log(f"importance matrix: {len(matrix.columns)} tensors, {matrix.tokens} calibration tokens")
    return matrix


def quantize(src: Path, dst: Path, quant: str, threads: int | None = None) -> None:
    """`llama-quantize src dst quant` through llama-cpp-python's C API."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FILE_TYPES[quant]
    params.nthread = threads or os.cpu_count() or 1
    with captured_stderr() as captured, _llama_cpp_logs_on():  # every tensor logged: kept for the error
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        if rc != 0 or not dst.is_file():
            raise ExportError(f"llama.cpp could not quantize {src.name} to {quant} (code {rc}):\n{log_tail(captured())}")



@contextlib.contextmanager
def _llama_cpp_logs_on():
    """llama-cpp-python's log callback drops llama.cpp's messages once any `Llama(verbose=False)`
    has been made in the process (it sets the "llama-cpp-python" logger to ERROR); while the
    output is captured anyway, let them through so a failed quantize can say why."""
    logger = logging.getLogger("llama-cpp-python")
    level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.setLevel(level)
