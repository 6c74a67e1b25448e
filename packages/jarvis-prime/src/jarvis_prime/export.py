"""GGUF exports of a PRIME model: `prime export NAME --format gguf --quant f16,q8_0,q4_k_m`.

The `gguf` package writes the full-precision file from the model's safetensors (no
llama.cpp checkout, no convert script): hyperparameters, the tokenizer (vocabulary,
merges, token types, special ids, pre-tokenizer), the chat template and the weights,
renamed to llama.cpp's tensor names. llama-cpp-python's `llama_model_quantize` then
derives the quantized files (q8_0, k-quants) from it, as `llama-quantize` would.

Fine-tuned GGUFs that "speak gibberish" in other tools usually lost their chat
template or stop token on the way; here both come from the PRIME directory and are
embedded, and tests compare the export with the transformers model token by token.

Supported: llama-family architectures (llama, mistral) with byte-level BPE
tokenizers (SmolLM, Llama 3, Mistral Nemo style).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jarvis_prime.errors import PrimeError
from jarvis_prime.manifest import (
    PrimeManifest,
    Quantization,
    quant_bits,
    read_manifest,
    store_lock,
    verify_files,
    write_manifest,
)
from jarvis_prime.progress import Log

SUPPORTED_ARCHITECTURES = ("llama", "mistral")
# llama.cpp file types (enum llama_ftype) of the quantizations we export.
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q4_k_s": 14, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
DEFAULT_QUANTS = ("f16", "q8_0", "q4_k_m")
# Rounded with an importance matrix when one can be computed (q8_0 does not use it).
IMPORTANCE_QUANTS = ("q4_0", "q4_k_s", "q4_k_m", "q5_k_m", "q6_k")
# tokenizer.json pre-tokenizers -> llama.cpp's pre-tokenizer names, when no GGUF of the
# same tokenizer says which one the model was trained with.
_PRE_TOKENIZERS = {
    '{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true}': "gpt-2",
    '{"type":"Sequence","pretokenizers":[{"type":"Digits","individual_digits":true},'
    '{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true}]}': "smollm",
}



class ExportError(PrimeError):
    """A model this exporter cannot turn into GGUF, with what it does support."""


def gguf_filename(name: str, quant: str) -> str:
    return f"gguf/{name}-{quant}.gguf"


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
    on calibration text (`jarvis_prime.importance`; needs the transformers extra, else
    they are rounded plainly and the log says so).
    """
    unknown = [q for q in quants if q not in FILE_TYPES]
    if unknown:
        raise ExportError(f"unknown GGUF quantization {unknown[0]!r}; choose from {', '.join(FILE_TYPES)}")
    model_dir = Path(model_dir)
    with store_lock(model_dir):
        manifest = read_manifest(model_dir)
        todo = [q for q in dict.fromkeys(quants) if force or q not in manifest.quantizations]
        if not todo:
            log(f"{manifest.name}: {', '.join(quants)} already exported")
            return manifest
        config = _check_exportable(model_dir, manifest)
        staging = Path(tempfile.mkdtemp(prefix=".export-", dir=model_dir))
        try:
            base_quant = "f32" if todo == ["f32"] else "f16"
            base = staging / f"{manifest.name}-{base_quant}.gguf"
            log(f"writing {base_quant} GGUF with the gguf package")
            _write_base(model_dir, manifest, config, base, base_quant, tokenizer_pre, progress)
            targets = {q: staging / f"{manifest.name}-{q}.gguf" for q in todo if q != base_quant}
            imatrix_records = quantize_files(base, targets, model_dir if imatrix else None, progress=progress, log=log)
            (model_dir / "gguf").mkdir(exist_ok=True)
            quantizations = dict(manifest.quantizations)
            for quant in todo:
                rel = gguf_filename(manifest.name, quant)
                os.replace(staging / f"{manifest.name}-{quant}.gguf", model_dir / rel)
                quantizations[quant] = Quantization(file=rel, format="gguf", bits=quant_bits(quant),
                                                    importance=imatrix_records.get(quant))
            _write_modelfile(model_dir, manifest, quantizations)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log("hashing files (sha256)")
        return write_manifest(model_dir, manifest.model_copy(update={"quantizations": quantizations}))


def _check_exportable(model_dir: Path, manifest: PrimeManifest) -> dict[str, Any]:
    weights = [rel for rel in manifest.files if rel.endswith(".safetensors") and "/" not in rel]
    if not weights or "config.json" not in manifest.files:
        raise ExportError(f"{model_dir}: no Hugging Face weights (config.json + *.safetensors) to export from")
    config = json.loads((model_dir / "config.json").read_text())
    arch = config.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ExportError(f"{manifest.name}: architecture {arch!r} has no GGUF exporter here; "
                          f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if config.get("rope_scaling"):
        raise ExportError(f"{manifest.name}: rope_scaling {config['rope_scaling']} is not supported by this exporter")
    if "tokenizer.json" not in manifest.files:
        raise ExportError(f"{model_dir}: no tokenizer.json; the GGUF must carry the tokenizer")
    verify_files(model_dir, manifest, ["config.json", "tokenizer.json", *weights])
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
    _add_tokenizer(writer, model_dir, manifest, config["vocab_size"], tokenizer_pre)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    tied = config.get("tie_word_embeddings", False)
    for hf_name, tensor in _safetensors(model_dir):
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd as the output layer
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"{manifest.name}: tensor {hf_name} has no llama.cpp name")
        if hf_name.endswith("q_proj.weight"):
            tensor = _unpermute_rope(tensor, n_head)
        elif hf_name.endswith("k_proj.weight"):
            tensor = _unpermute_rope(tensor, n_kv)
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


def _unpermute_rope(weight: np.ndarray, heads: int) -> np.ndarray:
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


def _add_tokenizer(writer, model_dir: Path, manifest: PrimeManifest, n_vocab: int, pre: str | None) -> None:
    import gguf

    spec = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = spec["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportError(f"{manifest.name}: GGUF export supports byte-level BPE tokenizers; this one is "
                          f"{model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''}")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, token_id in model["vocab"].items():
        if token_id < n_vocab:
            tokens[token_id], types[token_id] = text, gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        if added["id"] < n_vocab:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre or _pre_tokenizer(model_dir, manifest, spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_add_space_prefix(False)

    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    special.chat_template = _chat_template(model_dir)
    special.add_to_gguf(writer, quiet=True)
    if "bos" not in special.add_special_token:  # explicit: llama.cpp's default differs per vocab type
        writer.add_add_bos_token(False)


def _pre_tokenizer(model_dir: Path, manifest: PrimeManifest, spec: dict[str, Any]) -> str:
    """llama.cpp's pre-tokenizer for this tokenizer: from a GGUF of the same model family
    when one is at hand (the model's own, or its source's), else from a small table."""
    for gguf_path in _related_ggufs(model_dir, manifest):
        pre = _gguf_field(gguf_path, "tokenizer.ggml.pre")
        if pre:
            return pre
    key = json.dumps(spec.get("pre_tokenizer"), separators=(",", ":"))
    if key in _PRE_TOKENIZERS:
        return _PRE_TOKENIZERS[key]
    raise ExportError(f"{manifest.name}: unknown pre-tokenizer {key[:200]}; pass tokenizer_pre "
                      f"(`prime export --tokenizer-pre NAME`, a llama.cpp pre-tokenizer name)")


def _related_ggufs(model_dir: Path, manifest: PrimeManifest) -> list[Path]:
    found = [model_dir / q.file for q in manifest.quantizations.values() if q.format == "gguf"]
    source = manifest.lineage.source or {}
    location = source.get("location")
    if location and Path(location).is_dir():  # a fine-tune's base PRIME directory
        with contextlib.suppress(Exception):
            base = read_manifest(Path(location))
            found += [Path(location) / q.file for q in base.quantizations.values() if q.format == "gguf"]
    return [p for p in found if p.is_file()]


def _gguf_field(path: Path, key: str) -> Any:
    import gguf

    field = gguf.GGUFReader(path).fields.get(key)
    return field.contents() if field is not None else None


def _chat_template(model_dir: Path) -> str:
    template_file = model_dir / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    template = _json(model_dir / "tokenizer_config.json").get("chat_template")
    if not template:
        raise ExportError(f"{model_dir}: no chat template (chat_template.jinja or tokenizer_config.json)")
    return template


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


# -- quantization --------------------------------------------------------------------------


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
        matrix = _importance_matrix(hf_dir, progress, log)
    records: dict[str, dict[str, Any]] = {}
    for quant, out in targets.items():
        log(f"quantizing to {quant} with llama.cpp")
        quantize(base, out, quant)
        if matrix is not None and quant in IMPORTANCE_QUANTS:
            from jarvis_prime.importance import round_with_importance

            log(f"rounding {quant} with the importance matrix")
            try:
                round_with_importance(base, out, matrix)
            except (OSError, ValueError, AttributeError) as err:  # no ggml library / symbol, or a bad matrix
                raise ExportError(f"could not round {quant} with the importance matrix: {err}") from err
            records[quant] = matrix.record()
    return records


def _importance_matrix(hf_dir: Path, progress: bool, log: Log):
    """The importance matrix of the model, or None (and why) when transformers is missing."""
    from jarvis_prime.hardware import detect_libraries
    from jarvis_prime.importance import importance_matrix

    if not detect_libraries().transformers:
        log("transformers is not installed: files below 8 bits are rounded without an importance matrix "
            "(pip install 'jarvis-prime[transformers]' for better 4-bit quality)")
        return None
    log("measuring the importance matrix on calibration text (transformers)")
    try:
        matrix = importance_matrix(hf_dir, progress=progress)
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
    with _c_stderr_to_file() as captured:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise ExportError(f"llama.cpp could not quantize {src.name} to {quant} (code {rc}):\n{captured()[-2000:]}")


@contextlib.contextmanager
def _c_stderr_to_file() -> Iterator[Callable[[], str]]:
    """llama.cpp logs every tensor to fd 2; keep that for errors instead of the terminal."""
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield lambda: (sink.seek(0), sink.read().decode(errors="replace"))[1]
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def copy_metadata(reader, writer, replaced: set[str] | frozenset[str] = frozenset()) -> None:
    """Every key/value of a GGUF (tokenizer, hyperparameters, template) into a new writer,
    except the ones the writer sets itself and those in `replaced`."""
    import gguf

    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in replaced:
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type)


# -- Ollama ----------------------------------------------------------------------------------

_CHATML_TEMPLATE = (
    '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n'
)


def _write_modelfile(model_dir: Path, manifest: PrimeManifest, quantizations: dict[str, Quantization]) -> None:
    """`gguf/Modelfile` for `ollama create NAME -f Modelfile`: the smallest 4-bit file
    (else the smallest), its stop tokens, and the template for ChatML models (Ollama
    also reads the chat template embedded in the GGUF)."""
    ggufs = {n: q for n, q in quantizations.items() if q.format == "gguf"}
    preferred = min(ggufs, key=lambda n: (n != "q4_k_m", ggufs[n].bits))
    lines = [f"FROM ./{Path(ggufs[preferred].file).name}"]
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in manifest.stop]
    if "<|im_start|>" in _chat_template(model_dir):
        lines.append(f'TEMPLATE """{_CHATML_TEMPLATE}"""')
    (model_dir / "gguf" / "Modelfile").write_text("\n".join(lines) + "\n", encoding="utf-8")


# -- a LoRA adapter merged into a GGUF, without torch ------------------------------------------


def merge_lora_gguf(base_gguf: Path, adapter_dir: Path, out: Path, *, name: str, progress: bool = False) -> None:
    """Write `out` (f16): `base_gguf`'s weights, dequantized, plus the peft LoRA deltas
    W += (alpha / r) B A of `adapter_dir`, with every metadata field (tokenizer,
    hyperparameters) copied from the base, and the chat template the adapter was
    trained with (`adapter_dir/chat_template.jinja`) when it ships one.

    numpy and the gguf package only: a torch-less install can build the fine-tuned
    model from a base GGUF and a few-MB adapter. The deltas are computed in
    transformers' layout and permuted like the weights (`_unpermute_rope`), which is
    exact because the permutation only reorders rows.
    """
    import gguf
    from safetensors import safe_open

    reader = gguf.GGUFReader(base_gguf)
    arch = reader.fields["general.architecture"].contents()
    if arch not in ("llama",):
        raise ExportError(f"{base_gguf.name}: LoRA merging supports llama GGUFs; this one is {arch!r}")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    rank, alpha = config["r"], config["lora_alpha"]
    scale = alpha / (rank ** 0.5 if config.get("use_rslora") else rank)
    n_head = int(reader.fields[f"{arch}.attention.head_count"].contents())
    n_kv = int(reader.fields[f"{arch}.attention.head_count_kv"].contents())
    blocks = int(reader.fields[f"{arch}.block_count"].contents())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, blocks)

    deltas: dict[str, np.ndarray] = {}
    with safe_open(adapter_dir / "adapter_model.safetensors", framework="numpy") as f:
        for key in f.keys():
            if ".lora_A." not in key:
                continue
            module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
            a = f.get_tensor(key).astype(np.float32)
            b = f.get_tensor(key.replace(".lora_A.", ".lora_B.")).astype(np.float32)
            delta = scale * (b @ a)
            if module.endswith("q_proj"):
                delta = _unpermute_rope(delta, n_head)
            elif module.endswith("k_proj"):
                delta = _unpermute_rope(delta, n_kv)
            target = names.get_name(module + ".weight", try_suffixes=(".weight",))
            if target is None:
                raise ExportError(f"{adapter_dir}: adapted module {module} has no llama.cpp tensor")
            deltas[target] = delta

    template = adapter_dir / "chat_template.jinja"
    replaced = {"general.file_type", "general.name", "general.quantization_version"}
    if template.is_file():
        replaced.add("tokenizer.chat_template")
    writer = gguf.GGUFWriter(out, arch=arch)
    copy_metadata(reader, writer, replaced)
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES["f16"])
    if template.is_file():
        writer.add_chat_template(template.read_text(encoding="utf-8"))
    for tensor in reader.tensors:
        shape = tuple(reversed([int(n) for n in tensor.shape]))  # GGUF lists dimensions innermost first
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)
        if tensor.name in deltas:
            data = data + deltas.pop(tensor.name)
        writer.add_tensor(tensor.name, data.astype(np.float16 if data.ndim >= 2 else np.float32))
    if deltas:
        raise ExportError(f"{adapter_dir}: adapter tensors without a base tensor: {sorted(deltas)[:3]}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=progress)
    writer.close()
