"""Building a PRIME model directory in a staging folder, one builder per source: a
packaged LoRA adapter merged into its base's GGUF, a trained LoRA adapter merged onto its
base's safetensors, a GGUF file (plus float32 safetensors converted from it when
transformers is installed), a Hub download, a Hugging Face directory. Each fills
`staging` and returns the manifest to write; `index.py` hashes, writes `prime.json` and
renames the folder into place."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from jarvis_prime.catalog import CatalogEntry, HubSource, WheelSource
from jarvis_prime.errors import IntegrityError, ModelNotAvailableError, PrimeError
from jarvis_prime.files import sha256_file
from jarvis_prime.gguf_names import gguf_filename
from jarvis_prime.hardware import detect_libraries
from jarvis_prime.manifest import Lineage, PrimeManifest, Quantization, quant_bits
from jarvis_prime.progress import Log

HF_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",  # installed as chat_template.jinja (see from_hf_dir)
    # vision models: what transformers' AutoProcessor and llama.cpp's mmproj converter read
    "preprocessor_config.json",
    "processor_config.json",
)
# What a Hub pull downloads: every file above (and weights), nothing else of the repository.
HUB_PATTERNS = ["*.safetensors", "*.safetensors.index.json", *HF_FILES]


def from_adapter(staging: Path, manifest: PrimeManifest, base_dir: Path, base_manifest: PrimeManifest, base_gguf: Path,
                 adapter_dir: Path, log: Log) -> PrimeManifest:
    """The base GGUF with the LoRA merged in (numpy), quantized to q8_0 and q4_k_m, plus
    float32 safetensors when transformers is here; the adapter and its chat template kept."""
    from jarvis_prime.export.lora import merge_lora_gguf  # numpy and llama.cpp: only when a model is built
    from jarvis_prime.export.quantize import quantize_files

    (staging / "gguf").mkdir()
    f16 = staging / gguf_filename(manifest.name, "f16")
    log(f"merging the LoRA adapter into {base_gguf.name}")
    merge_lora_gguf(base_gguf, adapter_dir, f16, name=manifest.name)
    quantizations = {}
    has_transformers = detect_libraries().transformers
    if has_transformers:
        log("converting to Hugging Face safetensors (float32) with transformers")
        gguf_to_hf(f16, staging)
        quantizations["f32"] = Quantization(file="model.safetensors", format="safetensors", bits=32)
    targets = {quant: staging / gguf_filename(manifest.name, quant) for quant in ("q8_0", "q4_k_m")}
    # the importance matrix runs the model just converted (a second load; cheap at this size)
    imatrix_records = quantize_files(f16, targets, staging if has_transformers else None, progress=False, log=log)
    for quant in targets:
        quantizations[quant] = Quantization(file=gguf_filename(manifest.name, quant), format="gguf",
                                            bits=quant_bits(quant), importance=imatrix_records.get(quant))
    f16.unlink()  # q8_0 is as precise as the Q4_1-derived base allows; `prime export` rebuilds f16
    shutil.copytree(adapter_dir, staging / "adapter", ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    template_source = base_manifest.chat_template
    if (adapter_dir / "chat_template.jinja").is_file():  # the template the adapter was trained with
        shutil.copyfile(adapter_dir / "chat_template.jinja", staging / "chat_template.jinja")
        template_source = f"adapter:{manifest.lineage.source.get('path')}/chat_template.jinja"
    elif (base_dir / "chat_template.jinja").is_file():
        shutil.copyfile(base_dir / "chat_template.jinja", staging / "chat_template.jinja")
    return manifest.model_copy(update={"quantizations": quantizations, "chat_template": template_source})


def merge_adapter_dir(base_dir: Path, src: Path, out: Path, log: Log) -> Path:
    """`src/adapter` (a peft LoRA, Reactor Core's `merge_adapter: false` output) merged onto
    the base's float32 safetensors with peft's `merge_and_unload` (W = W0 + (alpha/r) B A, as
    Reactor Core merges when it does), saved as a Hugging Face directory `out` with `src`'s
    tokenizer and chat template: the directory Reactor Core would have written merged."""
    try:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    except ImportError as err:
        raise ModelNotAvailableError(f"merging {src / 'adapter'} onto its base needs torch, transformers and peft "
                                     f"({err}): pip install 'jarvis-prime[transformers]' peft") from None
    log(f"merging {src.name}'s LoRA adapter onto {base_dir} (peft)")
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, src / "adapter").merge_and_unload()
    out.mkdir(parents=True)
    merged.save_pretrained(out, safe_serialization=True)
    for name in HF_FILES:  # the tokenizer the adapter was trained with; the config is the merged model's
        if name not in ("config.json", "generation_config.json") and (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    return out


def wheel_lineage(source: WheelSource) -> dict:
    return {"kind": "wheel", "package": source.package, "package_version": version(source.package), "file": source.file}


def entry_manifest(entry: CatalogEntry, source: dict) -> PrimeManifest:
    return PrimeManifest(
        name=entry.name, version=entry.version, task=entry.task, base=entry.base, architecture=entry.architecture,
        license=entry.license, license_url=entry.license_url,
        context_length=entry.context_length, stop=list(entry.stop), thinking=entry.thinking,
        tools=entry.tools,
        lineage=Lineage(source=source),
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


def from_gguf(staging: Path, manifest: PrimeManifest, gguf_path: Path, info: GgufInfo, log: Log) -> PrimeManifest:
    """Copy the GGUF, keep its chat template, and add float32 safetensors when transformers is here."""
    gguf_rel = gguf_filename(manifest.name, info.quant)
    (staging / "gguf").mkdir()
    log(f"copying {gguf_path.name}")
    shutil.copyfile(gguf_path, staging / gguf_rel)
    quantizations = {info.quant: Quantization(file=gguf_rel, format="gguf", bits=quant_bits(info.quant))}

    if detect_libraries().transformers:
        log("converting GGUF to Hugging Face safetensors (float32) with transformers")
        gguf_to_hf(staging / gguf_rel, staging)
        quantizations["f32"] = Quantization(file="model.safetensors", format="safetensors", bits=32)
    else:
        log("transformers not installed: only the GGUF is kept (pip install 'jarvis-prime[transformers]')")
    if info.chat_template:  # the template the model was published with, verbatim
        (staging / "chat_template.jinja").write_text(info.chat_template, encoding="utf-8")
    return manifest.model_copy(update={
        "quantizations": quantizations,
        "chat_template": "gguf:tokenizer.chat_template" if info.chat_template else None,
    })


def gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
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


def download_from_hub(hub: HubSource, log: Log, license_url: str | None = None) -> Path:
    """The repository's files at `hub.revision` (the default branch when unpinned) in the
    Hugging Face cache; the folder's name is the commit that arrived.

    A 401 or 403 (a gated or private repository, or a token that has not accepted its
    license) says which repository, how to authenticate and which license page to accept:
    huggingface_hub's own message reads as "Repository Not Found"."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

    at = f" at {hub.revision}" if hub.revision else ""
    log(f"downloading {hub.repo_id} from the Hugging Face Hub{at}")
    try:
        return Path(snapshot_download(
            hub.repo_id, revision=hub.revision,
            allow_patterns=HUB_PATTERNS,
        ))
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status not in (401, 403):
            raise _download_failed(hub, err) from err
        accept = f"accept its license at {license_url} (logged in), then " if license_url else ""
        raise ModelNotAvailableError(
            f"{hub.repo_id}: the Hugging Face Hub refused the download (HTTP {status}): the repository is gated or "
            f"private{' (or does not exist)' if status == 401 and not isinstance(err, GatedRepoError) else ''}. "
            f"To pull it, {accept}set HF_TOKEN to a token of that account or run `huggingface-cli login` "
            "(`hf auth login`)"
        ) from err
    except Exception as err:  # network or offline mode: both end the same way
        raise _download_failed(hub, err) from err


def _download_failed(hub: HubSource, err: Exception) -> ModelNotAvailableError:
    reason = " ".join(str(err).split())  # huggingface_hub's messages span lines; ours is one
    return ModelNotAvailableError(
        f"could not download {hub.repo_id}{f' at {hub.revision}' if hub.revision else ''} from the Hugging Face "
        f"Hub ({type(err).__name__}: {reason}); "
        "pulling needs the network, and gated models need `hf auth login`"
    )


def verify_download(snapshot: Path, hub: HubSource, log: Log) -> None:
    """Check a Hub download against the catalog's pinned sha256 before anything is built
    from it: every file `from_hf_dir` would install must be pinned and match. IntegrityError
    names the file, the expected and the actual hash; the store is not touched."""
    where = f"{hub.repo_id}@{snapshot.name}"
    if not hub.sha256:
        log(f"{where}: the catalog pins no sha256 for this source; taking the files as they arrived")
        return
    unpinned = [rel for rel in hf_dir_files(snapshot) if rel not in hub.sha256]
    if unpinned:
        raise IntegrityError(f"{where}: {', '.join(unpinned)} not pinned by the catalog's sha256; refusing to install")
    for rel, expected in hub.sha256.items():
        path = snapshot / rel
        if not path.is_file():
            raise IntegrityError(f"{where}: {rel}: pinned by the catalog but not in the download")
        actual = sha256_file(path)
        if actual != expected:
            raise IntegrityError(f"{where}: {rel}: sha256 {actual}, the catalog expects {expected}; nothing installed "
                                 f"(the download is cached at {path}: delete it to fetch it again)")
    log(f"{where}: {len(hub.sha256)} files match the catalog's sha256")


def hf_dir_files(src: Path) -> list[str]:
    """What `from_hf_dir` copies out of a Hugging Face directory: the safetensors weights
    (and a sharded checkpoint's index), then whichever of `HF_FILES` are there."""
    weights = sorted(p.name for p in src.glob("*.safetensors")) + sorted(p.name for p in src.glob("*.safetensors.index.json"))
    return weights + [f for f in HF_FILES if (src / f).is_file()]


def from_hf_dir(staging: Path, manifest: PrimeManifest, src: Path) -> PrimeManifest:
    """Copy a Hugging Face model directory; only safetensors weights are accepted."""
    files = hf_dir_files(src)
    weights = [f for f in files if f.endswith((".safetensors", ".safetensors.index.json"))]
    if not any(w.endswith(".safetensors") for w in weights):
        pickles = sorted(p.name for p in src.glob("*.bin")) + sorted(p.name for p in src.glob("*.pt"))
        raise PrimeError(
            f"{src}: no *.safetensors weights"
            + (f" (found {', '.join(pickles)}: pickled weights are never loaded)" if pickles else "")
        )
    for name in files:
        if name != "chat_template.json":
            shutil.copyfile(src / name, staging / name)
    config = json.loads((staging / "config.json").read_text()) if (staging / "config.json").is_file() else {}
    tok_config = json.loads((staging / "tokenizer_config.json").read_text()) if (staging / "tokenizer_config.json").is_file() else {}
    template_source = "chat_template.jinja" if (staging / "chat_template.jinja").is_file() else None
    if template_source is None and "chat_template.json" in files:  # processors' (SmolVLM, Idefics3) template file
        template = json.loads((src / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
        if not isinstance(template, str):
            raise PrimeError(f"{src / 'chat_template.json'}: field chat_template: expected a string")
        (staging / "chat_template.jinja").write_text(template, encoding="utf-8")
        template_source = "chat_template.json"
    if template_source is None and isinstance(tok_config.get("chat_template"), str):
        (staging / "chat_template.jinja").write_text(tok_config["chat_template"], encoding="utf-8")
        template_source = "tokenizer_config.json:chat_template"
    main = "model.safetensors.index.json" if "model.safetensors.index.json" in weights else weights[0]
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    quant = {"float32": "f32", "bfloat16": "bf16"}.get(dtype, "f16")
    update = {
        "architecture": manifest.architecture or config.get("model_type"),
        "context_length": (config.get("max_position_embeddings")
                           or (config.get("text_config") or {}).get("max_position_embeddings")  # vision models
                           or manifest.context_length),
        "chat_template": template_source,
        "quantizations": {quant: Quantization(file=main, format="safetensors", bits=quant_bits(quant))},
    }
    if not manifest.stop and isinstance(eos := tok_config.get("eos_token"), (str, dict)):
        update["stop"] = [eos if isinstance(eos, str) else eos.get("content", "")]
    return manifest.model_copy(update=update)
