"""`reactor data`: inspect and clean training data (the data pipeline's command line).

    reactor data inspect feedback.jsonl
    reactor data clean raw/ --output clean.jsonl --decontaminate eval.jsonl
    reactor data pack clean.jsonl --tokenizer ./my-model --output rows.jsonl

Thin: options become a `PipelineConfig` (a `--config` YAML file first, then the
flags), `reactor_core.data.pipeline` does the work, and this prints it. The pipeline is
imported when a command runs: `reactor_core.data` loads torch, which `reactor --help`
and `reactor env` do without.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from reactor_core.data.pipeline import Summary
    from reactor_core.data.pipeline_config import PipelineConfig

data_app = typer.Typer(
    name="data",
    help="Inspect, clean and pack training data: validation, exact and near-duplicate removal, "
         "decontamination, filters, PII scrub (streaming; JSONL, .gz, .zst, shard folders, Arrow).",
    no_args_is_help=True,
    add_completion=False,
)

Inputs = Annotated[list[Path], typer.Argument(help="JSONL (.gz, .zst) files, folders of shards, Arrow files or "
                                                   "`datasets.save_to_disk` folders.", show_default=False)]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", help="YAML with PipelineConfig fields; flags win.")]
Kind = Annotated[Optional[str], typer.Option("--kind", help="chat (default) or preference (DPO pairs).")]
Threshold = Annotated[Optional[float], typer.Option("--threshold", help="Jaccard similarity of a near duplicate"
                                                                        " (default 0.8).")]
NumPerm = Annotated[Optional[int], typer.Option("--num-perm", help="MinHash permutations (default 128).")]
Backend = Annotated[Optional[str], typer.Option("--backend", help="auto, native (MLForge) or python (numpy).")]
Workers = Annotated[Optional[int], typer.Option("--workers", help="Processes for validation and hashing (default 1).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")]


@data_app.command()
def inspect(inputs: Inputs, config: ConfigFile = None, kind: Kind = None, threshold: Threshold = None,
            num_perm: NumPerm = None, backend: Backend = None, workers: Workers = None, as_json: AsJson = False,
            decontaminate: Annotated[Optional[list[Path]], typer.Option(
                "--decontaminate", help="Evaluation files to check against (repeat).")] = None,
            tokenizer: Annotated[Optional[Path], typer.Option(
                "--tokenizer", help="A model folder: also a tokens-per-record histogram, through its chat "
                                    "template (a second pass).")] = None) -> None:
    """Counts, words (and tokens) per record, roles, duplicates, near-duplicate clusters and problems (path:line);
    writes nothing."""
    settings = _config(config, kind=kind, threshold=threshold, num_perm=num_perm, backend=backend, workers=workers,
                       decontaminate=decontaminate)
    from reactor_core.data.pipeline import clean

    summary = _run(lambda: clean(inputs, None, settings))
    tokens = None
    if tokenizer is not None:
        from reactor_core.data.prepack import token_histogram  # transformers: only with --tokenizer

        tokens = _run(lambda: token_histogram(inputs, tokenizer))
    _print(summary, as_json, title="reactor data inspect", tokens=tokens)


@data_app.command("clean")
def clean_command(
    inputs: Inputs,
    output: Annotated[Path, typer.Option("--output", "-o", help="Kept records, JSONL (.gz, .zst compress).")],
    report: Annotated[Optional[Path], typer.Option("--report", help="Removed records with path:line and reason"
                                                                   " (default OUTPUT.report.jsonl).")] = None,
    decontaminate: Annotated[Optional[list[Path]], typer.Option(
        "--decontaminate", help="Evaluation files (JSONL, JSON, text) whose text must not be trained on (repeat).")] = None,
    config: ConfigFile = None, kind: Kind = None, threshold: Threshold = None, num_perm: NumPerm = None,
    backend: Backend = None, workers: Workers = None,
    exact: Annotated[Optional[bool], typer.Option("--exact/--no-exact", help="Exact-duplicate removal (default on).")] = None,
    near: Annotated[Optional[bool], typer.Option("--near/--no-near", help="Near-duplicate removal (default on).")] = None,
    near_mode: Annotated[Optional[str], typer.Option(
        "--near-dup-mode", help="stream (default): a record goes when it repeats a kept record, bounded memory; "
                                "cluster: connected components of all verified pairs (chains A~B~C grouped), "
                                "the first of each kept; holds every signature.")] = None,
    pii: Annotated[Optional[bool], typer.Option("--scrub-pii/--no-scrub-pii", help="PII scrub (default on).")] = None,
    as_json: AsJson = False,
) -> None:
    """Write the kept records, a report of each removed one (path:line, reason) and a summary."""
    settings = _config(config, kind=kind, threshold=threshold, num_perm=num_perm, backend=backend, workers=workers,
                       decontaminate=decontaminate, exact=exact, near=near, near_mode=near_mode, scrub_pii=pii)
    from reactor_core.data.pipeline import clean

    summary = _run(lambda: clean(inputs, output, settings, report=report))
    _print(summary, as_json, title=f"reactor data clean -> {output}")


@data_app.command()
def pack(
    inputs: Inputs,
    tokenizer: Annotated[Path, typer.Option("--tokenizer", help="A model folder whose tokenizer and chat template to use.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Packed rows, JSONL (.gz, .zst compress).")],
    max_seq_length: Annotated[int, typer.Option("--max-seq-length", min=1, help="Tokens per row.")] = 2048,
    window: Annotated[int, typer.Option("--window", min=1, help="Examples packed together (bounds memory).")] = 65536,
) -> None:
    """Tokenize chat records and write pre-packed rows (input_ids, labels, position_ids, sources)."""
    from reactor_core.data.prepack import prepack  # tokenizers and torch: only for this command

    stats = _run(lambda: prepack(inputs, output, tokenizer, max_seq_length=max_seq_length, window=window))
    Console().print(f"{stats['examples']} examples -> {stats['rows']} rows of {max_seq_length} tokens "
                    f"({stats['fill']:.1%} filled); {stats['skipped']} skipped -> {output}")


def _config(path: Path | None, **flags: Any) -> PipelineConfig:
    """PipelineConfig from the YAML file, then the flags given; a bad value names its field."""
    from reactor_core.data.pipeline_config import PipelineConfig

    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise typer.BadParameter(f"{path}: {err}", param_hint="--config") from None
        if not isinstance(values, dict):
            raise typer.BadParameter(f"{path}: expected a mapping of PipelineConfig fields", param_hint="--config")
    dedup = dict(values.get("dedup") or {})
    for key in ("threshold", "num_perm", "exact", "near", "near_mode"):
        if flags.get(key) is not None:
            dedup[key] = flags[key]
    if dedup:
        values["dedup"] = dedup
    if flags.get("decontaminate"):
        values["decontaminate"] = dict(values.get("decontaminate") or {}) | {
            "paths": [str(p) for p in flags["decontaminate"]]}
    for key in ("kind", "backend", "workers", "scrub_pii"):
        if flags.get(key) is not None:
            values[key] = flags[key]
    try:
        return PipelineConfig.model_validate(values)
    except ValidationError as err:
        where = f"{path}: " if path else ""
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        raise typer.BadParameter(where + problems) from None


def _run(fn: Any) -> Any:
    try:
        return fn()
    except (FileNotFoundError, ValueError, ImportError) as err:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/] {err}", highlight=False)
        raise typer.Exit(1) from None


def _print(summary: Summary, as_json: bool, title: str, tokens: dict[str, int] | None = None) -> None:
    if as_json:
        typer.echo(json.dumps(summary.to_dict() | ({"tokens_histogram": tokens} if tokens else {}), indent=1))
        return
    console = Console()
    table = Table(title=title, show_header=False)
    table.add_row("records read", str(summary.read))
    table.add_row("kept" if summary.output else "unique and valid", str(summary.kept))
    for kind, count in sorted(summary.removed.items()):
        table.add_row(f"removed: {kind}", str(count))
    table.add_row("roles", ", ".join(f"{r} {n}" for r, n in sorted(summary.roles.items())))
    table.add_row("words per record", ", ".join(f"{k} {v}" for k, v in summary.histogram().items() if v))
    if tokens is not None:
        table.add_row("tokens per record", ", ".join(f"{k} {v}" for k, v in tokens.items() if v))
    if summary.pii:
        table.add_row("PII scrubbed", ", ".join(f"{k} {v}" for k, v in sorted(summary.pii.items())))
    if summary.clusters is not None:
        c = summary.clusters
        table.add_row("near-duplicate clusters", f"{c['count']} ({c['records']} records); largest "
                      + (", ".join(str(n) for n in c["largest"]) or "-"))
    table.add_row("backend", summary.backend)
    table.add_row("seconds", f"{summary.seconds:.2f}")
    if summary.report:
        table.add_row("report", summary.report)
    console.print(table)
    for removed in summary.examples:
        console.print(f"  {removed}", markup=False, highlight=False, soft_wrap=True)
    for members in (summary.clusters or {}).get("samples", []):
        console.print(f"  cluster: {', '.join(members)}", markup=False, highlight=False, soft_wrap=True)
