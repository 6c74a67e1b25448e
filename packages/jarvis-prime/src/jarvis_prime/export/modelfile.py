"""`gguf/Modelfile`: the model in Ollama, `ollama create NAME -f Modelfile`."""

from __future__ import annotations

import json
from pathlib import Path

from jarvis_prime.export.converter import chat_template
from jarvis_prime.manifest import PrimeManifest, Quantization

_CHATML_TEMPLATE = (
    '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n'
)


def write_modelfile(model_dir: Path, manifest: PrimeManifest, quantizations: dict[str, Quantization]) -> None:
    """`gguf/Modelfile` for `ollama create NAME -f Modelfile`: the smallest 4-bit file
    (else the smallest), its stop tokens, and the template for ChatML models (Ollama
    also reads the chat template embedded in the GGUF)."""
    ggufs = {n: q for n, q in quantizations.items() if q.format == "gguf"}
    preferred = min(ggufs, key=lambda n: (n != "q4_k_m", ggufs[n].bits))
    lines = [f"FROM ./{Path(ggufs[preferred].file).name}"]
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in manifest.stop]
    if "<|im_start|>" in chat_template(model_dir):
        lines.append(f'TEMPLATE """{_CHATML_TEMPLATE}"""')
    (model_dir / "gguf" / "Modelfile").write_text("\n".join(lines) + "\n", encoding="utf-8")
