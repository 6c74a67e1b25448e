"""A private model store whose builds run as on an inference-only install (a shared test
helper, not a fixture).

A build with transformers installed also writes float32 safetensors and rounds 4-bit
files with an importance matrix: ~50 s for a 135M model on 2 CPU cores, ~40 of them
those two steps. A test of what the store decides (when it builds, what it records) or of
what a GGUF answers through llama.cpp (q8_0 never uses the importance matrix) does not
need them; the session's full builds (`chat_model`, `pulled_model`) are the tests of
those steps."""

from __future__ import annotations

from pathlib import Path

import pytest


def inference_only_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Store builds from here on see no transformers: merge and llama.cpp quantization only."""
    from jarvis_prime.hardware import Libraries
    from jarvis_prime.store import builders

    monkeypatch.setattr(builders, "detect_libraries", lambda: Libraries(llama_cpp=True, transformers=False,
                                                                       bitsandbytes=False))


def private_store(root: Path, monkeypatch: pytest.MonkeyPatch, *models: Path) -> Path:
    """`root` as JARVIS_PRIME_HOME, holding `models` (symlinks to the session's PRIME
    directories) and nothing else, its builds inference-only; the models folder."""
    monkeypatch.setenv("JARVIS_PRIME_HOME", str(root))
    inference_only_builds(monkeypatch)
    folder = root / "models"
    folder.mkdir(parents=True)
    for model in models:
        (folder / model.name).symlink_to(model)
    return folder


def plain_4bit_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    """GGUF exports from here on round 4-bit files as llama.cpp does alone, without an
    importance matrix (~25 s of a 135M model's build on 2 CPU cores): for tests that never
    read a 4-bit file. `test_export` checks the matrix and what it buys."""
    from jarvis_prime.export import quantize
    from jarvis_prime.hardware import Libraries

    monkeypatch.setattr(quantize, "detect_libraries", lambda: Libraries(llama_cpp=True, transformers=False,
                                                                        bitsandbytes=False))
