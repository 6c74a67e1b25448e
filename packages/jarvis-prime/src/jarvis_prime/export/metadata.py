"""The copy of one GGUF's metadata (tokenizer, hyperparameters, template) into another.
File names, architectures and llama.cpp file types are in `jarvis_prime.gguf_names`."""

from __future__ import annotations

def copy_metadata(reader, writer, replaced: set[str] | frozenset[str] = frozenset()) -> None:
    """Every key/value of a GGUF (tokenizer, hyperparameters, template) into a new writer,
    except the ones the writer sets itself and those in `replaced`."""
    import gguf

    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in replaced:
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type)
