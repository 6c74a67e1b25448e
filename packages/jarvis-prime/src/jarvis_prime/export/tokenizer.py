"""The tokenizer inside a GGUF: vocabulary, token types, merges, special ids, the
pre-tokenizer llama.cpp must split text with, and the chat template, from the PRIME
directory's tokenizer.json (byte-level BPE only)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from jarvis_prime.errors import ExportError
from jarvis_prime.manifest import PrimeManifest, read_manifest

# tokenizer.json pre-tokenizers -> llama.cpp's pre-tokenizer names, when no GGUF of the
# same tokenizer says which one the model was trained with.
_PRE_TOKENIZERS = {
    '{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true}': "gpt-2",
    '{"type":"Sequence","pretokenizers":[{"type":"Digits","individual_digits":true},'
    '{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true}]}': "smollm",
}


def add_tokenizer(writer, model_dir: Path, manifest: PrimeManifest, n_vocab: int, pre: str | None) -> None:
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
    special.chat_template = chat_template(model_dir)
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


def chat_template(model_dir: Path) -> str:
    template_file = model_dir / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    template = _json(model_dir / "tokenizer_config.json").get("chat_template")
    if not template:
        raise ExportError(f"{model_dir}: no chat template (chat_template.jinja or tokenizer_config.json)")
    return template


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
