"""`prime serve --engine vllm`: what vLLM is started on and with which arguments.

vLLM cannot be installed on this CPU machine (its wheels are CUDA builds), so these
tests check the decisions (which weights, the LoRA module, the key, the served name,
the parsers) and, end to end, that `prime serve` hands exactly those to a `vllm` on
PATH, here a script that records what it was given. `scripts/cuda_check.py` serves a
PRIME model on the real vLLM where a GPU is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jarvis_prime.cli import app
from jarvis_prime.errors import IntegrityError
from jarvis_prime.manifest import Lineage, PrimeManifest, Quantization, read_manifest, write_manifest
from jarvis_prime.serving.vllm import NOT_INSTALLED, VLLM_API_KEY_ENV, VllmError, base_folder, vllm_server
from jarvis_prime.store import models_root
from jarvis_prime.thinking import ThinkingMarkers


def prime_dir(root: Path, name: str, files: dict[str, bytes], **fields) -> Path:
    """A PRIME directory holding `files` (contents do not matter: vLLM never runs here)."""
    folder = root / f"{name}-1.0.0"
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    write_manifest(folder, PrimeManifest(name=name, version="1.0.0", task="chat", base=fields.pop("base", "base"),
                                         context_length=2048, **fields))
    return folder


HF_FILES = {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b"{}", "chat_template.jinja": b"{{ x }}"}


@pytest.fixture
def merged(tmp_path) -> Path:
    return prime_dir(tmp_path, "tiny-chat", HF_FILES | {"model.safetensors": os.urandom(256)}, tools=True,
                     thinking=ThinkingMarkers(start="<think>", end="</think>"))


def adapter_only(tmp_path: Path, base: str, rank: int = 4, **fields) -> Path:
    return prime_dir(tmp_path, "tiny-lora", HF_FILES | {
        "adapter/adapter_config.json": json.dumps({"r": rank, "lora_alpha": 8}).encode(),
        "adapter/adapter_model.safetensors": os.urandom(128)}, base=base, **fields)


def test_a_merged_model_is_served_as_it_is_with_the_served_name_parsers_and_key_in_the_environment(merged):
    server = vllm_server(merged, read_manifest(merged), host="0.0.0.0", port=8001, served_name=None,
                         api_key="s3cret", context_length=4096)
    assert server.args == [
        str(merged), "--host", "0.0.0.0", "--port", "8001", "--served-model-name", "tiny-chat",
        "--chat-template", str(merged / "chat_template.jinja"), "--max-model-len", "4096",
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser", "deepseek_r1"]
    assert server.env == {VLLM_API_KEY_ENV: "s3cret"} and "s3cret" not in " ".join(server.args)
    plain = vllm_server(merged, read_manifest(merged).model_copy(update={"tools": False, "thinking": None}),
                        host="127.0.0.1", port=9000, served_name="jarvis", api_key=None, context_length=None)
    assert plain.args[plain.args.index("--served-model-name") + 1] == "jarvis" and plain.env == {}
    assert "--tool-call-parser" not in plain.args and "--reasoning-parser" not in plain.args


def test_an_adapter_only_model_is_its_base_with_the_adapter_as_a_lora_module_under_the_served_name(tmp_path, merged):
    model = adapter_only(tmp_path, base=str(merged), rank=12)
    server = vllm_server(model, read_manifest(model), host="127.0.0.1", port=8001, served_name=None, api_key=None,
                         context_length=None, base_dir=merged)
    args = server.args
    assert args[0] == str(merged)
    assert args[args.index("--served-model-name") + 1] == "tiny-lora-base"  # the base under its own name
    assert args[args.index("--lora-modules") + 1] == f"tiny-lora={model / 'adapter'}"  # what clients ask for
    assert "--enable-lora" in args and args[args.index("--max-lora-rank") + 1] == "16"  # 12 -> vLLM's next size
    hub = adapter_only(tmp_path / "hub", base="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert vllm_server(hub, read_manifest(hub), host="127.0.0.1", port=8001, served_name=None, api_key=None,
                       context_length=None).args[0] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_a_launched_adapter_only_model_is_served_on_the_stores_copy_of_the_base_it_recorded(tmp_path, monkeypatch):
    """On a launched VM the base is the staged `model/<name>-<version>`, a path only there;
    the base's name, version and weights Reactor Core recorded find and check the store's copy."""
    monkeypatch.setenv("JARVIS_PRIME_HOME", str(tmp_path / "home"))
    base = prime_dir(models_root(), "tiny-base", HF_FILES | {"model.safetensors": os.urandom(256)})
    staged = "model/tiny-base-1.0.0"

    def launched(where: str, weights: str) -> Path:
        source = {"kind": "prime", "location": staged, "name": "tiny-base", "version": "1.0.0",
                  "weights_sha256": {"model.safetensors": weights}}
        return adapter_only(tmp_path / where, base=staged, lineage=Lineage(parent=staged, source=source))

    model = launched("fetched", read_manifest(base).files["model.safetensors"].sha256)
    assert base_folder(model, read_manifest(model)) == base
    assert vllm_server(model, read_manifest(model), host="127.0.0.1", port=8001, served_name=None, api_key=None,
                       context_length=None, base_dir=base).args[0] == str(base)
    other = launched("other", "0" * 64)  # trained on other weights under that name
    with pytest.raises(IntegrityError, match=r"model\.safetensors: sha256 .* records 0{64} .*\(tiny-base 1\.0\.0\)"):
        base_folder(other, read_manifest(other))
    unrecorded = adapter_only(tmp_path / "unrecorded", base=staged)  # no record: vLLM gets prime.json's base
    assert base_folder(unrecorded, read_manifest(unrecorded)) is None


def test_a_gguf_only_model_is_refused_with_what_to_run_instead(tmp_path):
    model = prime_dir(tmp_path, "tiny-gguf", {"gguf/tiny-gguf-q4_k_m.gguf": b"GGUF"},
                      quantizations={"q4_k_m": Quantization(file="gguf/tiny-gguf-q4_k_m.gguf", format="gguf", bits=4)})
    with pytest.raises(VllmError, match=r"only GGUF weights \(gguf/tiny-gguf-q4_k_m.gguf\).*`prime serve tiny-gguf`"):
        vllm_server(model, read_manifest(model), host="127.0.0.1", port=8001, served_name=None, api_key=None,
                    context_length=None)


def test_a_changed_or_unlisted_weight_file_stops_it_before_vllm_starts(merged):
    (merged / "model.safetensors").write_bytes(os.urandom(256))
    with pytest.raises(IntegrityError, match="model.safetensors: sha256"):
        vllm_server(merged, read_manifest(merged), host="127.0.0.1", port=8001, served_name=None, api_key=None,
                    context_length=None)
    (merged / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(IntegrityError, match="not listed in prime.json: extra.safetensors"):
        vllm_server(merged, read_manifest(merged), host="127.0.0.1", port=8001, served_name=None, api_key=None,
                    context_length=None)


def test_without_vllm_prime_serve_says_so_and_what_to_run_instead(merged, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    result = CliRunner().invoke(app, ["serve", str(merged), "--engine", "vllm"])
    assert result.exit_code == 1
    assert "vLLM is not installed here" in result.output and "prime serve NAME" in result.output
    assert NOT_INSTALLED.startswith("vLLM is not installed here")


@pytest.fixture
def fake_vllm(tmp_path) -> tuple[Path, Path]:
    """A `vllm` on PATH that records its arguments and $VLLM_API_KEY (one per line)."""
    bin_dir, record = tmp_path / "bin", tmp_path / "vllm-call"
    bin_dir.mkdir()
    (bin_dir / "vllm").write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {record}\necho "key=${{VLLM_API_KEY:-}}" >> {record}\n')
    (bin_dir / "vllm").chmod(0o755)
    return bin_dir, record


def prime_serve(bin_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PRIME_API_KEY", None)
    env.pop(VLLM_API_KEY_ENV, None)
    return subprocess.run([sys.executable, "-m", "jarvis_prime.cli", "serve", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_prime_serve_engine_vllm_becomes_vllm_with_prime_serves_rules(merged, fake_vllm):
    bin_dir, record = fake_vllm
    run = prime_serve(bin_dir, str(merged), "--engine", "vllm", "--host", "0.0.0.0", "--port", "8123",
                      "--api-key", "s3cret", "--served-model-name", "jarvis")
    assert run.returncode == 0, run.stderr
    args = record.read_text().splitlines()
    assert args[:4] == ["serve", str(merged), "--host", "0.0.0.0"]
    assert args[args.index("--served-model-name") + 1] == "jarvis" and args[-1] == "key=s3cret"
    assert "s3cret" not in args[:-1]

    record.unlink()
    refused = prime_serve(bin_dir, str(merged), "--engine", "vllm", "--host", "0.0.0.0")  # no key: as prime serve
    assert refused.returncode == 2 and "without an API key" in refused.stderr and not record.exists()
    refused = prime_serve(bin_dir, str(merged), "--engine", "vllm", "--admin-key", "a")
    assert refused.returncode == 1 and "--admin-key: options of `prime serve`'s own engine" in refused.stderr
    assert not record.exists()
