"""The quantization matrix: every (hardware, libraries, request) cell picks or refuses."""

import pytest

from jarvis_prime.errors import BackendUnavailableError
from jarvis_prime.hardware import Hardware, Libraries
from jarvis_prime.manifest import PrimeManifest, Quantization, matching_gguf
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
