"""What PRIME's GGUF files are called and what they carry: the file names in a model
directory, the architectures the exporter writes, llama.cpp's file type numbers, and
the copy of one GGUF's metadata (tokenizer, hyperparameters, template) into another.

A leaf: the runtime planner (`models.selection`) and the store's builders name GGUF
files without loading the writer.
"""

from __future__ import annotations

SUPPORTED_ARCHITECTURES = ("llama", "mistral")
# llama.cpp file types (enum llama_ftype) of the quantizations we export.
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q4_k_s": 14, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


def gguf_filename(name: str, quant: str) -> str:
    return f"gguf/{name}-{quant}.gguf"


def copy_metadata(reader, writer, replaced: set[str] | frozenset[str] = frozenset()) -> None:
    """Every key/value of a GGUF (tokenizer, hyperparameters, template) into a new writer,
    except the ones the writer sets itself and those in `replaced`."""
    import gguf

    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in replaced:
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type)
