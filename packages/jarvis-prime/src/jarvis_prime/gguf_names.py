"""What PRIME's GGUF files are called and what llama.cpp calls their types: the file
names in a model directory, the architectures the exporter writes, llama.cpp's file
type numbers.

A leaf outside `export/`: the runtime planner (`models.selection`) and the store's
builders name GGUF files at import time, and importing anything under `export/` runs
its `__init__`, which loads the writer and numpy (`import jarvis_prime` stays light).
"""

from __future__ import annotations

SUPPORTED_ARCHITECTURES = ("llama", "mistral")  # written by export/writer.py
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
