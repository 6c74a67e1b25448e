"""`export_gguf`: a PRIME model's GGUF files, written and recorded in its prime.json.

llama.cpp's own converter (`converter.py`) writes the full-precision file from the model's
verified files, for every architecture it converts (llama with a SentencePiece-style or a
byte-level BPE tokenizer, mistral, qwen2/3, gemma2/3, phi3, ...; Idefics3 / SmolVLM's text
model and projector), with PRIME's chat template and end-of-turn token in its metadata.
`quantize.py` derives the quantized files from it (4-6 bits rounded with an importance
matrix). Everything is built in a hidden folder and moved into the model directory, then
recorded in prime.json, under the directory's lock.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from jarvis_prime.errors import ExportError
from jarvis_prime.export.converter import (
    convert_hf,
    converter_architectures,
    converter_view,
    find_converter,
    text_architecture,
)
from jarvis_prime.export.modelfile import write_modelfile
from jarvis_prime.export.quantize import quantize_files
from jarvis_prime.gguf_names import (
    FILE_TYPES,
    TESTED_ARCHITECTURES,
    VISION_ARCHITECTURES,
    gguf_filename,
    mmproj_filename,
)
from jarvis_prime.manifest import (
    PrimeManifest,
    Quantization,
    hf_files,
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
    they are rounded plainly and the log says so). `tokenizer_pre` names llama.cpp's
    pre-tokenizer for a byte-level BPE tokenizer its converter does not recognise.

    llama.cpp's converter (`export.converter`) writes the f16 (or f32) file, quantized from
    there. A vision model (Idefics3 / SmolVLM) also gets its projector (mmproj) in f16 and
    q8_0; every text GGUF records the projector it runs with (`projector_quant`).
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
        view = converter_view(model_dir, hf_files(manifest), staging / "hf")
        convert_hf(view, base, base_quant, label=manifest.name, special_tokens=end_of_turn(model_dir, manifest),
                   tokenizer_pre=tokenizer_pre, log=log)
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


def _check_exportable(model_dir: Path, manifest: PrimeManifest) -> dict[str, Any]:
    """config.json, after checking everything the converter will need is here and verified;
    ExportError naming what is missing, or the architecture llama.cpp's converter does not know."""
    weights = [rel for rel in manifest.files if rel.endswith(".safetensors") and "/" not in rel]
    if not weights or "config.json" not in manifest.files:
        raise ExportError(f"{model_dir}: no Hugging Face weights (config.json + *.safetensors) to export from")
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    converter = find_converter()  # before anything is written: says how to get one
    arch = text_architecture(config)
    known = converter_architectures(converter)
    if not arch or (known and arch[0] not in known):
        named = f"architecture {arch[0]!r}" if arch else "no architecture (config.json `architectures`)"
        raise ExportError(
            f"{manifest.name}: config.json names {named}, which llama.cpp's converter ({converter}) does not "
            f"convert to GGUF; tested here (model_type): {', '.join(TESTED_ARCHITECTURES + VISION_ARCHITECTURES)}; "
            f"`python {converter} --print-supported-models` lists all {len(known)} it converts")
    if "tokenizer.json" not in manifest.files and "tokenizer.model" not in manifest.files:
        raise ExportError(f"{model_dir}: no tokenizer.json or tokenizer.model; the GGUF must carry the tokenizer")
    if config.get("model_type") in VISION_ARCHITECTURES and "preprocessor_config.json" not in manifest.files:
        raise ExportError(f"{model_dir}: a vision model needs preprocessor_config.json (the projector's image size "
                          "comes from it); pull the model again with every processor file")
    refuse_unlisted_weights(model_dir, manifest)  # every top-level *.safetensors is read by the converter
    verify_files(model_dir, manifest, hf_files(manifest))  # all the converter's view links to
    return config


def end_of_turn(model_dir: Path, manifest: PrimeManifest) -> dict[str, int]:
    """{"eot": id} for the GGUF when the first of prime.json's stop strings that is one added token
    is not the tokenizer's EOS (llama.cpp then stops there too, in every tool that reads the file);
    {} when EOS already is the stop token, or the stop is not one token."""
    spec = _json(model_dir / "tokenizer.json")
    added = {token["content"]: token["id"] for token in spec.get("added_tokens", [])}
    stop = next((added[s] for s in manifest.stop if s in added), None)
    if stop is None:
        return {}
    eos = _json(model_dir / "tokenizer_config.json").get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    eos_ids = {added.get(eos)}
    config_eos = _json(model_dir / "config.json").get("eos_token_id")
    eos_ids |= set(config_eos) if isinstance(config_eos, list) else {config_eos}
    return {} if stop in eos_ids else {"eot": stop}


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
