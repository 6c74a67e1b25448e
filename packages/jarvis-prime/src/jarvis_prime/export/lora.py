"""A LoRA adapter merged into a GGUF, without torch: how a torch-less install builds the
JARVIS chat model from the base model's GGUF and the few-MB adapter the package ships."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jarvis_prime.errors import ExportError
from jarvis_prime.export.metadata import copy_metadata
from jarvis_prime.gguf_names import FILE_TYPES


def unpermute_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """transformers stores llama's q/k rows rotate-half style; llama.cpp's converter writes
    them in the original interleaved layout (the inverse of transformers' conversion script's
    permute), so a delta in transformers' layout is permuted the same way."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def merge_lora_gguf(base_gguf: Path, adapter_dir: Path, out: Path, *, name: str, progress: bool = False) -> None:
    """Write `out` (f16): `base_gguf`'s weights, dequantized, plus the peft LoRA deltas
    W += (alpha / r) B A of `adapter_dir`, with every metadata field (tokenizer,
    hyperparameters) copied from the base, and the chat template the adapter was
    trained with (`adapter_dir/chat_template.jinja`) when it ships one.

    numpy and the gguf package only: a torch-less install can build the fine-tuned
    model from a base GGUF and a few-MB adapter. The deltas are computed in
    transformers' layout and permuted like the weights (`unpermute_rope`), which is
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
                delta = unpermute_rope(delta, n_head)
            elif module.endswith("k_proj"):
                delta = unpermute_rope(delta, n_kv)
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
        writer.addchat_template(template.read_text(encoding="utf-8"))
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
