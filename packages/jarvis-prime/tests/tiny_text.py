"""Tiny random text models of each architecture `prime export` is tested on, each with a
tokenizer of its family's kind built offline with the `tokenizers` library (no download),
imported into the test store as a PRIME model and exported once per session.

Tokenizer kinds, as the families ship them:

- "spm": Llama 2 / Mistral 7B: BPE with byte fallback over `▁`-spaced text
  (tokenizer_class LlamaTokenizer; llama.cpp's SentencePiece vocabulary type).
- "llama3": byte-level BPE split by Llama 3's exact pre-tokenizer regex (llama.cpp "llama-bpe").
- "qwen2": byte-level BPE, NFC, split by Qwen2's exact regex (llama.cpp "qwen2"; Qwen3 too).
- "gpt2": byte-level BPE with GPT-2's regex (tokenizer_class GPT2Tokenizer: Phi-4's route
  through llama.cpp's Phi3 converter; llama.cpp "gpt-2").
- "sentencepiece": a real SentencePiece `tokenizer.model` (BPE, byte fallback, digits split),
  trained with the `sentencepiece` library, beside the tokenizer.json transformers converts
  from it: what Llama 2 and Gemma 2 repositories ship. llama.cpp's converter reads the
  `.model` itself (`_set_vocab_sentencepiece`); Gemma 2's converter reads nothing else.

Why `tokenizer_pre` is passed for the byte-level kinds: llama.cpp's converter recognises a
pre-tokenizer by the sha256 of the token ids its tokenizer gives a fixed text
(`get_vocab_base_pre`), ids that depend on the whole 128k/150k vocabulary, so no tiny
vocabulary can hash like the real one. The split rules are the real ones; the test then
shows llama.cpp's pre-tokenizer of that name gives the same ids as transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Machine learning is the study of algorithms.",
    "Hello world, hello JARVIS! 1234 5678 90 3.14159 2026-12-05",
    "def main():\n    return 42\n\n\tprint('done')  # tabs and  spaces",
    "I've been told he's there; you'll see, we'd like some tea. DON'T SHOUT",
    "机器学习是人工智能的一个分支。我想在apple工作。",
    "🚀 rockets, 🦙 llamas and 😶‍🌫️ clouds ✅",
] * 8

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_CHAT = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
LLAMA2_CHAT = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
               "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
PHI3_CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@dataclass(frozen=True)
class Arch:
    """One architecture under test: its transformers config, tokenizer kind and chat format."""

    id: str
    config_class: str
    config: dict
    tokenizer: str  # spm | llama3 | qwen2 | gpt2 | sentencepiece
    specials: tuple[str, ...]
    template: str
    eos: str
    stop: str  # prime.json's stop: the end-of-turn token llama.cpp must stop at
    bos: str | None = None
    tokenizer_class: str = "PreTrainedTokenizerFast"
    tokenizer_pre: str | None = None  # llama.cpp's pre-tokenizer name (byte-level kinds; see module docstring)
    extra: dict = field(default_factory=dict)


COMMON = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}

ARCHES = [
    Arch("llama-spm", "LlamaConfig", COMMON, "spm", ("<unk>", "<s>", "</s>"), LLAMA2_CHAT, eos="</s>", stop="</s>",
         bos="<s>", tokenizer_class="LlamaTokenizer"),
    Arch("llama-bpe", "LlamaConfig", COMMON | {"rope_theta": 500000.0}, "llama3",
         ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
         LLAMA3_CHAT, eos="<|end_of_text|>", stop="<|eot_id|>", bos="<|begin_of_text|>", tokenizer_pre="llama-bpe"),
    Arch("mistral", "MistralConfig", COMMON | {"sliding_window": None}, "spm", ("<unk>", "<s>", "</s>"),
         LLAMA2_CHAT, eos="</s>", stop="</s>", bos="<s>", tokenizer_class="LlamaTokenizer"),
    Arch("qwen2", "Qwen2Config", COMMON | {"tie_word_embeddings": True}, "qwen2",
         ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), CHATML, eos="<|endoftext|>", stop="<|im_end|>",
         tokenizer_class="Qwen2Tokenizer", tokenizer_pre="qwen2"),
    Arch("qwen3", "Qwen3Config", COMMON | {"head_dim": 16, "tie_word_embeddings": True}, "qwen2",
         ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), CHATML, eos="<|im_end|>", stop="<|im_end|>",
         tokenizer_class="Qwen2Tokenizer", tokenizer_pre="qwen2"),
    Arch("gemma3", "Gemma3TextConfig", COMMON | {"head_dim": 16, "sliding_window": 8, "tie_word_embeddings": True,
                                                 "query_pre_attn_scalar": 16, "final_logit_softcapping": None},
         "llama3", ("<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"),
         ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
          "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"),
         eos="<eos>", stop="<end_of_turn>", bos="<bos>", tokenizer_pre="llama-bpe"),
    Arch("llama-sentencepiece", "LlamaConfig", COMMON, "sentencepiece", ("<unk>", "<s>", "</s>"), LLAMA2_CHAT,
         eos="</s>", stop="</s>", bos="<s>", tokenizer_class="LlamaTokenizer"),
    Arch("gemma2", "Gemma2Config", COMMON | {"head_dim": 16, "sliding_window": 8, "tie_word_embeddings": True,
                                             "query_pre_attn_scalar": 16},
         "sentencepiece", ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
         ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
          "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"),
         eos="<eos>", stop="<end_of_turn>", bos="<bos>", tokenizer_class="GemmaTokenizer"),
    Arch("phi3", "Phi3Config", COMMON | {"num_key_value_heads": 4, "pad_token_id": 0}, "gpt2",
         ("<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"), PHI3_CHAT, eos="<|endoftext|>", stop="<|end|>",
         tokenizer_class="GPT2Tokenizer", tokenizer_pre="gpt-2"),
]


def build_tokenizer(arch: Arch):
    """A trained `tokenizers.Tokenizer` of `arch`'s kind (a few hundred tokens)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if arch.tokenizer == "spm":  # Llama 2's tokenizer.json, with <0x00>..<0xFF> byte-fallback tokens
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
        specials = list(arch.specials) + [f"<0x{i:02X}>" for i in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=480, special_tokens=specials, show_progress=False)
        tok.train_from_iterator(CORPUS, trainer)
        # the byte tokens are vocabulary, not added tokens, as in Llama 2's file
        spec = json.loads(tok.to_str())
        spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in arch.specials]
        tok = Tokenizer.from_str(json.dumps(spec))
    else:
        split = {"llama3": LLAMA3_REGEX, "qwen2": QWEN2_REGEX}.get(arch.tokenizer)
        tok = Tokenizer(models.BPE())
        if arch.tokenizer == "qwen2":
            tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = (pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True) if split is None else
                             pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                      pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                               use_regex=False)]))
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=480, special_tokens=list(arch.specials), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(CORPUS, trainer)
    if arch.bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{arch.bos} $A", pair=f"{arch.bos} $A {arch.bos} $B",
            special_tokens=[(arch.bos, tok.token_to_id(arch.bos))])
    elif arch.tokenizer != "spm":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def build_sentencepiece(arch: Arch, folder: Path):
    """`folder/tokenizer.model` trained by SentencePiece the way Llama 2 (ids unk 0, bos 1, eos 2,
    a dummy-prefix space) or Gemma 2 (pad 0, eos 1, bos 2, unk 3, no dummy prefix, its turn
    markers as user-defined pieces) configure it, and the tokenizer.json transformers converts
    from it. Returns that tokenizer.json as a `tokenizers.Tokenizer`."""
    sentencepiece = pytest.importorskip("sentencepiece")
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    gemma = arch.bos == "<bos>"
    ids = dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3) if gemma else dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_prefix=str(folder / "tokenizer"), vocab_size=600, model_type="bpe",
        byte_fallback=True, split_digits=True, character_coverage=1.0, add_dummy_prefix=not gemma,
        remove_extra_whitespaces=False, normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        user_defined_symbols=[t for t in arch.specials if t not in ("<pad>", "<eos>", "<bos>", "<unk>", "<s>", "</s>")],
        unk_piece="<unk>", bos_piece=arch.bos, eos_piece=arch.eos, pad_piece="<pad>", minloglevel=2, **ids)
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({  # as the repositories configure it: a BOS first
        "tokenizer_class": arch.tokenizer_class, "bos_token": arch.bos, "eos_token": arch.eos, "unk_token": "<unk>",
        "add_bos_token": True}))
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)  # writes tokenizer.json; the .model stays
    return Tokenizer.from_file(str(folder / "tokenizer.json"))


def build_hf_model(arch: Arch, folder: Path) -> Path:
    """A seeded random model of `arch` with its tokenizer and chat template, saved as safetensors.

    Weights are drawn with std 0.2 (transformers' default 0.02 makes near-uniform logits that
    a wrong tensor layout would barely move)."""
    import torch
    import transformers

    folder.mkdir(parents=True)
    if arch.tokenizer == "sentencepiece":
        tok = build_sentencepiece(arch, folder)
    else:
        tok = build_tokenizer(arch)
        tok.save(str(folder / "tokenizer.json"))
    tokenizer_config = {"tokenizer_class": arch.tokenizer_class, "eos_token": arch.eos, "chat_template": arch.template,
                        "model_max_length": 512, "clean_up_tokenization_spaces": False,
                        **({"bos_token": arch.bos, "add_bos_token": True} if arch.bos else {"bos_token": None}),
                        **({"unk_token": "<unk>", "legacy": True} if arch.tokenizer in ("spm", "sentencepiece") else {}),
                        **({"pad_token": "<pad>"} if "<pad>" in arch.specials else {})}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    config = getattr(transformers, arch.config_class)(
        vocab_size=tok.get_vocab_size(), initializer_range=0.2,
        bos_token_id=tok.token_to_id(arch.bos) if arch.bos else None, eos_token_id=tok.token_to_id(arch.eos),
        **arch.config)
    config.architectures = [{"LlamaConfig": "LlamaForCausalLM", "MistralConfig": "MistralForCausalLM",
                             "Qwen2Config": "Qwen2ForCausalLM", "Qwen3Config": "Qwen3ForCausalLM",
                             "Gemma3TextConfig": "Gemma3ForCausalLM", "Gemma2Config": "Gemma2ForCausalLM",
                             "Phi3Config": "Phi3ForCausalLM"}[arch.config_class]]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms away from 1 (gemma's are stored as w - 1): a wrong norm layout shows
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.copy_(torch.rand_like(param) * 0.5 + (0.75 if "gemma" not in arch.id else -0.25))
    model.save_pretrained(folder)
    return folder


@dataclass
class Exported:
    arch: Arch
    path: Path  # the PRIME model directory
    export_seconds: float


_BUILT: dict[str, Exported] = {}


def exported(arch: Arch, root: Path, quants: tuple[str, ...] = ("f16",)) -> Exported:
    """`arch`'s tiny model imported into the store and exported (`quants`), once per session;
    skips without llama.cpp's converter (its message names `make llama-cpp-converter`)."""
    import time

    from jarvis_prime.errors import ExportError
    from jarvis_prime.export import export_gguf
    from jarvis_prime.export.converter import find_converter
    from jarvis_prime.manifest import read_manifest, write_manifest
    from jarvis_prime.store import import_path

    if arch.id in _BUILT:
        return _BUILT[arch.id]
    try:
        find_converter()
    except ExportError as err:
        pytest.skip(str(err))
    pytest.importorskip("transformers")
    hf = build_hf_model(arch, root / "hf")
    local = import_path(hf, name=f"tiny-{arch.id}", version="1.0.0", force=True)
    manifest = read_manifest(local.path)
    if manifest.stop != [arch.stop]:  # a chat fine-tune of a base model: the turn ends before EOS
        write_manifest(local.path, manifest.model_copy(update={"stop": [arch.stop]}), changed=[])
    started = time.perf_counter()
    export_gguf(local.path, list(quants), tokenizer_pre=arch.tokenizer_pre, progress=False)
    _BUILT[arch.id] = Exported(arch, local.path, time.perf_counter() - started)
    return _BUILT[arch.id]
