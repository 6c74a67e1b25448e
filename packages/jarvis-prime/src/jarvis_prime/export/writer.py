"""`export_gguf` and the Hugging Face -> GGUF writer.

The `gguf` package writes the full-precision file from the model's safetensors (no
llama.cpp checkout, no convert script): hyperparameters, the tokenizer (`tokenizer.py`),
the chat template and the weights, renamed to llama.cpp's tensor names; `quantize.py`
derives the quantized files from it. Vision models (Idefics3 / SmolVLM) take llama.cpp's
own converter instead (`converter.py`), for the text GGUF and the projector. Everything is built in a hidden folder and moved
into the model directory, then recorded in prime.json, under the directory's lock.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jarvis_prime.errors import ExportError
from jarvis_prime.export.converter import convert_hf, converter_view
from jarvis_prime.export.modelfile import write_modelfile
from jarvis_prime.export.quantize import quantize_files
from jarvis_prime.export.tokenizer import add_tokenizer
from jarvis_prime.gguf_names import (
    FILE_TYPES,
    SUPPORTED_ARCHITECTURES,
    VISION_ARCHITECTURES,
    gguf_filename,
    mmproj_filename,
)
from jarvis_prime.manifest import (
    PrimeManifest,
    Quantization,
    inside,
    quant_bits,
    read_manifest,
    refuse_unlisted_weights,
    store_lock,
    verify_files,
    write_manifest,
)
from jarvis_prime.progress import Log

DEFAULT_QUANTS = ("f16", "q8_0", "q4_k_m")


def export_gguf(
    model_dir: Path,
    quants: list[str] | tuple[str, ...] = DEFAULT_QUANTS,
    *,
    force: bool = False,
    tokenizer_pre: str | None = None,
    imatrix: bool = True,
    progress: bool = True,
    log: Log = lambda message: None,
) -> PrimeManifest:
    """Write the requested GGUF files into `model_dir/gguf/` and record them in prime.json.

    Quantizations already present are kept unless `force`. Files are built in a
    hidden folder and moved into place only when all of them exist, and prime.json is
    rewritten atomically last, so an interrupted export leaves the model as it was.
    With `imatrix`, the IMPORTANCE_QUANTS are rounded with an importance matrix measured
    on calibration text (`export.imatrix`; needs the transformers extra, else
    they are rounded plainly and the log says so).

    A vision model (Idefics3 / SmolVLM) goes through llama.cpp's own converter
    (`export.converter`): its text GGUF in f16, quantized from there like any other, and
    its projector (mmproj) in f16 and q8_0; every text GGUF records the projector it runs
    with (`projector_quant`).
    """
    model_dir = Path(model_dir)
    with store_lock(model_dir):
        return write_ggufs(model_dir, read_manifest(model_dir), quants, force=force, tokenizer_pre=tokenizer_pre,
                           imatrix=imatrix, progress=progress, log=log)


def projector_quant(quant: str) -> str:
    """The mmproj a vision model's text GGUF runs with: f16 beside f16/f32 text, q8_0 beside
    8 bits and below (the projector is small; q8_0 keeps it close to f16 at half the size)."""
    return "f16" if quant_bits(quant) >= 16 else "q8_0"


def write_ggufs(
    model_dir: Path,
    manifest: PrimeManifest,
    quants: list[str] | tuple[str, ...] = DEFAULT_QUANTS,
    *,
    force: bool = False,
    tokenizer_pre: str | None = None,
    imatrix: bool = True,
    progress: bool = True,
    log: Log = lambda message: None,
) -> PrimeManifest:
    """`export_gguf` without the lock: for a caller that holds it or owns the folder (a
    store builder's staging folder). Returns the manifest it wrote."""
    unknown = [q for q in quants if q not in FILE_TYPES]
    if unknown:
        raise ExportError(f"unknown GGUF quantization {unknown[0]!r}; choose from {', '.join(FILE_TYPES)}")
    todo = [q for q in dict.fromkeys(quants) if force or q not in manifest.quantizations]
    if not todo:
        log(f"{manifest.name}: {', '.join(quants)} already exported")
        return manifest
    config = _check_exportable(model_dir, manifest)
    vision = config.get("model_type") in VISION_ARCHITECTURES
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=model_dir))
    projectors: dict[str, str] = {}  # projector quant -> file written
    try:
        base_quant = "f32" if todo == ["f32"] else "f16"
        base = staging / f"{manifest.name}-{base_quant}.gguf"
        if vision:
            view = converter_view(model_dir, _top_level_files(manifest), staging / "hf")
            convert_hf(view, base, base_quant, label=manifest.name, log=log)
        else:
            log(f"writing {base_quant} GGUF with the gguf package")
            _write_base(model_dir, manifest, config, base, base_quant, tokenizer_pre, progress)
        targets = {q: staging / f"{manifest.name}-{q}.gguf" for q in todo if q != base_quant}
        imatrix_records = quantize_files(base, targets, model_dir if imatrix else None, progress=progress, log=log)
        if vision:
            for pquant in sorted({projector_quant(q) for q in todo}):
                rel = mmproj_filename(manifest.name, pquant)
                if force or rel not in manifest.files:
                    convert_hf(view, staging / Path(rel).name, pquant, mmproj=True, label=manifest.name, log=log)
                    projectors[pquant] = rel
        (model_dir / "gguf").mkdir(exist_ok=True)
        quantizations = dict(manifest.quantizations)
        for quant in todo:
            rel = gguf_filename(manifest.name, quant)
            inside(model_dir / "gguf", model_dir / rel, "name")
            os.replace(staging / f"{manifest.name}-{quant}.gguf", model_dir / rel)
            quantizations[quant] = Quantization(
                file=rel, format="gguf", bits=quant_bits(quant), importance=imatrix_records.get(quant),
                mmproj=mmproj_filename(manifest.name, projector_quant(quant)) if vision else None)
        for rel in projectors.values():
            os.replace(staging / Path(rel).name, inside(model_dir / "gguf", model_dir / rel, "name"))
        write_modelfile(model_dir, manifest, quantizations)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log("hashing files (sha256)")
    written = [quantizations[quant].file for quant in todo] + list(projectors.values()) + ["gguf/Modelfile"]
    return write_manifest(model_dir, manifest.model_copy(update={"quantizations": quantizations}), changed=written)


def _top_level_files(manifest: PrimeManifest) -> list[str]:
    """The Hugging Face files of a PRIME directory: every listed file outside gguf/ and adapter/."""
    return [rel for rel in manifest.files if "/" not in rel]


def _check_exportable(model_dir: Path, manifest: PrimeManifest) -> dict[str, Any]:
    weights = [rel for rel in manifest.files if rel.endswith(".safetensors") and "/" not in rel]
    if not weights or "config.json" not in manifest.files:
        raise ExportError(f"{model_dir}: no Hugging Face weights (config.json + *.safetensors) to export from")
    config = json.loads((model_dir / "config.json").read_text())
    arch = config.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES + VISION_ARCHITECTURES:
        raise ExportError(f"{manifest.name}: architecture {arch!r} has no GGUF exporter here; "
                          f"supported: {', '.join(SUPPORTED_ARCHITECTURES + VISION_ARCHITECTURES)}")
    if arch not in VISION_ARCHITECTURES and config.get("rope_scaling"):  # llama.cpp's converter handles it
        raise ExportError(f"{manifest.name}: rope_scaling {config['rope_scaling']} is not supported by this exporter")
    if "tokenizer.json" not in manifest.files:
        raise ExportError(f"{model_dir}: no tokenizer.json; the GGUF must carry the tokenizer")
    if arch in VISION_ARCHITECTURES and "preprocessor_config.json" not in manifest.files:
        raise ExportError(f"{model_dir}: a vision model needs preprocessor_config.json (the projector's image size "
                          "comes from it); pull the model again with every processor file")
    refuse_unlisted_weights(model_dir, manifest)  # every top-level *.safetensors is read below
    # what the writer or the converter reads: the weights, config and tokenizer (all HF files for the converter)
    verify_files(model_dir, manifest, _top_level_files(manifest) if arch in VISION_ARCHITECTURES
                 else ["config.json", "tokenizer.json", *weights])
    return config


# -- the full-precision file ---------------------------------------------------------------


def _write_base(model_dir: Path, manifest: PrimeManifest, config: dict[str, Any], out: Path, quant: str,
                tokenizer_pre: str | None, progress: bool) -> None:
    import gguf

    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    head_dim = config.get("head_dim") or config["hidden_size"] // n_head
    writer = gguf.GGUFWriter(out, arch="llama")
    writer.add_name(manifest.name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(FILE_TYPES[quant])
    add_tokenizer(writer, model_dir, manifest, config["vocab_size"], tokenizer_pre)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    tied = config.get("tie_word_embeddings", False)
    for hf_name, tensor in _safetensors(model_dir):
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd as the output layer
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"{manifest.name}: tensor {hf_name} has no llama.cpp name")
        if hf_name.endswith("q_proj.weight"):
            tensor = unpermute_rope(tensor, n_head)
        elif hf_name.endswith("k_proj.weight"):
            tensor = unpermute_rope(tensor, n_kv)
        # norms stay float32, as llama.cpp's converter keeps 1-D tensors
        dtype = np.float16 if quant == "f16" and tensor.ndim >= 2 else np.float32
        writer.add_tensor(name, tensor.astype(dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=progress)
    writer.close()


def _rope_theta(config: dict[str, Any]) -> float:
    if "rope_theta" in config:
        return float(config["rope_theta"])
    params = config.get("rope_parameters") or {}  # transformers 5 moved it here
    return float(params.get("rope_theta", 10000.0))


def unpermute_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """transformers stores q/k rows rotate-half style; llama.cpp expects the original
    interleaved layout (the inverse of transformers' conversion script's permute)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _safetensors(model_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor of the model's safetensors as float32 numpy, one at a time.

    numpy reads float32/float16 files without torch; bfloat16 (which numpy lacks)
    is widened through torch, which such checkpoints' users have installed anyway.
    """
    from safetensors import safe_open

    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="numpy") as f:
            bf16 = any(f.get_slice(key).get_dtype() == "BF16" for key in f.keys())
        with safe_open(file, framework="pt" if bf16 else "numpy") as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                yield key, (tensor.float().numpy() if bf16 else tensor.astype(np.float32))
