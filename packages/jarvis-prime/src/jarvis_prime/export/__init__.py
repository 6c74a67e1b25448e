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

    writer.py     export_gguf: the full-precision GGUF from safetensors, then the quantized ones
    tokenizer.py  tokenizer.json -> the GGUF's vocabulary, merges, pre-tokenizer and chat template
    quantize.py   llama.cpp quantization through its C API
    imatrix.py    importance matrices, and rounding with them through ggml
    lora.py       a LoRA adapter merged into a GGUF, without torch
    modelfile.py  the Ollama Modelfile
    metadata.py   one GGUF's metadata copied into another (file names and types: jarvis_prime.gguf_names)
"""

from jarvis_prime.errors import ExportError
from jarvis_prime.export.lora import merge_lora_gguf
from jarvis_prime.export.quantize import IMPORTANCE_QUANTS
from jarvis_prime.export.writer import DEFAULT_QUANTS, export_gguf

__all__ = ["DEFAULT_QUANTS", "IMPORTANCE_QUANTS", "ExportError", "export_gguf", "merge_lora_gguf"]
