"""The quantization matrix: every (hardware, libraries, request) cell picks or refuses."""

import re

import pytest

from jarvis_prime.errors import BackendUnavailableError, InsufficientMemoryError
from jarvis_prime.hardware import Hardware, Libraries
from jarvis_prime.manifest import FileEntry, PrimeManifest, Quantization, matching_gguf
from jarvis_prime.models.selection import plan_runtime

CPU = Hardware("Linux", "x86_64", apple_silicon=False, nvidia_driver=False)
CUDA = Hardware("Linux", "x86_64", apple_silicon=False, nvidia_driver=True, cuda_usable=True)
CPU_TORCH_ON_GPU_BOX = Hardware("Linux", "x86_64", apple_silicon=False, nvidia_driver=True, cuda_usable=False)
MAC = Hardware("Darwin", "arm64", apple_silicon=True, nvidia_driver=False)
ALL = Libraries(llama_cpp=True, transformers=True, bitsandbytes=True, llama_gpu_offload=True)
NO_BNB = Libraries(llama_cpp=True, transformers=True, bitsandbytes=False)


def manifest(*ggufs: str, safetensors: bool = True, architecture: str | None = None) -> PrimeManifest:
    quants = {q: Quantization(file=f"gguf/m-{q}.gguf", format="gguf", bits={"q8_0": 8, "f16": 16}.get(q, 4)) for q in ggufs}
    if safetensors:
        quants["f32"] = Quantization(file="model.safetensors", format="safetensors", bits=32)
    return PrimeManifest(name="m", version="1", task="chat", base="b", context_length=8, quantizations=quants,
                         architecture=architecture)


def plan(m, hw=CPU, libs=ALL, **kw):
    return plan_runtime(m, hardware=hw, libraries=libs, **kw)


def test_cpu_prefers_llamacpp_on_a_matching_gguf():
    m = manifest("q4_1", "q8_0", "f16")
    assert plan(m).weights == "gguf/m-f16.gguf"  # None: the most precise GGUF
    assert plan(m, quantization="8bit").weights == "gguf/m-q8_0.gguf"
    four = plan(m, quantization="4bit")
    assert (four.backend, four.device, four.weights) == ("llamacpp", "cpu", "gguf/m-q4_1.gguf")


def test_prefers_k_quants_among_4bit_files():
    assert matching_gguf(manifest("q4_1", "q4_k_m", "q4_0"), "4bit") == "q4_k_m"


def test_cpu_without_matching_gguf_uses_transformers_and_says_why():
    runtime = plan(manifest("q4_1"), quantization="8bit")
    assert (runtime.backend, runtime.quantization, runtime.weights) == ("transformers", "8bit", "model.safetensors")
    assert "no 8bit GGUF" in runtime.reason
    with pytest.raises(BackendUnavailableError, match="bitsandbytes"):
        plan(manifest("q4_1"), libs=NO_BNB, quantization="8bit")


def test_cpu_exports_q8_0_and_q4_k_m_on_first_use_when_the_model_can_be_exported():
    m = manifest("q4_1", architecture="llama")
    eight, four = plan(m, quantization="8bit"), plan(m, quantization="4bit")
    assert (eight.backend, eight.weights, eight.export) == ("llamacpp", "gguf/m-q8_0.gguf", "q8_0")
    assert (four.backend, four.weights, four.export) == ("llamacpp", "gguf/m-q4_k_m.gguf", "q4_k_m")
    assert "exported from the safetensors on first use" in eight.reason
    assert plan(m).export is None  # None: what the model ships (q4_1), nothing to export
    assert plan(manifest("q4_k_m", architecture="llama"), quantization="4bit").export is None  # already there
    # transformers + bitsandbytes on the CPU stays one explicit request away
    explicit = plan(m, quantization="8bit", backend="transformers")
    assert (explicit.backend, explicit.quantization, explicit.export) == ("transformers", "8bit", None)
    # an architecture the exporter does not know falls back as before
    assert plan(manifest("q4_1", architecture="gpt2"), quantization="8bit").backend == "transformers"
    mac = plan(m, hw=MAC, quantization="8bit")
    assert (mac.backend, mac.device, mac.export) == ("llamacpp", "mps", "q8_0")


def test_cuda_goes_to_transformers_with_bitsandbytes():
    for quant in (None, "8bit", "4bit"):
        runtime = plan(manifest("q4_1", "q8_0"), hw=CUDA, quantization=quant)
        assert (runtime.backend, runtime.device, runtime.quantization) == ("transformers", "cuda", quant)


def test_apple_silicon_runs_gguf_with_metal_and_refuses_bitsandbytes():
    runtime = plan(manifest("q4_k_m"), hw=MAC, quantization="4bit")
    assert (runtime.backend, runtime.device) == ("llamacpp", "mps")
    with pytest.raises(BackendUnavailableError, match="does not run on Apple MPS"):
        plan(manifest("q4_k_m"), hw=MAC, quantization="8bit", backend="transformers")


def test_explicit_requests_that_cannot_work_are_errors_not_fallbacks():
    with pytest.raises(BackendUnavailableError, match=r"no 8bit GGUF .*GGUF files: q4_1"):
        plan(manifest("q4_1"), backend="llamacpp", quantization="8bit")
    with pytest.raises(BackendUnavailableError, match="no safetensors weights"):
        plan(manifest("q4_1", safetensors=False), backend="transformers")
    with pytest.raises(BackendUnavailableError, match="needs llama-cpp-python"):
        plan(manifest("q4_1"), libs=Libraries(False, True, True), backend="llamacpp")
    with pytest.raises(BackendUnavailableError, match=r"jarvis-prime\[transformers\]"):
        plan(manifest("q4_1"), libs=Libraries(True, False, False), quantization="8bit")
    with pytest.raises(BackendUnavailableError, match="no NVIDIA driver"):
        plan(manifest("q4_1"), device="cuda")


@pytest.mark.parametrize("kwargs, field", [
    ({"quantization": "3bit"}, "quantization"), ({"device": "tpu"}, "device"), ({"backend": "vllm"}, "backend"),
])
def test_bad_values_name_the_argument(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}` must be"):
        plan(manifest("q4_1"), **kwargs)


def test_gpu_box_without_gpu_builds_runs_on_the_cpu_and_says_so():
    plain = Libraries(llama_cpp=True, transformers=True, bitsandbytes=False, llama_gpu_offload=False)
    runtime = plan(manifest("q4_1"), hw=CPU_TORCH_ON_GPU_BOX, libs=plain)
    assert (runtime.backend, runtime.device) == ("llamacpp", "cpu")
    mac = plan(manifest("q4_1"), hw=MAC, libs=plain)
    assert (mac.device, "no GPU offload" in mac.reason) == ("cpu", True)


# -- memory: simulated machines and 7B / 14B-shaped models (sizes, no weights) ---------------

GiB = 2**30
M1_16GB = Hardware("Darwin", "arm64", apple_silicon=True, nvidia_driver=False,
                   memory_total=16 * GiB, memory_available=11 * GiB)  # a 16 GB M1 with a browser open
M1_8GB = Hardware("Darwin", "arm64", apple_silicon=True, nvidia_driver=False,
                  memory_total=8 * GiB, memory_available=5 * GiB)
CPU_32GB = Hardware("Linux", "x86_64", apple_silicon=False, nvidia_driver=False,
                    memory_total=32 * GiB, memory_available=20 * GiB)
CUDA_24GB = Hardware("Linux", "x86_64", apple_silicon=False, nvidia_driver=True, cuda_usable=True,
                     memory_total=64 * GiB, memory_available=60 * GiB,
                     gpu_memory_total=24 * GiB, gpu_memory_available=23 * GiB)
CUDA_12GB = Hardware("Linux", "x86_64", apple_silicon=False, nvidia_driver=True, cuda_usable=True,
                     memory_total=64 * GiB, memory_available=60 * GiB,
                     gpu_memory_total=12 * GiB, gpu_memory_available=11 * GiB)
# Qwen2.5-7B-Instruct and Qwen3-14B: bf16 safetensors bytes (2 per weight) and the KV cache's shape.
QWEN_7B = (2 * 7_615_616_512, {"num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                               "hidden_size": 3584})
QWEN_14B = (2 * 14_768_307_200, {"num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 8,
                                 "head_dim": 128, "hidden_size": 5120})


def sized(shape) -> tuple[PrimeManifest, dict]:
    """A pulled Hub model as prime.json lists it: bf16 safetensors of that many bytes in two shards."""
    size, config = shape
    files = {"model-00001-of-00002.safetensors": FileEntry(sha256="0" * 64, bytes=size // 2),
             "model-00002-of-00002.safetensors": FileEntry(sha256="0" * 64, bytes=size - size // 2),
             "model.safetensors.index.json": FileEntry(sha256="0" * 64, bytes=30_000)}
    # architecture llama: exportable on this branch (qwen2/qwen3 GGUF export is issue #21's exporter work)
    return PrimeManifest(name="big", version="1", task="chat", base="b", context_length=32768, architecture="llama",
                         files=files, quantizations={"bf16": Quantization(file="model.safetensors.index.json",
                                                                         format="safetensors", bits=16)}), config


def test_on_a_16gb_mac_8bit_and_4bit_are_gguf_q8_0_and_q4_k_m_and_none_picks_what_fits():
    m, config = sized(QWEN_7B)
    eight = plan(m, hw=M1_16GB, quantization="8bit", model_config=config)
    assert (eight.backend, eight.device, eight.export, eight.memory.verdict) == ("llamacpp", "mps", "q8_0", "fits")
    assert 8.0e9 < eight.memory.need.total < 9.0e9  # q8_0 of 7.6B weights (8.1 GB) + 4096 tokens of KV cache
    four = plan(m, hw=M1_16GB, quantization="4bit", model_config=config)
    assert (four.backend, four.export, four.memory.verdict) == ("llamacpp", "q4_k_m", "fits")
    assert four.memory.need.total < eight.memory.need.total
    # None: as shipped (bf16, 15 GB on Metal) would swap, so the most precise that fits the free memory is 8bit
    picked = plan(m, hw=M1_16GB, model_config=config)
    assert (picked.quantization, picked.export, picked.memory.verdict) == ("8bit", "q8_0", "fits")
    assert ("quantization=None picked 8bit: as shipped (model.safetensors.index.json) it needs 14.7 GiB, 11.0 GiB "
            "free of 16.0 GiB unified memory: it will load but page other memory out (swap)") in picked.reason
    assert re.search(r"memory: needs 8\.\d GiB, 11\.0 GiB free of 16\.0 GiB unified memory$", picked.describe())


def test_on_a_16gb_mac_14b_8bit_warns_slow_none_picks_4bit_and_an_8gb_mac_refuses_with_numbers():
    m, config = sized(QWEN_14B)
    slow = plan(m, hw=M1_16GB, quantization="8bit", model_config=config)
    assert slow.memory.verdict == "slow"  # 16.6 GB: more than is free, less than the machine: it swaps
    assert "will load but page other memory out (swap) and run slowly" in slow.memory.describe()
    picked = plan(m, hw=M1_16GB, model_config=config)
    assert (picked.quantization, picked.export, picked.memory.verdict) == ("4bit", "q4_k_m", "fits")
    with pytest.raises(InsufficientMemoryError,
                       match=r"big will not fit at 4bit: needs 9\.\d GiB, more than this machine's 8\.0 GiB of unified "
                             r"memory \(5\.0 GiB free\)"):
        plan(m, hw=M1_8GB, quantization="4bit", model_config=config)
    with pytest.raises(InsufficientMemoryError, match=r"fits no quantization here: needs as shipped 28\.\d GiB, "
                                                      r"8bit 15\.\d GiB, 4bit 9\.\d GiB"):
        plan(m, hw=M1_8GB, model_config=config)


def test_cpu_only_none_takes_q8_0_over_a_float32_load_that_would_swap():
    m, config = sized(QWEN_7B)
    picked = plan(m, hw=CPU_32GB, model_config=config)  # transformers on the CPU is float32: 30 GB
    assert (picked.backend, picked.device, picked.quantization, picked.export) == ("llamacpp", "cpu", "8bit", "q8_0")
    assert re.search(r"as shipped \(model.safetensors.index.json\) it needs 29\.\d GiB, 20\.0 GiB free of 32\.0 GiB RAM: "
                     "it will load but page other memory out", picked.reason)
    small, _ = sized((2 * 500_000_000, config))
    kept = plan(small, hw=CPU_32GB, model_config=config)  # 0.5B in float32 fits: as shipped, as before
    assert (kept.backend, kept.quantization, kept.memory.verdict) == ("transformers", None, "fits")
    assert "picked" not in kept.reason


def test_cuda_judges_gpu_memory_and_picks_bitsandbytes_when_bf16_does_not_fit():
    m7, config7 = sized(QWEN_7B)
    kept = plan(m7, hw=CUDA_24GB, model_config=config7)
    assert (kept.backend, kept.device, kept.quantization, kept.memory.where) == ("transformers", "cuda", None,
                                                                                 "GPU memory")
    m14, config14 = sized(QWEN_14B)
    picked = plan(m14, hw=CUDA_24GB, model_config=config14)
    assert (picked.backend, picked.quantization, picked.memory.verdict) == ("transformers", "8bit", "fits")
    with pytest.raises(InsufficientMemoryError, match=r"big will not fit at 8bit: needs 15\.\d GiB, more than the "
                                                      r"11\.0 GiB free of 12\.0 GiB GPU memory"):
        plan(m14, hw=CUDA_12GB, quantization="8bit", model_config=config14)
    assert plan(m14, hw=CUDA_12GB, model_config=config14).quantization == "4bit"
    with pytest.raises(InsufficientMemoryError, match="fits no quantization here"):  # no bitsandbytes: bf16 only
        plan(m14, hw=CUDA_12GB, libs=NO_BNB, model_config=config14)


def test_unknown_memory_or_size_changes_nothing():
    m, config = sized(QWEN_14B)
    assert plan(m, hw=MAC, model_config=config).memory.verdict == "unknown"
    assert plan(m, hw=MAC, model_config=config).quantization is None
    assert plan(manifest("q4_1"), hw=M1_8GB).memory is None  # prime.json lists no sizes


def test_cpu_name_reads_the_marketing_name(tmp_path):
    """Benchmarks label their figures with it: x86 kernels say `model name`, ARM ones `Model`."""
    from jarvis_prime.hardware import cpu_name

    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\nflags\t: avx2\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 108.00\n\nModel\t\t: Raspberry Pi 5 Model B Rev 1.0\n")
    assert cpu_name(x86) == "AMD EPYC 9B14"
    assert cpu_name(arm) == "Raspberry Pi 5 Model B Rev 1.0"
    assert cpu_name(tmp_path / "absent")  # falls back to what platform knows, never empty


def test_batching_slots_are_as_many_kv_caches_as_the_memory_left_holds():
    """Continuous batching on llama.cpp gives each slot a full context's KV cache: a big model
    on a small machine gets fewer slots (never 0), a small one all it asks for."""
    from jarvis_prime.models.memory import MemoryFit, MemoryNeed, kv_slots

    gib = 1 << 30
    need = MemoryNeed(weights=4 * gib, kv_cache=2 * gib, allowance=gib)  # 7 GiB with one KV cache
    assert kv_slots(MemoryFit("fits", need, "RAM", 16 * gib, 32 * gib, 16 * gib), 8) == 5  # 1 + (16 - 7) // 2
    assert kv_slots(MemoryFit("fits", need, "RAM", 64 * gib, 64 * gib, 64 * gib), 8) == 8
    assert kv_slots(MemoryFit("slow", need, "RAM", 6 * gib, 32 * gib, 6 * gib), 8) == 1
    assert kv_slots(MemoryFit("unknown", need, "RAM"), 8) == 8
    assert kv_slots(None, 8) == 8
