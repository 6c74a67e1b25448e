"""GGUF exports of a PRIME model: `prime export NAME --format gguf --quant f16,q8_0,q4_k_m`.

llama.cpp's own `convert_hf_to_gguf.py` (the one matching the installed llama-cpp-python,
`make llama-cpp-converter`) writes the full-precision file from the model's safetensors:
every architecture and tokenizer kind it converts (llama with SentencePiece-style or
byte-level BPE tokenizers, mistral, qwen2/3, gemma3, phi3, ...; gemma2 with sentencepiece installed). llama-cpp-python's
`llama_model_quantize` then derives the quantized files (q8_0, k-quants) from it, as
`llama-quantize` would, the 4-6-bit ones rounded with an importance matrix.

Fine-tuned GGUFs that "speak gibberish" in other tools usually lost their chat
template or stop token on the way; here both come from the PRIME directory and are
embedded, and tests compare each architecture's export with the transformers model
(tokens and logits).

    writer.py     export_gguf: the full-precision GGUF through the converter, then the quantized ones
    converter.py  llama.cpp's convert_hf_to_gguf.py in a child process, on a verified view of the model
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
