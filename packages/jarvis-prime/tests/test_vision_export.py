"""prime-7b-vision-v1 end to end without the network (issue #20): a tiny random model of its
architecture (Idefics3 / SmolVLM, tiny_vision.py) served under the catalog's repository id by
a loopback Hub -> `prime pull` (every processor file) -> `prime info` verifies -> `prime
export` (text GGUFs and the projector through llama.cpp's converter) -> loaded on llama.cpp
and transformers -> an image question answered on both. Random weights: the tests assert an
answer comes back and that both backends took the image in, not what it shows.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from jarvis_prime import PrimeModel
from jarvis_prime.catalog import HubSource, load_catalog
from jarvis_prime.cli import app
from jarvis_prime.errors import ExportError
from jarvis_prime.manifest import matching_gguf, read_manifest, verify_files
from jarvis_prime.store import materialize_vision_model, models_root, pull

from loopback_hub import LoopbackHub, running
from tiny_vision import CHAT_TEMPLATE, png_bytes, tiny_vision

NAME = "prime-7b-vision-v1"
COMMIT = "7" * 40
QUESTION = "What is in the picture?"


def hub_repository(hf_dir: Path) -> dict[str, bytes]:
    """The tiny model's files as SmolVLM's repository lays them out: the chat template in
    chat_template.json, config.json as transformers saves an Idefics3 model (no text model
    class: the converter view must add it), plus files a pull must leave on the Hub."""
    files = {p.name: p.read_bytes() for p in hf_dir.iterdir() if p.is_file()}
    config = json.loads(files["config.json"])
    config["text_config"].pop("architectures", None)
    files["config.json"] = json.dumps(config).encode()
    files.pop("chat_template.jinja", None)
    files["chat_template.json"] = json.dumps({"chat_template": CHAT_TEMPLATE}).encode()
    files["README.md"] = b"# a model card"
    files["pytorch_model.bin"] = b"a pickle: never downloaded"
    return files


@pytest.fixture(scope="module")
def hub_repo_id() -> str:
    entry = load_catalog().get(NAME)
    return next(s.repo_id for s in entry.sources if isinstance(s, HubSource))


@pytest.fixture(scope="module")
def pulled(tmp_path_factory, hub_repo_id):
    """`prime pull prime-7b-vision-v1 --source hub` from the loopback Hub; yields (model dir, hub calls)."""
    import huggingface_hub.constants as constants

    built = tiny_vision(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("vision-hub")
    handler = type("Hub", (LoopbackHub,), {"root": tmp / "uploads", "calls": [],
                                           "repos": {hub_repo_id: {COMMIT: hub_repository(built.hf_dir)}}})
    with running(handler) as endpoint, pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_OFFLINE", False)  # the session is offline; loopback is fine
        mp.setattr(constants, "ENDPOINT", endpoint)
        mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        mp.setattr(constants, "HF_HUB_CACHE", str(tmp / "hf-cache"))
        result = CliRunner().invoke(app, ["pull", NAME, "--source", "hub"])
        assert result.exit_code == 0, result.output
    yield models_root() / f"{NAME}-1.0.0", handler.calls
    shutil.rmtree(models_root() / f"{NAME}-1.0.0", ignore_errors=True)


@pytest.fixture(scope="module")
def exported(pulled):
    model_dir, _ = pulled
    result = CliRunner().invoke(app, ["export", NAME, "--quant", "f16,q8_0,q4_k_m"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return model_dir, result.output


def test_pull_installs_every_processor_file_and_nothing_else(pulled):
    model_dir, calls = pulled
    manifest = read_manifest(model_dir)
    for rel in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
                "preprocessor_config.json", "processor_config.json", "chat_template.jinja"):
        assert rel in manifest.files, rel
    assert (model_dir / "chat_template.jinja").read_text() == CHAT_TEMPLATE  # from chat_template.json
    assert manifest.chat_template == "chat_template.json"
    assert not any(p.name in ("README.md", "pytorch_model.bin", "chat_template.json") for p in model_dir.iterdir())
    assert not any(c.endswith(("/README.md", "/pytorch_model.bin")) and c.startswith("GET") for c in calls)
    assert (manifest.task, manifest.architecture, manifest.stop) == ("vision", "idefics3", ["<end_of_utterance>"])
    assert manifest.context_length == 1024  # text_config.max_position_embeddings of the tiny model
    # unpinned in the catalog: the pull records the commit that arrived and what it asked for
    assert manifest.lineage.source == {"kind": "hub", "repo_id": load_catalog().get(NAME).sources[0].repo_id,
                                       "revision": COMMIT, "requested": "main"}


def test_export_writes_text_and_projector_ggufs_each_text_file_naming_its_projector(exported):
    import gguf

    model_dir, output = exported
    manifest = read_manifest(model_dir)
    projector = {q: f"gguf/mmproj-{NAME}-{q}.gguf" for q in ("f16", "q8_0")}
    assert {q: manifest.quantizations[q].mmproj for q in ("f16", "q8_0", "q4_k_m")} == {
        "f16": projector["f16"], "q8_0": projector["q8_0"], "q4_k_m": projector["q8_0"]}
    verify_files(model_dir, manifest)  # every file, text GGUFs and projectors, listed with its sha256
    assert set(projector.values()) <= set(manifest.files)
    for quant, rel in projector.items():
        fields = gguf.GGUFReader(model_dir / rel).fields
        assert fields["clip.projector_type"].contents() == "idefics3"
        types = {t.tensor_type.name for t in gguf.GGUFReader(model_dir / rel).tensors}
        assert ("Q8_0" in types) == (quant == "q8_0")
    text = gguf.GGUFReader(model_dir / manifest.quantizations["f16"].file)
    assert text.fields["general.architecture"].contents() == "llama"
    assert text.fields["tokenizer.chat_template"].contents() == (model_dir / "chat_template.jinja").read_text()
    assert "<image>" in [text.fields["tokenizer.ggml.tokens"].contents(i)
                         for i in range(len(text.fields["tokenizer.ggml.tokens"].data))]
    # the 4-bit text file is rounded with an importance matrix measured on the text model alone
    assert manifest.quantizations["q4_k_m"].importance["tokens"] > 1000
    assert "imatrix" in next(line for line in output.splitlines() if "q4_k_m.gguf" in line)
    sizes = {q: manifest.files[manifest.quantizations[q].file].bytes for q in ("f16", "q8_0", "q4_k_m")}
    assert sizes["q4_k_m"] < sizes["q8_0"] < sizes["f16"]
    assert all(rel in output for rel in projector.values())  # `prime export` lists the projectors it wrote
    print(f"\n{output}")


def test_a_projector_is_never_taken_for_a_text_model(exported):
    model_dir, _ = exported
    manifest = read_manifest(model_dir)
    assert matching_gguf(manifest, "8bit") == "q8_0" and matching_gguf(manifest, "4bit") == "q4_k_m"
    assert matching_gguf(manifest, None) == "f16"
    listed = json.loads(CliRunner().invoke(app, ["list", "--json"]).output)
    record = next(m for m in listed if m["name"] == NAME)
    assert not any("mmproj" in manifest.quantizations[v].file for v in record["variants"])
    info = CliRunner().invoke(app, ["info", NAME], env={"COLUMNS": "250"})
    assert info.exit_code == 0, info.output
    for rel in (f"gguf/mmproj-{NAME}-f16.gguf", f"gguf/mmproj-{NAME}-q8_0.gguf"):
        line = next(line for line in info.output.splitlines() if rel in line)
        assert "verified" in line  # the integrity check lists the projector like every weight file


@pytest.mark.parametrize("quantization", ["8bit", "4bit", None])
def test_llama_cpp_answers_an_image_question_with_the_matching_projector(exported, quantization, tmp_path):
    model_dir, _ = exported
    (tmp_path / "photo.png").write_bytes(png_bytes(3))
    with PrimeModel.from_pretrained(NAME, quantization=quantization, backend="llamacpp", device="cpu") as model:
        manifest = read_manifest(model_dir)
        quant = matching_gguf(manifest, quantization)
        assert model.runtime.weights == manifest.quantizations[quant].file
        assert model.runtime.mmproj == manifest.quantizations[quant].mmproj and model.sees_images
        messages = [{"role": "user", "content": [{"type": "image", "image": tmp_path / "photo.png"},
                                                 {"type": "text", "text": QUESTION}]}]
        answer = model.chat(messages, max_new_tokens=5)
        assert isinstance(answer, str) and answer.strip()
        with_image = model.encode_chat(messages)
        text_only = model.encode_chat([{"role": "user", "content": QUESTION}])
        assert with_image.media is not None and len(with_image.ids) >= len(text_only.ids) + 5 * 4  # tiles' embeddings


def test_transformers_answers_the_same_image_question(exported, tmp_path):
    pytest.importorskip("transformers")
    (tmp_path / "photo.png").write_bytes(png_bytes(3))
    with PrimeModel.from_pretrained(NAME, backend="transformers", device="cpu") as model:
        assert model.runtime.backend == "transformers" and model.sees_images
        messages = [{"role": "user", "content": [{"type": "image", "image": tmp_path / "photo.png"},
                                                 {"type": "text", "text": QUESTION}]}]
        answer = model.chat(messages, max_new_tokens=5)
        assert isinstance(answer, str) and answer.strip()
        image_token = model._backend.tokenizer.convert_tokens_to_ids("<image>")
        assert model.encode_chat(messages).ids.count(image_token) >= 5 * 4  # the processor expanded the image


def test_eval_reports_every_variant_in_one_table_and_json(exported, tmp_path):
    """`prime eval --quant all`: each GGUF on llama.cpp and the safetensors on transformers."""
    from jarvis_prime.recipes import vision_data

    model_dir, _ = exported
    vision_data.write_split(tmp_path, "heldout", 3, seed=0)
    data = next(tmp_path.glob("*.jsonl"))
    result = CliRunner().invoke(app, ["eval", NAME, "--quant", "all", "--suite", "vqa", "--vqa-data", str(data),
                                      "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    manifest = read_manifest(model_dir)
    assert list(report["variants"]) == sorted(manifest.quantizations, key=lambda q: (-manifest.quantizations[q].bits, q))
    for variant, scores in report["variants"].items():
        expected = "transformers" if manifest.quantizations[variant].format == "safetensors" else "llamacpp"
        assert scores["backend"] == expected and 0.0 <= scores["vqa"]["score"] <= 1.0 and "cases" not in scores["vqa"]
        assert read_manifest(model_dir).metrics["eval"][variant]["vqa"]["suite"] == scores["vqa"]["suite"]
    table = CliRunner().invoke(app, ["eval", NAME, "--quant", "all", "--suite", "vqa", "--vqa-data", str(data),
                                     "--no-save"], env={"COLUMNS": "250"})
    assert table.exit_code == 0, table.output
    rows = [line for line in table.output.splitlines() if line.strip().startswith(tuple(manifest.quantizations))]
    assert len(rows) == len(manifest.quantizations)


def test_materialize_vision_model_builds_the_whole_prime_directory(tmp_path_factory, tmp_path):
    """What the store calls for a shipped vision model: HF folder in, runnable PRIME model out."""
    built = tiny_vision(tmp_path_factory)
    src = tmp_path / "hf"
    src.mkdir()
    for rel, data in hub_repository(built.hf_dir).items():
        if not rel.endswith((".md", ".bin")):
            (src / rel).write_bytes(data)
    local = materialize_vision_model(src, name="tiny-shipped-vision", version="0.1.0", quants=("f16", "q8_0"))
    try:
        manifest = local.manifest
        assert local.path == models_root() / "tiny-shipped-vision-0.1.0" and manifest.task == "vision"
        assert manifest.quantizations["q8_0"].mmproj == "gguf/mmproj-tiny-shipped-vision-q8_0.gguf"
        verify_files(local.path, manifest)
        assert not list(local.path.glob(".*")) and not list(models_root().glob(".tiny-shipped-vision-0.1.0.partial-*"))
        with PrimeModel.from_pretrained("tiny-shipped-vision", quantization="8bit", backend="llamacpp") as model:
            assert model.chat([{"role": "user", "content": [{"type": "image", "image": png_bytes(1)},
                                                            {"type": "text", "text": QUESTION}]}],
                              max_new_tokens=3).strip()
    finally:
        shutil.rmtree(local.path, ignore_errors=True)


def test_a_missing_converter_says_how_to_get_one_and_writes_nothing(pulled, monkeypatch, tmp_path):
    from jarvis_prime.export import export_gguf

    model_dir, _ = pulled
    copy = tmp_path / model_dir.name
    shutil.copytree(model_dir, copy)
    before = sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*"))
    monkeypatch.delenv("LLAMA_CPP_CONVERT_HF", raising=False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "no-venv"))
    with pytest.raises(ExportError, match=r"make llama-cpp-converter.*LLAMA_CPP_CONVERT_HF"):
        export_gguf(copy, ["f16", "q8_0"], progress=False, force=True)
    monkeypatch.setenv("LLAMA_CPP_CONVERT_HF", str(tmp_path / "nowhere.py"))
    with pytest.raises(ExportError, match=r"LLAMA_CPP_CONVERT_HF=.*nowhere.py: no such file"):
        export_gguf(copy, ["f16"], progress=False, force=True)
    assert sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*")) == before


def test_a_failing_converter_shows_the_tail_of_its_log(pulled, monkeypatch, tmp_path):
    """A real child process that fails (a stand-in converter script: the real one failing on cue
    would need a model it cannot read): the error carries its last lines and exit code."""
    from jarvis_prime.export import export_gguf

    model_dir, _ = pulled
    copy = tmp_path / model_dir.name
    shutil.copytree(model_dir, copy)
    before = {p.relative_to(copy).as_posix(): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    script = tmp_path / "convert_hf_to_gguf.py"
    script.write_text("import sys\nprint('loading model parts')\nprint('KeyError: vision_model.post_layernorm', "
                      "file=sys.stderr)\nsys.exit(3)\n")
    monkeypatch.setenv("LLAMA_CPP_CONVERT_HF", str(script))
    with pytest.raises(ExportError, match=r"(?s)could not write the f16 text model GGUF of prime-7b-vision-v1 "
                                          r"\(exit code 3\).*loading model parts.*KeyError: vision_model"):
        export_gguf(copy, ["f16"], progress=False, force=True)
    assert {p.relative_to(copy).as_posix(): p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before


def test_from_pretrained_8bit_exports_the_text_file_and_its_projector_on_first_use(pulled, tmp_path):
    """A pulled vision model with no GGUF yet: `quantization="8bit"` on llama.cpp exports
    q8_0 and its projector once, and the model it loads sees images."""
    from jarvis_prime.manifest import write_manifest

    model_dir, _ = pulled
    copy = tmp_path / model_dir.name
    shutil.copytree(model_dir, copy)
    shutil.rmtree(copy / "gguf", ignore_errors=True)
    manifest = read_manifest(copy)
    manifest = manifest.model_copy(update={
        "quantizations": {n: q for n, q in manifest.quantizations.items() if q.format != "gguf"},
        "files": {rel: e for rel, e in manifest.files.items() if not rel.startswith("gguf/")}})
    write_manifest(copy, manifest, changed=[])
    with PrimeModel.from_pretrained(copy, quantization="8bit", backend="llamacpp", device="cpu") as model:
        assert model.runtime.weights == f"gguf/{NAME}-q8_0.gguf"
        assert model.runtime.mmproj == f"gguf/mmproj-{NAME}-q8_0.gguf" and model.sees_images
        assert model.chat([{"role": "user", "content": [{"type": "image", "image": png_bytes(2)},
                                                        {"type": "text", "text": QUESTION}]}], max_new_tokens=3).strip()
    verify_files(copy, read_manifest(copy))
