"""`prime pull NAME --from DIR` on a PRIME directory that holds only a LoRA adapter (Reactor
Core's `merge_adapter: false`, what `reactor launch fetch` brings back): merged onto its
base, found in the store by the name Reactor Core recorded, checked by its weights' sha256.

The adapter is trained for real by Reactor Core on a tiny random Qwen2-style model, as a
launched VM trains it: the base is the store's PRIME folder staged as `model/<name>-<version>`
and named by that relative path, which means nothing on this machine.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jarvis_prime import IntegrityError, ModelNotAvailableError, PrimeModel
from jarvis_prime.cli import app
from jarvis_prime.manifest import read_manifest, verify_files
from jarvis_prime.store import import_path, models_root
from store_testing import private_store
from tiny_text import ARCHES, build_hf_model

QWEN2 = next(arch for arch in ARCHES if arch.id == "qwen2")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(the base's PRIME folder in a store, the adapter-only PRIME directory trained on it)."""
    reactor_core = pytest.importorskip("reactor_core")
    from reactor_testing import config_for, write_chat_data

    tmp = tmp_path_factory.mktemp("adapter-only")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JARVIS_PRIME_HOME", str(tmp / "base-store"))
        base = import_path(build_hf_model(QWEN2, tmp / "hf"), name="tiny-base", version="1.0.0").path
        vm = tmp / "vm"  # the launched VM's inputs: the base staged under its store folder's name
        shutil.copytree(base, vm / "model" / base.name)
        mp.chdir(vm)
        config = config_for(Path("model") / base.name, vm / "out", output_name="tiny-chat", merge_adapter=False,
                            max_steps=4, batch_size=4, max_seq_length=128, val_fraction=0.0, num_samples=0,
                            mixed_precision="fp32")
        adapter_only = reactor_core.Trainer(config, progress=False).train(write_chat_data(vm / "train.jsonl")).model_dir
    shutil.rmtree(vm / "model")
    return base, adapter_only


def test_an_adapter_only_directory_is_merged_onto_its_base_from_the_store(trained, tmp_path, monkeypatch):
    base, adapter_only = trained
    assert "model.safetensors" not in read_manifest(adapter_only).files  # what this test is about
    private_store(tmp_path / "store", monkeypatch, base)
    result = CliRunner().invoke(app, ["pull", "tiny-chat", "--from", str(adapter_only), "--version", "1.0.0"])
    assert result.exit_code == 0, result.output

    stored = models_root() / "tiny-chat-1.0.0"
    manifest = read_manifest(stored)
    verify_files(stored, manifest)
    assert {"model.safetensors", "config.json", "adapter/adapter_model.safetensors", "chat_template.jinja"} \
        <= set(manifest.files)
    assert manifest.lineage.source["merged_onto"] == {"path": str(models_root() / base.name), "name": "tiny-base",
                                                      "version": "1.0.0"}
    assert manifest.lineage.training_config["merge_adapter"] is False  # Reactor Core's story kept

    # the weights are peft's merge of this adapter onto this base, as Reactor Core merges
    from safetensors.torch import load_file

    from reactor_core.training.model import ModelSource
    from reactor_core.training.prime_dir import merged_model

    expected = merged_model(ModelSource("prime", str(base)), adapter_only / "adapter").state_dict()
    merged, original = load_file(stored / "model.safetensors"), load_file(base / "model.safetensors")
    assert merged.keys() == original.keys()
    assert all(merged[k].allclose(expected[k], atol=1e-6) for k in merged)
    assert any(not merged[k].equal(original[k]) for k in merged)  # the adapter changed the base

    model = PrimeModel.from_pretrained("tiny-chat")
    reply = model.complete(model.encode_chat([{"role": "user", "content": "Name color number 3."}]), max_new_tokens=4)
    assert reply.completion_tokens > 0
    model.close()


def test_without_its_base_here_the_error_names_it_and_the_store_is_untouched(trained, tmp_path, monkeypatch):
    _, adapter_only = trained
    folder = private_store(tmp_path / "store", monkeypatch)
    with pytest.raises(ModelNotAvailableError) as err:
        import_path(adapter_only, name="tiny-chat")
    message = str(err.value)
    assert "trained on tiny-base 1.0.0" in message and "`prime pull tiny-base`" in message
    assert "model/tiny-base-1.0.0" in message  # the recipe's model_name, as the VM had it
    assert unlocked(folder) == []  # no model, no staging folder


def test_another_model_under_the_bases_name_is_refused(trained, tmp_path, monkeypatch):
    _, adapter_only = trained
    folder = private_store(tmp_path / "store", monkeypatch)
    other = next(arch for arch in ARCHES if arch.id == "qwen3")
    import_path(build_hf_model(other, tmp_path / "other"), name="tiny-base", version="1.0.0")
    with pytest.raises(IntegrityError, match=r"model\.safetensors: sha256 .* records .* \(tiny-base 1\.0\.0\)"):
        import_path(adapter_only, name="tiny-chat")
    assert unlocked(folder) == ["tiny-base-1.0.0"]


def unlocked(folder: Path) -> list[str]:
    """The store folder's entries but its lock files (which stay, empty, by design)."""
    return sorted(p.name for p in folder.iterdir() if p.suffix != ".lock")
