"""Training from a PRIME model directory checks it first (#19 item 14): every file
prime.json lists must match its sha256, and no weight file it does not list may be
there, before anything is loaded or written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reactor_core import Trainer
from reactor_core.cli import app
from reactor_core.training.model import ModelSourceError, resolve_model_source
from reactor_core.training.prime_dir import write_prime_manifest

from reactor_testing import config_for, write_chat_data, write_recipe


@pytest.fixture
def prime_dir(tiny_llama_dir, tmp_path) -> Path:
    """The tiny Llama as a PRIME model directory, its prime.json written as a run writes it."""
    path = tmp_path / "tiny-prime-1.0.0"
    shutil.copytree(tiny_llama_dir, path)
    write_prime_manifest(path, name="tiny-prime", version="1.0.0", base=str(tiny_llama_dir), context_length=1024,
                         stop=[], lineage={}, metrics={}, architecture="llama")
    return path


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the hash tells
    path.write_bytes(bytes(data))


def test_an_intact_prime_directory_is_a_prime_source(prime_dir):
    source = resolve_model_source(str(prime_dir))
    assert source.kind == "prime" and source.location == str(prime_dir)


def test_training_from_a_tampered_prime_directory_fails_naming_the_file(prime_dir, tmp_path):
    flip_a_byte(prime_dir / "model.safetensors")
    out = tmp_path / "out"
    with pytest.raises(ModelSourceError, match=r"model.safetensors: sha256 [0-9a-f]{64} does not match prime.json"):
        Trainer(config_for(prime_dir, out), progress=False).train(write_chat_data(tmp_path / "train.jsonl"))
    assert not out.exists()


def test_an_unlisted_weight_file_in_a_prime_directory_is_refused(prime_dir, tmp_path):
    shutil.copyfile(prime_dir / "model.safetensors", prime_dir / "adapter_model.safetensors")
    (prime_dir / ".model.safetensors.tmp-1").write_bytes(b"a writer's temporary file")  # hidden: not a weight
    recipe = write_recipe(tmp_path / "recipe.yaml", {"model_name": str(prime_dir), "output_dir": str(tmp_path / "out"),
                                                      "data_path": str(write_chat_data(tmp_path / "train.jsonl"))})
    result = CliRunner().invoke(app, ["train", str(recipe)])
    assert result.exit_code == 2, result.output
    assert "weight files not listed in prime.json: adapter_model.safetensors;" in " ".join(result.output.split())
    assert not (tmp_path / "out").exists()


def test_a_truncated_or_missing_listed_file_is_refused(prime_dir):
    with open(prime_dir / "tokenizer.json", "a") as f:
        f.write(" ")
    with pytest.raises(ModelSourceError, match="tokenizer.json: size"):
        resolve_model_source(str(prime_dir))
    (prime_dir / "tokenizer.json").unlink()
    with pytest.raises(ModelSourceError, match="tokenizer.json: listed in prime.json but missing"):
        resolve_model_source(str(prime_dir))
