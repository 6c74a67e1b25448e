"""The PRIME model catalog: `catalog.json` (data, not code) and its typed loader.

The catalog says what a model *is* (base, size, memory it needs, where its files come
from); the store (`jarvis_prime.store`) says what is on this machine.
"""

from __future__ import annotations

import difflib
import importlib.resources
import importlib.util
import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from jarvis_prime.errors import ModelNotFoundError, PrimeError
from jarvis_prime.thinking import ThinkingMarkers

Task = Literal["chat", "vision", "reasoning"]
QuantLevel = Literal["fp16", "8bit", "4bit"]

# Unified-memory sizes Apple sells, in GB. macOS lets the GPU wire about 70 % of it
# (Metal's `recommendedMaxWorkingSetSize`), so a model "fits" a Mac whose memory times
# that fraction covers the model's RAM figure.
APPLE_SILICON_MEMORY_TIERS_GB = (8, 16, 24, 32, 36, 48, 64, 96, 128, 192)
APPLE_SILICON_GPU_FRACTION = 0.7


class WheelSource(BaseModel):
    """A GGUF file shipped inside an installed Python package (works offline)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["wheel"]
    package: str
    module: str
    file: str
    quant: str

    def locate(self) -> Path | None:
        """The GGUF path inside the installed package, or None when it is not installed."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(next(iter(spec.submodule_search_locations))) / self.file
        return path if path.is_file() else None


Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class HubSource(BaseModel):
    """A Hugging Face Hub repository (needs the network and, for gated repos, a token).

    A branch moves and a server can answer with other bytes, so a source can pin both:
    `revision`, the commit a pull asks for, and `sha256`, the bytes of every file it
    installs (`store.builders.verify_download` checks them before anything enters the
    store). Unpinned, a pull takes what the Hub serves and records the commit that arrived.
    """

    model_config = ConfigDict(extra="forbid")
    kind: Literal["hub"]
    repo_id: str
    revision: str | None = Field(default=None, pattern=r"^[0-9a-f]{40}$",
                                 description="The commit to download (a full sha: a branch or tag could move).")
    sha256: dict[str, Sha256] = Field(
        default_factory=dict, description="Expected sha256 of each file a pull installs, by path in the repository; "
                                          "when given, every installed file must be listed.")


class AdapterSource(BaseModel):
    """A LoRA adapter shipped in this package, merged into a catalog base model on pull
    (offline, no torch: see `jarvis_prime.export.lora`)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["adapter"]
    base: str = Field(description="Catalog name of the base model.")
    path: str = Field(description="Adapter directory inside the jarvis_prime package.")
    package: str = "jarvis-prime"

    def locate(self) -> Path | None:
        folder = Path(str(importlib.resources.files("jarvis_prime") / self.path))
        return folder if (folder / "adapter_model.safetensors").is_file() else None


Source = Annotated[Union[WheelSource, HubSource, AdapterSource], Field(discriminator="kind")]


class CatalogEntry(BaseModel):
    """One named PRIME model."""

    model_config = ConfigDict(extra="forbid")
    name: str
    version: str
    task: Task
    description: str
    base: str = Field(description="What the model was trained from (a Hub id).")
    architecture: str
    parameters: int = Field(gt=0)
    context_length: int = Field(gt=0)
    license: str = Field(description="The base's license: its SPDX id (Apache-2.0), or the Hub's id where SPDX has "
                                     "none (llama2); the model card's `license:`.")
    license_url: str = Field(pattern=r"^https://\S+$",
                             description="The license text a user accepts (the base repository's LICENSE page).")
    stop: list[str] = Field(default_factory=list)
    thinking: ThinkingMarkers | None = Field(default=None, description="The markers around a thinking model's "
                                             "reasoning (copied into prime.json at pull); absent: it does not think.")
    tools: bool = Field(default=False, description="Trained to call tools in the Hermes format although its chat "
                        "template renders none (copied into prime.json at pull: `PrimeManifest.tools`).")
    ram_gb: dict[QuantLevel, float] = Field(description="RAM needed to run it, per quantization.")
    sources: list[Source]

    def offline_source(self) -> WheelSource | AdapterSource | None:
        """The first source installed on this machine, if any (an adapter's base must be too)."""
        for source in self.sources:
            if isinstance(source, WheelSource) and source.locate() is not None:
                return source
            if isinstance(source, AdapterSource) and source.locate() is not None:
                base = load_catalog().find(source.base)
                if base is not None and base.offline_source() is not None:
                    return source
        return None

    def apple_silicon_fit(self, quant: QuantLevel) -> int | None:
        """Smallest Apple Silicon memory size (GB) that runs `quant`, or None if none does."""
        need = self.ram_gb.get(quant)
        if need is None:
            return None
        for tier in APPLE_SILICON_MEMORY_TIERS_GB:
            if need <= tier * APPLE_SILICON_GPU_FRACTION:
                return tier
        return None


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: int
    models: list[CatalogEntry]

    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def find(self, name: str) -> CatalogEntry | None:
        return next((m for m in self.models if m.name == name), None)

    def get(self, name: str) -> CatalogEntry:
        entry = self.find(name)
        if entry is None:
            raise ModelNotFoundError(name, close_matches(name, self.names()))
        return entry


def close_matches(name: str, candidates: list[str]) -> list[str]:
    """Names a user probably meant: fuzzy matches first, then substring matches."""
    matches = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    matches += [c for c in candidates if name and name.lower() in c.lower() and c not in matches]
    return matches[:3]


def parse_catalog(text: str, origin: str) -> Catalog:
    """Validate catalog JSON; errors name the origin and the field at fault."""
    try:
        return Catalog.model_validate(json.loads(text))
    except json.JSONDecodeError as err:
        raise PrimeError(f"{origin}:{err.lineno}: invalid JSON: {err.msg}") from err
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise PrimeError(f"{origin}: field {where}: {first['msg']}") from err


@lru_cache(maxsize=1)
def load_catalog() -> Catalog:
    """The catalog shipped with this package."""
    resource = importlib.resources.files("jarvis_prime") / "catalog.json"
    return parse_catalog(resource.read_text(encoding="utf-8"), "jarvis_prime/catalog.json")
