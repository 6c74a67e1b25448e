"""A launch's files in the recipe's bucket: the inputs staged before, the model fetched after.

`stage_inputs` uploads what the VM needs to train and nothing of this machine's layout:
the data files (a chat file with images: its whole folder, since images are read
relative to it), a local base model folder, and the recipe with those paths rewritten
relative to the staged folder, which the run script `cd`s into.

`fetch_model` brings a finished PRIME directory back: prime.json first, then exactly
the files it lists (paths checked: no `..`, nothing absolute), into a hidden staging
folder, each verified against its sha256 (`verified_prime_manifest`, the check training
from a PRIME directory uses), then renamed into place whole.

A bucket is `gs://bucket/prefix` (google-cloud-storage; `STORAGE_EMULATOR_HOST` for the
emulator, as everywhere in Reactor Core) or a local folder, like `checkpoint_remote`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

import yaml

from reactor_core.files import replace_dir
from reactor_core.launch.task import STAGED_RECIPE

PATH_KEYS = ("data_path", "val_data_path", "kl_anchor_path")


class Bucket:
    """put / get / list of files under one URL: a gs:// prefix or a folder."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self._gcs = None
        if url.startswith("gs://"):
            from reactor_core.checkpoints.remote import GcsRemote  # its client, emulator included

            self._gcs = GcsRemote(self.url)

    def _blob(self, rel: str):
        return self._gcs.bucket.blob(self._gcs._name(rel))

    def put(self, local: Path, rel: str) -> None:
        if self._gcs is not None:
            self._blob(rel).upload_from_filename(str(local))
            return
        target = Path(self.url) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, target)

    def get(self, rel: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        if self._gcs is not None:
            from google.api_core.exceptions import NotFound

            try:
                self._blob(rel).download_to_filename(str(local))
            except NotFound:
                local.unlink(missing_ok=True)
                raise FileNotFoundError(f"{self.url}/{rel}: not in the bucket") from None
            return
        source = Path(self.url) / rel
        if not source.is_file():
            raise FileNotFoundError(f"{source}: no such file")
        shutil.copyfile(source, local)

    def folders(self) -> list[str]:
        """The names of the folders directly under the URL."""
        if self._gcs is None:
            root = Path(self.url)
            return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        prefix = self._gcs._name() + "/" if self._gcs.prefix else ""
        names = {b.name.removeprefix(prefix).split("/")[0]
                 for b in self._gcs.client.list_blobs(self._gcs.bucket, prefix=prefix or None)
                 if "/" in b.name.removeprefix(prefix)}
        return sorted(names)


@dataclass(frozen=True)
class Staged:
    """What `stage_inputs` uploaded: staged relative path -> local file, and the recipe as staged."""

    files: dict[str, Path]
    recipe: dict[str, Any]


def plan_inputs(recipe: dict[str, Any], has_images: Callable[[str], bool]) -> Staged:
    """Which local files go to the bucket, and the recipe rewritten to find them there.

    `has_images(data_path)`: whether a data file's examples hold images (then its folder
    goes along). `recipe` is the YAML mapping with overrides applied, as `reactor train`
    would read it.
    """
    files: dict[str, Path] = {}
    staged = dict(recipe)
    staged.pop("checkpoint_dir", None)  # a folder of this machine; on the VM: <output_dir>/checkpoints
    for key in PATH_KEYS:
        value = recipe.get(key)
        if not value:
            continue
        local = Path(value).expanduser().resolve()
        if not local.is_file():
            raise FileNotFoundError(f"recipe `{key}`: {local} is not a file")
        if key != "kl_anchor_path" and has_images(str(local)):
            base = f"data/{key}"
            files.update({f"{base}/{rel}": path for rel, path in _tree(local.parent)})
            staged[key] = f"{base}/{local.name}"
        else:
            staged[key] = f"data/{key}/{local.name}"
            files[staged[key]] = local
    model = Path(str(recipe.get("model_name", ""))).expanduser()
    # GRPO's reward functions from a local file (`path/to/file.py:function`) travel too
    rewards = list(recipe.get("reward_funcs") or [])
    for i, spec in enumerate(rewards):
        where, sep, name = str(spec).rpartition(":")
        if sep and where.endswith(".py") and Path(where).expanduser().is_file():
            local = Path(where).expanduser().resolve()
            files[f"rewards/{i}/{local.name}"] = local
            rewards[i] = f"rewards/{i}/{local.name}:{name}"
    if rewards:
        staged["reward_funcs"] = rewards
    # a local base (HF or PRIME folder, .gguf) travels under its own name, which the default
    # output name is made of; a Hub id or short name is fetched on the VM
    if model.is_dir():
        staged["model_name"] = f"model/{model.resolve().name}"
        files.update({f"{staged['model_name']}/{rel}": path for rel, path in _tree(model.resolve())})
    elif model.is_file():
        staged["model_name"] = f"model/{model.name}"
        files[staged["model_name"]] = model.resolve()
    return Staged(files, staged)


def _tree(root: Path) -> Iterator[tuple[str, Path]]:
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            yield rel.as_posix(), path


def stage_inputs(staged: Staged, bucket: Bucket, log: Callable[[str], None] = lambda m: None) -> None:
    """Upload the files, then the recipe (the VM reads the recipe; it is written last)."""
    total = sum(p.stat().st_size for p in staged.files.values())
    log(f"staging {len(staged.files)} files ({total / 1e6:.1f} MB) in {bucket.url}")
    for rel, local in staged.files.items():
        bucket.put(local, rel)
    recipe_file = _write_temp_yaml(staged.recipe)
    try:
        bucket.put(recipe_file, STAGED_RECIPE)
    finally:
        recipe_file.unlink(missing_ok=True)


def _write_temp_yaml(values: dict[str, Any]) -> Path:
    fd, name = tempfile.mkstemp(prefix="reactor-recipe-", suffix=".yaml")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        yaml.safe_dump(values, f, sort_keys=False)
    return Path(name)


class FetchError(ValueError):
    """The model in the bucket is missing, unsafe to write, or does not match its prime.json."""


def _safe_rel(rel: str) -> str:
    parts = PurePosixPath(rel).parts
    if not parts or rel.startswith("/") or "\\" in rel or any(p in ("..", ".") for p in parts):
        raise FetchError(f"prime.json lists an unsafe path {rel!r}; refusing to write it")
    return rel


def fetch_model(bucket: Bucket, name: str, dest_root: Path) -> Path:
    """`<bucket>/<name>/` -> `dest_root/<name>/`, every file verified; the local path."""
    from reactor_core.training.model import ModelSourceError, verified_prime_manifest

    dest_root.mkdir(parents=True, exist_ok=True)
    staging = dest_root / f".{name}.download-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        bucket.get(f"{name}/prime.json", staging / "prime.json")
        try:
            listed = json.loads((staging / "prime.json").read_text(encoding="utf-8"))["files"]
        except (ValueError, KeyError, TypeError) as err:
            raise FetchError(f"{bucket.url}/{name}/prime.json: no readable `files` table ({err})") from None
        for rel in listed:
            bucket.get(f"{name}/{_safe_rel(rel)}", staging / rel)
        try:
            verified_prime_manifest(staging)
        except ModelSourceError as err:
            raise FetchError(f"{bucket.url}/{name}: {err}".replace(str(staging), f"{bucket.url}/{name}")) from None
        final = dest_root / name
        replace_dir(staging, final)
        return final
    except FileNotFoundError as err:
        raise FetchError(str(err)) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
