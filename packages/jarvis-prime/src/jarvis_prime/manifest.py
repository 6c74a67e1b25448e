"""`prime.json`: the manifest of a PRIME model directory, its integrity checks, the lock
held by whoever writes the directory, and which of its GGUF files serves a request.

A PRIME model directory (docs/architecture.md) is the one artifact that crosses package
boundaries. Its manifest lists every file with sha256 and size; loading verifies the
files it reads and refuses weight files the manifest does not list, so a truncated
download, a tampered weight file or one dropped beside the others is an error, not a
model that quietly speaks gibberish.
"""

from __future__ import annotations

import fcntl
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from jarvis_prime.errors import IntegrityError, ManifestError, UnsafeNameError
from jarvis_prime.files import atomic_write, sha256_file
from jarvis_prime.thinking import ThinkingMarkers

MANIFEST_NAME = "prime.json"
PRIME_FORMAT_VERSION = 1


_SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")


def check_name(field: str, value: str) -> str:
    """`value` if it is safe as one path component (a model `name` or `version`
    becomes `<name>-<version>/` and `gguf/<name>-<quant>.gguf`), else UnsafeNameError
    naming the field: only letters, digits, `.`, `_` and `-`, and not `.` or `..`."""
    if not isinstance(value, str) or not _SAFE_NAME.fullmatch(value) or value in (".", ".."):
        raise UnsafeNameError(f"`{field}` {value!r} is not a safe name: use only letters, digits, '.', '_' "
                              "and '-' (not '.' or '..', no '/')")
    return value


def inside(root: Path, path: Path, field: str = "path") -> Path:
    """`path` if, resolved, it stays inside `root` (a last check after `check_name`)."""
    if not path.resolve().is_relative_to(root.resolve()):
        raise UnsafeNameError(f"`{field}` would write {path}, outside {root}")
    return path


class FileEntry(BaseModel):
    sha256: str
    bytes: int


class Quantization(BaseModel):
    """One runnable weight file: which file, which format, how many bits a weight."""

    file: str
    format: Literal["gguf", "safetensors"]
    bits: int
    quality_delta: float | None = Field(
        default=None, description="Measured change in eval quality versus full precision."
    )
    importance: dict[str, Any] | None = Field(
        default=None, description="The importance matrix the weights were rounded with (calibration sha256, tokens)."
    )
    mmproj: str | None = Field(
        default=None, description="Vision models: the projector GGUF llama.cpp (libmtmd) encodes images with, "
        "listed in `files` like every weight file (e.g. gguf/mmproj-<name>-f16.gguf)."
    )

    @field_validator("mmproj")
    @classmethod
    def _projector_path(cls, value: str | None) -> str | None:
        """A relative `.gguf` path inside the directory: it is opened as weights."""
        if value is not None and (not value.endswith(".gguf") or value.startswith("/")
                                  or any(part in ("", ".", "..") for part in value.split("/"))):
            raise ValueError(f"must be a relative path to a .gguf file inside the model directory, got {value!r}")
        return value

    @model_validator(mode="after")
    def _projector_needs_gguf(self) -> "Quantization":
        if self.mmproj is not None and self.format != "gguf":
            raise ValueError("`mmproj` goes with a gguf quantization (llama.cpp); transformers reads the "
                             "vision weights from the safetensors")
        return self


class Lineage(BaseModel):
    """Where the model came from: enough to reproduce it."""

    parent: str | None = None
    source: dict[str, Any] = Field(default_factory=dict)
    data: list[dict[str, Any]] = Field(default_factory=list, description="Data files and their sha256.")
    training_config: dict[str, Any] | None = None


class PrimeManifest(BaseModel):
    model_config = ConfigDict(extra="allow")

    format_version: int = PRIME_FORMAT_VERSION
    name: str
    version: str
    task: Literal["chat", "vision", "reasoning"]
    base: str
    architecture: str | None = None
    license: str | None = Field(
        default=None, description="The base's license (SPDX id, or the Hub's id where SPDX has none), from the "
        "catalog at pull; None when nobody recorded it (an imported folder): the card then says so, never guesses.")
    license_url: str | None = Field(default=None, description="Where that license's text is.")
    lineage: Lineage = Field(default_factory=Lineage)
    chat_template: str | None = Field(
        default=None, description="Where the chat template came from (e.g. 'gguf:tokenizer.chat_template')."
    )
    stop: list[str] = Field(default_factory=list)
    thinking: ThinkingMarkers | None = Field(
        default=None, description="A model that thinks: the markers around its reasoning ({'start': '<think>', "
        "'end': '</think>'}), so every layer gets reasoning and answer apart (jarvis_prime.thinking). Absent: "
        "the model does not think.")
    tools: bool = Field(
        default=False, description="Trained to call tools in the Hermes <tool_call> format (jarvis_prime.models.tools) "
        "although its chat template renders no tool list; JARVIS offers its tools to such a model (PrimeModel.calls_tools).")
    context_length: int
    files: dict[str, FileEntry] = Field(default_factory=dict)
    quantizations: dict[str, Quantization] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    created: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @field_validator("name", "version")
    @classmethod
    def _safe_name(cls, value: str, info) -> str:
        return check_name(info.field_name, value)

    @property
    def dirname(self) -> str:
        return f"{self.name}-{self.version}"


def file_entry(path: Path) -> FileEntry:
    """sha256 and size of one file, as prime.json records it."""
    return FileEntry(sha256=sha256_file(path), bytes=path.stat().st_size)


def hash_files(model_dir: Path) -> dict[str, FileEntry]:
    """sha256 and size of every file under `model_dir` except the manifest itself."""
    entries: dict[str, FileEntry] = {}
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(model_dir).as_posix()
        if rel == MANIFEST_NAME:
            continue
        entries[rel] = file_entry(path)
    return entries


def write_manifest(model_dir: Path, manifest: PrimeManifest, changed: list[str] | None = None) -> PrimeManifest:
    """Write `prime.json` atomically (`files.atomic_write`) with the sha256 and size of
    every file: all hashed afresh for a new directory (`changed=None`); else only the
    files this writer wrote (`changed`), every other entry kept as recorded, so rewriting
    the manifest (new metrics, a new GGUF) never vouches for a file nobody checked."""
    if changed is None:
        files = hash_files(model_dir)
    else:
        files = dict(manifest.files) | {rel: file_entry(model_dir / rel) for rel in changed}
    manifest = manifest.model_copy(update={"files": files})
    payload = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=False) + "\n"
    atomic_write(model_dir / MANIFEST_NAME, payload)
    return manifest


@contextmanager
def store_lock(model_dir: Path) -> Iterator[None]:
    """An exclusive lock on one model directory (POSIX advisory lock, on a file beside it):
    held by whoever builds the directory or rewrites its `prime.json` (pull, export, eval)."""
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(model_dir.parent / f".{model_dir.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def read_manifest(model_dir: Path) -> PrimeManifest:
    path = model_dir / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: missing; not a PRIME model directory")
    try:
        return PrimeManifest.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ManifestError(f"{path}: field {where}: {first['msg']}") from err


def has_merged_weights(manifest: PrimeManifest) -> bool:
    """Whether the directory ships full safetensors weights, not only a LoRA adapter
    (Reactor Core's `merge_adapter: false`)."""
    return any(rel in manifest.files for rel in ("model.safetensors", "model.safetensors.index.json"))


def hf_files(manifest: PrimeManifest) -> list[str]:
    """The Hugging Face files of a PRIME directory: every listed file outside gguf/ and adapter/
    (what transformers, peft, vLLM and llama.cpp's converter read)."""
    return [rel for rel in manifest.files if "/" not in rel]


def verify_files(model_dir: Path, manifest: PrimeManifest, paths: list[str] | None = None) -> None:
    """Check size and sha256 of `paths` (default: every listed file) against the manifest."""
    for rel in paths if paths is not None else list(manifest.files):
        entry = manifest.files.get(rel)
        if entry is None:
            raise IntegrityError(f"{model_dir / rel}: not listed in {MANIFEST_NAME}; refusing to load it")
        path = model_dir / rel
        if not path.is_file():
            raise IntegrityError(f"{path}: listed in {MANIFEST_NAME} but missing")
        size = path.stat().st_size
        if size != entry.bytes:
            raise IntegrityError(f"{path}: size {size} bytes, manifest says {entry.bytes}")
        actual = sha256_file(path)
        if actual != entry.sha256:
            raise IntegrityError(f"{path}: sha256 {actual} does not match manifest {entry.sha256}")


# What a backend, converter or trainer could open as weights: safetensors and GGUF, the
# pickle formats (`.bin`, `.pt`, ...) and a sharded checkpoint's index.
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".npz", ".h5",
                   ".msgpack", ".onnx")


def is_weight_file(rel: str) -> bool:
    """True for a file name a loader could take weights from (`model.safetensors.index.json` too)."""
    return rel.lower().removesuffix(".index.json").endswith(WEIGHT_SUFFIXES)


def unlisted_weights(model_dir: Path, manifest: PrimeManifest) -> list[str]:
    """Weight files under `model_dir` that `prime.json` does not list, as relative paths.

    transformers picks its weight file by name from the folder (a `model.safetensors`
    wins over a listed sharded index) and the exporter reads every top-level safetensors,
    so a file the manifest does not vouch for could be what runs. Hidden paths are
    skipped: they are writers' temporary files and staging folders (`atomic_path`,
    `.export-*`), which no loader opens.
    """
    found = []
    for path in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(model_dir).as_posix()
        if rel not in manifest.files and is_weight_file(rel) and not any(part.startswith(".") for part in rel.split("/")):
            found.append(rel)
    return found


def refuse_unlisted_weights(model_dir: Path, manifest: PrimeManifest) -> None:
    """IntegrityError naming every weight file present in `model_dir` but not in its `prime.json`."""
    extra = unlisted_weights(model_dir, manifest)
    if extra:
        raise IntegrityError(f"{model_dir}: weight files not listed in {MANIFEST_NAME}: {', '.join(extra)}; "
                             "refusing to load the model (remove them)")


_BITS_OF_REQUEST = {"8bit": 8, "4bit": 4}
# Among several GGUFs of the same bits, the better quality/size trade-off first.
_GGUF_PREFERENCE = ("q4_k_m", "q4_k_s", "q4_0", "q4_1", "iq4_nl", "iq4_xs", "q8_0", "f16", "bf16", "f32")


def matching_gguf(manifest: PrimeManifest, quantization: Literal["8bit", "4bit"] | None) -> str | None:
    """The GGUF quantization name that serves `quantization`, best first; None if none.

    None asks for no quantization beyond what the model ships: the most precise GGUF.
    """
    ggufs = {name: q for name, q in manifest.quantizations.items() if q.format == "gguf"}
    if quantization is None:
        candidates = sorted(ggufs, key=lambda n: -ggufs[n].bits)
        candidates = [n for n in candidates if ggufs[n].bits == ggufs[candidates[0]].bits] if candidates else []
    else:
        candidates = [n for n, q in ggufs.items() if q.bits == _BITS_OF_REQUEST[quantization]]
    rank = {name: i for i, name in enumerate(_GGUF_PREFERENCE)}
    return min(candidates, key=lambda n: rank.get(n, len(rank)), default=None)


def projector_for(manifest: PrimeManifest, gguf_file: str) -> str | None:
    """The mmproj GGUF recorded with the text GGUF `gguf_file`, or None (a text-only file)."""
    return next((q.mmproj for q in manifest.quantizations.values() if q.file == gguf_file and q.format == "gguf"),
                None)


_BITS_OF_QUANT = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8}


def quant_bits(quant: str) -> int:
    """Bits per weight of a llama.cpp quantization name: 'q4_k_m' -> 4, 'f16' -> 16."""
    quant = quant.lower()
    if quant in _BITS_OF_QUANT:
        return _BITS_OF_QUANT[quant]
    match = re.match(r"i?q(\d)", quant)
    if not match:
        raise ValueError(f"unknown quantization {quant!r}")
    return int(match.group(1))
