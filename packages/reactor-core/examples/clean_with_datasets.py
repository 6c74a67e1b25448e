"""The data pipeline on a cluster engine: Hugging Face `datasets.map` runs the pure
per-batch step anywhere (`num_proc`, or the same function in Ray Data / Spark), then one
ordered pass holding only the index decides the duplicates.

    python examples/clean_with_datasets.py my/dataset OUT.jsonl     # a Hub id or a save_to_disk folder

`reactor data clean` does the same on one machine; this is the shape to copy when the
corpus lives in a cluster's dataset format.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from reactor_core.data.dedup import Deduplicator
from reactor_core.data.native import backend
from reactor_core.data.pipeline import clean_batch
from reactor_core.data.pipeline_config import PipelineConfig
from reactor_core.data.sources import SourceLine


def sign(rows: dict, indices: list[int], config: PipelineConfig, name: str) -> dict:
    """datasets.map(batched=True, with_indices=True): validation, filters, scrub,
    decontamination and MinHash for one batch; pure, so any worker may run it."""
    lines = [SourceLine(name, i + 1, {"messages": m}) for i, m in zip(indices, rows["messages"])]
    result = clean_batch(lines, config)
    at = {source: k for k, source in enumerate(result.sources)}  # the records that passed
    removed = {r.source: r.kind for r in result.removed}
    return {
        "source": [line.source for line in lines],
        "removed": [removed.get(line.source) for line in lines],
        "record": [json.loads(result.lines[at[line.source]]) if line.source in at else None for line in lines],
        "key": [result.keys[at[line.source]] if line.source in at else None for line in lines],
        "signature": [result.signatures[at[line.source]].tolist() if line.source in at else None for line in lines],
    }


def clean_dataset(dataset, config: PipelineConfig, name: str, num_proc: int | None = None):
    """Yield (source, kept record or None, reason or None) for every row, in order."""
    signed = dataset.map(sign, batched=True, with_indices=True, num_proc=num_proc, remove_columns=dataset.column_names,
                         fn_kwargs={"config": config, "name": name})
    dedup = Deduplicator(config.dedup, backend(config.backend))
    for row in signed:
        if row["removed"] is not None:
            yield row["source"], None, row["removed"]
            continue
        (verdict,) = dedup.add([row["source"]], [row["key"]], np.array([row["signature"]], dtype=np.uint32))
        yield row["source"], row["record"] if verdict is None else None, verdict and verdict.kind


if __name__ == "__main__":
    import datasets

    source, out = sys.argv[1], sys.argv[2]
    data = datasets.load_from_disk(source) if Path(source).is_dir() else datasets.load_dataset(source, split="train")
    with open(out, "w") as f:
        for _, record, _ in clean_dataset(data, PipelineConfig(), source, num_proc=4):
            if record is not None:
                f.write(json.dumps(record) + "\n")
