"""Short names a user types for the common open bases, and the Hub models they mean.

`TrainingConfig(model_name="llama-2-7b")` is how people name a base; the Hub wants
`meta-llama/Llama-2-7b-hf`. The table also says what a download would be (parameters,
so about 2 bytes each in the 16-bit safetensors these repositories ship) and under which
license, and whether the repository is gated (a Hugging Face token of an account that
accepted the license on the model page), so an offline machine or a missing token gets
an error that says what was asked for instead of a bare 401 or "not found".

A leaf module: no torch, no Hub client; `model.py` resolves through it after paths and
plugins (so a jarvis-prime catalog name such as `smollm2-135m-instruct` still means the
catalog's PRIME model).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HubModel:
    repo_id: str
    params_b: float  # billions of parameters
    license: str  # the Hub's license tag
    gated: bool  # the Hub asks for a token of an account that accepted the terms

    @property
    def download_gb(self) -> float:
        """About what the safetensors weigh: 16-bit weights, 2 bytes a parameter."""
        return self.params_b * 2

    @property
    def page(self) -> str:
        return f"https://huggingface.co/{self.repo_id}"

    def describe(self) -> str:
        """`meta-llama/Llama-2-7b-hf (6.7 B parameters, about 13.5 GB, license llama2, gated)`."""
        gate = ", gated" if self.gated else ""
        return (f"{self.repo_id} ({self.params_b:g} B parameters, about {self.download_gb:.1f} GB of safetensors, "
                f"license {self.license}{gate})")


def _family(names: dict[str, str], params_b: float, license: str, gated: bool) -> dict[str, HubModel]:
    return {short: HubModel(repo, params_b, license, gated) for short, repo in names.items()}


SHORT_NAMES: dict[str, HubModel] = {
    **_family({"llama-2-7b": "meta-llama/Llama-2-7b-hf", "llama-2-7b-chat": "meta-llama/Llama-2-7b-chat-hf"},
              6.74, "llama2", True),
    **_family({"llama-2-13b": "meta-llama/Llama-2-13b-hf", "llama-2-13b-chat": "meta-llama/Llama-2-13b-chat-hf"},
              13.0, "llama2", True),
    **_family({"llama-3-8b": "meta-llama/Meta-Llama-3-8B", "llama-3-8b-instruct": "meta-llama/Meta-Llama-3-8B-Instruct"},
              8.03, "llama3", True),
    **_family({"llama-3.1-8b": "meta-llama/Llama-3.1-8B", "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B-Instruct"},
              8.03, "llama3.1", True),
    **_family({"llama-3.2-1b": "meta-llama/Llama-3.2-1B", "llama-3.2-1b-instruct": "meta-llama/Llama-3.2-1B-Instruct"},
              1.24, "llama3.2", True),
    **_family({"llama-3.2-3b": "meta-llama/Llama-3.2-3B", "llama-3.2-3b-instruct": "meta-llama/Llama-3.2-3B-Instruct"},
              3.21, "llama3.2", True),
    **_family({"mistral-7b": "mistralai/Mistral-7B-v0.3", "mistral-7b-instruct": "mistralai/Mistral-7B-Instruct-v0.3"},
              7.25, "apache-2.0", True),
    **_family({"qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B", "qwen2.5-0.5b-instruct": "Qwen/Qwen2.5-0.5B-Instruct"},
              0.49, "apache-2.0", False),
    **_family({"qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B", "qwen2.5-1.5b-instruct": "Qwen/Qwen2.5-1.5B-Instruct"},
              1.54, "apache-2.0", False),
    **_family({"qwen2.5-7b": "Qwen/Qwen2.5-7B", "qwen2.5-7b-instruct": "Qwen/Qwen2.5-7B-Instruct"},
              7.62, "apache-2.0", False),
    **_family({"qwen2.5-14b": "Qwen/Qwen2.5-14B", "qwen2.5-14b-instruct": "Qwen/Qwen2.5-14B-Instruct"},
              14.8, "apache-2.0", False),
    **_family({"qwen3-0.6b": "Qwen/Qwen3-0.6B"}, 0.6, "apache-2.0", False),
    **_family({"qwen3-4b": "Qwen/Qwen3-4B"}, 4.02, "apache-2.0", False),
    **_family({"qwen3-8b": "Qwen/Qwen3-8B"}, 8.19, "apache-2.0", False),
    **_family({"qwen3-14b": "Qwen/Qwen3-14B"}, 14.8, "apache-2.0", False),
    **_family({"gemma-2-2b": "google/gemma-2-2b", "gemma-2-2b-it": "google/gemma-2-2b-it"}, 2.61, "gemma", True),
    **_family({"gemma-2-9b": "google/gemma-2-9b", "gemma-2-9b-it": "google/gemma-2-9b-it"}, 9.24, "gemma", True),
    **_family({"phi-3-mini": "microsoft/Phi-3-mini-4k-instruct", "phi-3-mini-instruct": "microsoft/Phi-3-mini-4k-instruct",
               "phi-3.5-mini": "microsoft/Phi-3.5-mini-instruct", "phi-3.5-mini-instruct": "microsoft/Phi-3.5-mini-instruct"},
              3.82, "mit", False),
    **_family({"smollm2-135m": "HuggingFaceTB/SmolLM2-135M", "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"},
              0.135, "apache-2.0", False),
    **_family({"smollm2-360m": "HuggingFaceTB/SmolLM2-360M", "smollm2-360m-instruct": "HuggingFaceTB/SmolLM2-360M-Instruct"},
              0.362, "apache-2.0", False),
    **_family({"smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B", "smollm2-1.7b-instruct": "HuggingFaceTB/SmolLM2-1.7B-Instruct"},
              1.71, "apache-2.0", False),
}

BY_REPO: dict[str, HubModel] = {model.repo_id: model for model in SHORT_NAMES.values()}


def lookup(name: str) -> HubModel | None:
    """The Hub model a short name means (case-insensitive; `-hf` and `_` tolerated), or None."""
    key = name.strip().lower().replace("_", "-").removesuffix("-hf")
    return SHORT_NAMES.get(key)
