"""Hub pulls trust nothing that arrives first (#19 item 14): a catalog source pins the
commit and the sha256 of every file it installs, and a real huggingface_hub download
from a loopback Hub (`loopback_hub.py`) that serves other bytes, another commit or an
extra file is refused before anything enters the store.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import save
from typer.testing import CliRunner

from jarvis_prime import IntegrityError, ModelNotAvailableError
from jarvis_prime.catalog import CatalogEntry, load_catalog
from jarvis_prime.cli import app
from jarvis_prime.store import index, models_root, pull

from loopback_hub import hub_for_tests

REPO = "me/tiny-hub"
NAME = "tiny-hub"
PINNED, MOVED = "1" * 40, "2" * 40
LICENSE_URL = f"https://huggingface.co/{REPO}/blob/main/LICENSE"


def repo_files(weights: np.ndarray) -> dict[str, bytes]:
    """A Hugging Face repository a pull installs: real safetensors, config, tokenizer config."""
    return {
        "config.json": json.dumps({"model_type": "llama", "max_position_embeddings": 64, "dtype": "float32"}).encode(),
        "model.safetensors": save({"model.embed_tokens.weight": weights}),
        "tokenizer_config.json": json.dumps({"eos_token": "</s>", "chat_template": "{{ messages }}"}).encode(),
    }


GOOD = repo_files(np.zeros((4, 8), dtype=np.float32))
OTHER = repo_files(np.ones((4, 8), dtype=np.float32))  # same names and sizes, other bytes


def sha256s(files: dict[str, bytes]) -> dict[str, str]:
    return {rel: hashlib.sha256(data).hexdigest() for rel, data in files.items()}


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A loopback Hub that huggingface_hub talks to (online for it, a fresh download
    cache); tests put repositories in `hub.repos` and read the requests in `hub.calls`."""
    with hub_for_tests(monkeypatch, tmp_path) as handler:
        yield handler
    shutil.rmtree(models_root() / f"{NAME}-1.0.0", ignore_errors=True)


@pytest.fixture
def catalog_with(monkeypatch):
    """Adds catalog entry NAME whose only source is REPO on the Hub, with `source`'s pins."""
    def add(source: dict) -> None:
        entry = CatalogEntry(name=NAME, version="1.0.0", task="chat", description="a loopback Hub model", base=REPO,
                             architecture="llama", parameters=32, context_length=64, license="MIT",
                             license_url=LICENSE_URL, ram_gb={},
                             sources=[{"kind": "hub", "repo_id": REPO, **source}])
        shipped = load_catalog()
        catalog = shipped.model_copy(update={"models": [*shipped.models, entry]})
        monkeypatch.setattr(index, "load_catalog", lambda: catalog)

    return add


def store_state() -> dict[str, str]:
    """Every file under the store (lock files aside), with its sha256."""
    return {p.relative_to(models_root()).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(models_root().rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def test_a_pinned_pull_installs_the_pinned_commit_not_the_branch(hub, catalog_with):
    hub.repos[REPO] = {PINNED: GOOD, MOVED: OTHER}  # `main` has moved on to other weights
    catalog_with({"revision": PINNED, "sha256": sha256s(GOOD)})
    local = pull(NAME, source="hub")
    assert (local.path / "model.safetensors").read_bytes() == GOOD["model.safetensors"]
    assert local.manifest.lineage.source["revision"] == PINNED
    assert f"GET /api/models/{REPO}/tree/{PINNED}" in hub.calls
    assert not any(MOVED in call or call.endswith("/main") for call in hub.calls), hub.calls


def test_a_hub_file_that_differs_from_the_catalog_sha256_is_refused_and_the_store_kept(hub, catalog_with, monkeypatch,
                                                                                      tmp_path):
    import huggingface_hub.constants as constants

    hub.repos[REPO] = {PINNED: GOOD}
    catalog_with({"revision": PINNED, "sha256": sha256s(GOOD)})
    pull(NAME, source="hub")
    before = store_state()

    hub.repos[REPO] = {PINNED: OTHER}  # the Hub now answers the pinned commit with other bytes
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "fresh-cache"))
    result = CliRunner().invoke(app, ["pull", NAME, "--source", "hub", "--force"], env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    expected, actual = sha256s(GOOD)["model.safetensors"], sha256s(OTHER)["model.safetensors"]
    assert f"model.safetensors: sha256 {actual}, the catalog expects {expected}" in " ".join(result.output.split())
    assert store_state() == before  # the copy pulled before is whole, nothing partial left


def test_a_branch_that_moved_to_other_bytes_fails_the_pinned_sha256(hub, catalog_with):
    hub.repos[REPO] = {PINNED: GOOD, MOVED: OTHER}
    catalog_with({"sha256": sha256s(GOOD)})  # hashes pinned, revision not: `main` is asked for
    with pytest.raises(IntegrityError, match=f"{REPO}@{MOVED}: model.safetensors: sha256 .*, the catalog expects"):
        pull(NAME, source="hub")
    assert not (models_root() / f"{NAME}-1.0.0").exists()


def test_a_pinned_revision_the_hub_lacks_is_an_error_naming_it(hub, catalog_with):
    hub.repos[REPO] = {MOVED: OTHER}
    catalog_with({"revision": PINNED})
    with pytest.raises(ModelNotAvailableError, match=f"could not download {REPO} at {PINNED}.*RevisionNotFound"):
        pull(NAME, source="hub")
    assert not (models_root() / f"{NAME}-1.0.0").exists()


def test_a_downloaded_file_the_catalog_does_not_pin_is_refused(hub, catalog_with):
    extra = GOOD | {"extra.safetensors": save({"w": np.ones(2, dtype=np.float32)})}
    hub.repos[REPO] = {PINNED: extra}
    catalog_with({"revision": PINNED, "sha256": sha256s(GOOD)})
    with pytest.raises(IntegrityError, match="extra.safetensors not pinned by the catalog's sha256"):
        pull(NAME, source="hub")
    assert not (models_root() / f"{NAME}-1.0.0").exists()


@pytest.mark.parametrize("source, field", [({"revision": "main"}, "revision"),
                                           ({"sha256": {"config.json": "abc"}}, "sha256.config.json")])
def test_the_catalog_takes_only_a_commit_sha_and_full_sha256(source, field):
    from jarvis_prime.catalog import parse_catalog
    from jarvis_prime.errors import PrimeError

    entry = {"name": "m", "version": "1", "task": "chat", "description": "", "base": "b", "architecture": "llama",
             "parameters": 1, "context_length": 8, "license": "MIT", "license_url": LICENSE_URL, "ram_gb": {},
             "sources": [{"kind": "hub", "repo_id": REPO, **source}]}
    with pytest.raises(PrimeError, match=f"field models.0.sources.0.hub.{field}: String should match pattern"):
        parse_catalog(json.dumps({"schema_version": 1, "models": [entry]}), "catalog.json")


def test_an_unpinned_pull_records_the_commit_that_arrived_and_the_license_in_prime_json_and_the_card(hub, catalog_with):
    from jarvis_prime.publish import model_card

    hub.repos[REPO] = {PINNED: GOOD, MOVED: OTHER}
    catalog_with({})  # follows `main`, as the shipped seed entries do
    local = pull(NAME, source="hub")
    assert local.manifest.lineage.source == {"kind": "hub", "repo_id": REPO, "revision": MOVED, "requested": "main"}
    recorded = json.loads((local.path / "prime.json").read_text())
    assert (recorded["license"], recorded["license_url"]) == ("MIT", LICENSE_URL)
    card = model_card(local.manifest)
    assert f"license: mit\nlicense_link: {LICENSE_URL}\n" in card
    assert f"MIT ({LICENSE_URL}), the license of the base model `{REPO}` at commit `{MOVED}`." in card


def test_a_gated_repo_says_which_repo_how_to_log_in_and_which_license_to_accept(hub, catalog_with, monkeypatch):
    """The Hub answers a gated repository 401 without a token and 403 with a token whose
    account has not accepted the license; huggingface_hub calls the first "Repository
    Not Found". Both must tell the user what to do; nothing enters the store."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", "/nonexistent/token")  # no token a login saved here
    hub.repos[REPO] = {PINNED: GOOD}
    hub.gated = {REPO}
    catalog_with({})
    for token, status in ((None, 401), ("hf_not_accepted", 403)):
        if token:
            monkeypatch.setenv("HF_TOKEN", token)
        with pytest.raises(ModelNotAvailableError) as err:
            pull(NAME, source="hub")
        message = str(err.value)
        assert f"{REPO}: the Hugging Face Hub refused the download (HTTP {status})" in message
        assert "gated or private" in message and f"accept its license at {LICENSE_URL}" in message
        assert "set HF_TOKEN" in message and "huggingface-cli login" in message
        assert not (models_root() / f"{NAME}-1.0.0").exists()
    hub.accepted = {"Bearer hf_accepted"}
    monkeypatch.setenv("HF_TOKEN", "hf_accepted")
    assert (pull(NAME, source="hub").path / "model.safetensors").read_bytes() == GOOD["model.safetensors"]


def test_the_cli_prints_the_gated_repo_advice(hub, catalog_with, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", "/nonexistent/token")
    hub.repos[REPO] = {PINNED: GOOD}
    hub.gated = {REPO}
    catalog_with({})
    result = CliRunner().invoke(app, ["pull", NAME, "--source", "hub"], env={"COLUMNS": "200"})
    assert result.exit_code == 1
    output = " ".join(result.output.split())
    assert "HTTP 401" in output and "HF_TOKEN" in output and LICENSE_URL in output
