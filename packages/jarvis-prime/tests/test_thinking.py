"""Reasoning and answer apart (`jarvis_prime.thinking`): whole replies, streams cut anywhere,
a start marker the template wrote, a reply cut off while thinking; and the markers in the
PRIME contract (prime.json, the catalog)."""

from __future__ import annotations

import json

import pytest

from jarvis_prime.catalog import load_catalog, parse_catalog
from jarvis_prime.errors import ManifestError, PrimeError
from jarvis_prime.manifest import PrimeManifest, read_manifest
from jarvis_prime.thinking import ReasoningSplitter, ThinkingMarkers, opens_thinking, split_reasoning

THINK = ThinkingMarkers(start="<think>", end="</think>")
REPLY = "<think>\nFirst, 17 has no divisor but 1 and itself.\nSo it is prime.\n</think>\n\nYes, 17 is prime."
REASONING, ANSWER = "First, 17 has no divisor but 1 and itself.\nSo it is prime.", "Yes, 17 is prime."


def streamed(text: str, cut: int, markers: ThinkingMarkers = THINK, opened: bool = False) -> tuple[str, str, bool]:
    """`text` fed `cut` characters at a time: (reasoning, answer, still thinking at the end)."""
    splitter = ReasoningSplitter(markers, opened)
    reasoning = content = ""
    for i in range(0, len(text), cut):
        parts = splitter.feed(text[i:i + cut])
        reasoning, content = reasoning + parts.reasoning, content + parts.content
    last = splitter.flush()
    return reasoning + last.reasoning, content + last.content, splitter.truncated


def test_a_whole_reply_splits_into_reasoning_and_answer():
    split = split_reasoning(REPLY, THINK)
    assert (split.reasoning, split.content, split.truncated) == (REASONING, ANSWER, False)


@pytest.mark.parametrize("cut", range(1, 12))
def test_a_stream_cut_anywhere_splits_as_the_whole_reply(cut):
    """Markers cut across pieces (`<th` + `ink>`, `</thi` + `nk>`) are held back, never leaked."""
    assert streamed(REPLY, cut) == (REASONING, ANSWER, False)


def test_nothing_that_may_still_be_a_marker_is_handed_out():
    splitter = ReasoningSplitter(THINK)
    assert splitter.feed("<thi").reasoning == "" and splitter.feed("nk>Let me see </th").reasoning == "Let me see"
    parts = splitter.feed("ink>\n\nSeven")
    assert (parts.reasoning, parts.content) == ("", "Seven")


def test_a_start_marker_opened_by_the_template_still_splits_on_the_end_marker():
    """Qwen3-style templates may end the prompt with `<think>\\n`: the reply holds only `</think>`."""
    reply = "The user asks for 2+2. That is 4.\n</think>\n\n2 + 2 = 4."
    split = split_reasoning(reply, THINK, opened=True)
    assert (split.reasoning, split.content) == ("The user asks for 2+2. That is 4.", "2 + 2 = 4.")
    for cut in (1, 3, 7):
        assert streamed(reply, cut, opened=True)[:2] == (split.reasoning, split.content)
    assert opens_thinking("<|im_start|>assistant\n<think>\n", THINK)
    assert not opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n", THINK)  # thinking switched off
    assert not opens_thinking("<|im_start|>assistant\n", THINK)


def test_a_reply_without_an_end_marker_is_all_reasoning_and_says_it_was_cut_off():
    split = split_reasoning("<think>\nStep one: list the primes below 20. Step two", THINK)
    assert split.reasoning == "Step one: list the primes below 20. Step two"
    assert split.content == "" and split.truncated
    assert streamed("<think>\nStep one: list the primes", 4) == ("Step one: list the primes", "", True)


def test_a_reply_that_does_not_think_is_all_answer():
    split = split_reasoning("Paris is the capital of France.", THINK)
    assert (split.reasoning, split.content, split.truncated) == (None, "Paris is the capital of France.", False)
    empty = split_reasoning("<think>\n\n</think>\n\nParis.", THINK)  # thinking switched off in the template's way
    assert (empty.reasoning, empty.content) == ("", "Paris.")


def test_other_markers_work_the_same():
    markers = ThinkingMarkers(start="[THINK]", end="[/THINK]")
    assert streamed("[THINK]a < b[/THINK]b", 2, markers) == ("a < b", "b", False)


def test_markers_are_checked_where_they_are_written(tmp_path):
    with pytest.raises(ValueError, match="must differ"):
        ThinkingMarkers(start="<t>", end="<t>")
    with pytest.raises(ValueError):
        ThinkingMarkers(start="", end="</think>")
    manifest = PrimeManifest(name="m", version="1", task="reasoning", base="b", context_length=8,
                             thinking={"start": "<think>", "end": "</think>"})
    assert manifest.thinking == THINK and PrimeManifest(name="m", version="1", task="chat", base="b",
                                                        context_length=8).thinking is None
    (tmp_path / "prime.json").write_text(json.dumps(manifest.model_dump(mode="json") | {"thinking": {"start": "<t>"}}))
    with pytest.raises(ManifestError, match=r"prime.json: field thinking.end"):
        read_manifest(tmp_path)
    catalog = {"schema_version": 1, "models": [load_catalog().get("prime-13b-reasoning-v1").model_dump(mode="json")
                                               | {"thinking": {"start": "<think>", "end": "</think>", "x": 1}}]}
    with pytest.raises(PrimeError, match=r"catalog.json: field models.0.thinking.x"):
        parse_catalog(json.dumps(catalog), "catalog.json")


def test_the_reasoning_model_in_the_catalog_names_its_markers():
    """prime-13b-reasoning-v1 is Qwen3-14B, which thinks between <think> and </think>; a pull
    copies them into prime.json (`store.builders.entry_manifest`)."""
    from jarvis_prime.store.builders import entry_manifest

    entry = load_catalog().get("prime-13b-reasoning-v1")
    assert entry.task == "reasoning" and entry.base == "Qwen/Qwen3-14B" and entry.thinking == THINK
    assert entry_manifest(entry, {}).thinking == THINK
    assert all(m.thinking is None for m in load_catalog().models if m.task != "reasoning")


def test_on_a_16gb_mac_the_14b_reasoning_model_says_before_loading_it_will_be_slow_and_at_which_quantization(
        monkeypatch, tmp_path, caplog):
    """prime-13b-reasoning-v1 as pulled (Qwen3-14B: bf16 safetensors, sizes only, nothing to load) on a
    simulated 16 GB M1 with 8 GB free: quantization=None picks 4bit (q4_k_m), the smallest, and
    warns before anything is exported or loaded."""
    import jarvis_prime.export
    from jarvis_prime import PrimeModel
    from jarvis_prime.hardware import Hardware, Libraries
    from jarvis_prime.manifest import FileEntry, Quantization, write_manifest
    from jarvis_prime.models import prime_model
    from jarvis_prime.store import models_root
    from jarvis_prime.store.builders import entry_manifest

    monkeypatch.setenv("JARVIS_PRIME_HOME", str(tmp_path / "prime"))
    gib = 2**30
    entry = load_catalog().get("prime-13b-reasoning-v1")
    folder = models_root() / f"{entry.name}-{entry.version}"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": 40, "num_attention_heads": 40,
                                                    "num_key_value_heads": 8, "head_dim": 128, "hidden_size": 5120}))
    size = 2 * entry.parameters  # bf16
    files = {f"model-0000{i}-of-00002.safetensors": FileEntry(sha256="0" * 64, bytes=size // 2) for i in (1, 2)}
    manifest = entry_manifest(entry, {"kind": "hub"}).model_copy(update={
        "files": files, "quantizations": {"bf16": Quantization(file="model.safetensors.index.json",
                                                               format="safetensors", bits=16)}})
    write_manifest(folder, manifest, changed=["config.json"])
    mac = Hardware("Darwin", "arm64", apple_silicon=True, nvidia_driver=False, memory_total=16 * gib,
                   memory_available=8 * gib)
    monkeypatch.setattr(prime_model, "detect_hardware", lambda: mac)
    monkeypatch.setattr(prime_model, "detect_libraries",
                        lambda: Libraries(llama_cpp=True, transformers=True, bitsandbytes=False, llama_gpu_offload=True))

    class Stop(Exception):
        pass

    def no_export(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(jarvis_prime.export, "export_gguf", no_export)
    with caplog.at_level("WARNING", logger="jarvis_prime"), pytest.raises(Stop):
        PrimeModel.from_pretrained(entry.name)
    (warning,) = [r.getMessage() for r in caplog.records if "slow" in r.getMessage()]
    assert warning.startswith("prime-13b-reasoning-v1 will be slow here at 4bit (q4_k_m): needs 9.")
    assert "8.0 GiB free of 16.0 GiB unified memory: it will load but page other memory out (swap)" in warning
    assert entry.apple_silicon_fit("4bit") == 16 and entry.apple_silicon_fit("8bit") == 24  # what `prime list` says
