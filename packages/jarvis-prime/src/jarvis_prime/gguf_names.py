"""What PRIME's GGUF files are called and what llama.cpp calls their types: the file
names in a model directory, the architectures whose export is tested here, llama.cpp's file
type numbers.

A leaf outside `export/`: the runtime planner (`models.selection`) and the store's
builders name GGUF files at import time, and importing anything under `export/` runs
its `__init__`, which loads the writer and numpy (`import jarvis_prime` stays light).
"""

from __future__ import annotations

# config.json model_type of the text architectures whose export round-trips through llama.cpp in
# tests/test_export_architectures.py. `prime export` takes any architecture llama.cpp's converter
# knows; `from_pretrained` exports a missing q8_0 / q4_k_m on first use for these.
TESTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")
# Vision models (config.json model_type) exported through llama.cpp's own converter (export/converter.py):
# the text GGUF and the projector (mmproj) libmtmd runs.
VISION_ARCHITECTURES = ("idefics3", "smolvlm")
# llama.cpp file types (enum llama_ftype) of the quantizations we export.
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q4_k_s": 14, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


def gguf_filename(name: str, quant: str) -> str:
    return f"gguf/{name}-{quant}.gguf"


def mmproj_filename(name: str, quant: str) -> str:
    """A vision model's projector GGUF (llama.cpp's mmproj), recorded as its text GGUF's `mmproj`."""
    return f"gguf/mmproj-{name}-{quant}.gguf"
