"""What the VMs install: this machine's Reactor Core, not a guess at the package index.

A user who launches from a clone (`pip install -e packages/reactor-core`, as `make`
does) or from a local folder runs code that no index has: a VM that pip-installs
`reactor-core==<version>` would get another program, or nothing. So when the installed
distribution came from a folder (pip's `direct_url.json` says `file://`), `reactor
launch` builds a wheel of it, stages the wheel with the recipe's inputs, and the task's
setup installs that file. An index install (a released version) is installed the same
way on the VMs, by its requirement.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from urllib.parse import unquote, urlparse

DISTRIBUTION = "reactor-core"
EXTRAS = "[gcp]"  # the VMs read and write the recipe's gs:// bucket
WHEELS = "wheels"  # staged next to the recipe: <inputs>/wheels/<file>.whl


def local_source(distribution: str = DISTRIBUTION) -> Path | None:
    """The folder `distribution` was installed from (editable or not), or None when it came
    from an index or the folder is gone."""
    try:
        text = metadata.distribution(distribution).read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return None
    if not text:
        return None
    url = urlparse(json.loads(text).get("url", ""))
    if url.scheme != "file":
        return None
    folder = Path(unquote(url.path))
    return folder if (folder / "pyproject.toml").is_file() else None


def wheel_name(version: str, distribution: str = DISTRIBUTION) -> str:
    """The file name pip gives a pure-Python wheel of `distribution` at `version` (PEP 427)."""
    return f"{distribution.replace('-', '_')}-{version}-py3-none-any.whl"


def build_wheel(source: Path, out: Path, version: str) -> Path:
    """A wheel of `source` in `out`, built by pip with the backend this environment has
    (no download: `--no-build-isolation`). Raises RuntimeError with pip's own words."""
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--disable-pip-version-check", "-q", "-w", str(out), str(source)],
                          capture_output=True, text=True)
    wheel = out / wheel_name(version)
    if done.returncode != 0 or not wheel.is_file():
        raise RuntimeError(f"building a wheel of {source} for the VMs failed:\n{done.stderr.strip() or done.stdout}")
    return wheel


def vm_requirement(version: str, inputs_mount: str, source: Path | None) -> str:
    """What setup pip-installs: the staged wheel when this install came from a folder,
    else the released version."""
    if source is not None:
        return f"{inputs_mount}/{WHEELS}/{wheel_name(version)}{EXTRAS}"
    return f"{DISTRIBUTION}{EXTRAS}=={version}"
