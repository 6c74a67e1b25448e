"""Which kernels the data pipeline runs: MLForge's C++ (`reactor-core[native]`) or numpy.

The one place Reactor Core imports `mlforge`. Both backends give the same bits (the
tests compare them), so the choice changes speed, never results:

    kernels = backend()            # mlforge when installed, else reactor_core.data.kernels
    kernels = backend("python")    # force one (tests, benchmarks); "native" raises when absent

`REACTOR_DATA_BACKEND=python|native` sets the default for a process (a worker pool
inherits it).
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Literal

from reactor_core.data import kernels

Backend = Literal["auto", "native", "python"]
BACKENDS: tuple[str, ...] = ("auto", "native", "python")
ENV_VAR = "REACTOR_DATA_BACKEND"
# What the pipeline calls; an MLForge older than Reactor Core (0.1 had no union_find) is
# refused by name rather than failing mid-run.
KERNELS: tuple[str, ...] = ("token_hashes", "ngram_hashes", "first_hit", "minhash", "LSHIndex", "union_find",
                            "ffd_pack")


def backend(name: Backend | None = None) -> ModuleType:
    """The kernel module: `KERNELS`, with MLForge's signatures."""
    name = name or os.environ.get(ENV_VAR, "auto")  # type: ignore[assignment]
    if name not in BACKENDS:
        raise ValueError(f"data backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "python":
        return kernels
    try:
        import mlforge
    except ImportError as err:
        if name == "native":
            raise ImportError("the native data backend needs MLForge: pip install packages/mlforge "
                              "(or reactor-core[native])") from err
        return kernels
    missing = [kernel for kernel in KERNELS if not hasattr(mlforge, kernel)]
    if missing:
        raise ImportError(f"MLForge {getattr(mlforge, '__version__', '?')} lacks {', '.join(missing)}: reinstall it "
                          "from packages/mlforge (reactor-core[native] needs mlforge>=0.2)")
    return mlforge


def backend_name(module: ModuleType) -> str:
    """"native" or "python", for reports and lineage."""
    return "python" if module is kernels else "native"
