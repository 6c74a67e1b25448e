"""The `reactor` command line.

Commands stay thin: they parse options, call into the library and print. Everything
they show is available from Python too (`reactor_core.env`).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from reactor_core.version import __version__
from reactor_core.env import (
    Environment,
    Probes,
    Profile,
    detect_environment,
    recommend_profile,
)
from reactor_core.gcp.metadata import DEFAULT_METADATA_TIMEOUT_S, MetadataClient
from reactor_core.launch.cli import app as launch_app
from reactor_core.data_cli import data_app

app = typer.Typer(
    name="reactor",
    help=(
        "Reactor Core: the JARVIS training engine. It turns chat, preference and prompt data "
        "into PRIME model directories (SFT, LoRA/QLoRA, DPO, GRPO) on a laptop, a GPU box or "
        "a spot GCP VM, for jarvis-prime to serve."
    ),
    no_args_is_help=True,
    add_completion=False,
)
app.add_typer(launch_app, name="launch")
app.add_typer(data_app, name="data")  # `reactor data inspect|clean|pack` (data_cli.py)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"reactor-core {__version__}")
        raise typer.Exit()


# Without a callback typer collapses a single-command app into that command, and
# `reactor env` would stop parsing; the callback keeps `env` a subcommand.
@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Reactor Core: the JARVIS training engine."""


@app.command()
def env(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the environment and profile as JSON.")
    ] = False,
    metadata_timeout: Annotated[
        float,
        typer.Option(
            "--metadata-timeout",
            min=0.0,
            help="Seconds to wait for the GCP metadata server (off GCP this is paid once).",
        ),
    ] = DEFAULT_METADATA_TIMEOUT_S,
) -> None:
    """Show the detected environment and the recommended training profile."""
    probes = Probes(metadata_get=MetadataClient.from_env(timeout_s=metadata_timeout).get)
    environment = detect_environment(probes)
    profile = recommend_profile(environment)

    if as_json:
        payload = {
            "reactor_core": __version__,
            "environment": environment.to_dict(),
            "profile": profile.to_dict(),
        }
        typer.echo(json.dumps(payload, indent=2))
        return

    console = Console()
    console.print(_environment_table(environment))
    console.print(_profile_panel(profile))


def _environment_table(env: Environment) -> Table:
    table = Table(title="Environment", show_header=False, title_justify="left")
    table.add_column("key", style="bold", no_wrap=True)  # values wrap; keys and names are never cut
    table.add_column("value")

    gpus = ", ".join(f"{gpu.name} ({gpu.memory_gb:g} GB)" for gpu in env.cuda_gpus) or "none"
    if env.gcp.on_gcp:
        gcp = f"{env.gcp.machine_type} in {env.gcp.zone}"
        if env.gcp.preemptible:
            gcp += f", spot ({env.gcp.provisioning_model or 'preemptible'})"
    else:
        gcp = "no"

    table.add_row("OS / arch", f"{env.os} / {env.arch}")
    table.add_row("Python", env.python)
    table.add_row("torch", env.torch_version or "not installed")
    table.add_row("CPUs", str(env.cpu_count))
    table.add_row("RAM", f"{env.ram_gb:g} GB" if env.ram_gb is not None else "unknown")
    table.add_row("Apple Silicon", _yes_no(env.apple_silicon))
    table.add_row("MPS", _yes_no(env.mps_available))
    table.add_row("CUDA GPUs", gpus)
    table.add_row("GCP VM", gcp)
    return table


def _profile_panel(profile: Profile) -> Panel:
    checkpoint = (
        f"every {profile.checkpoint_every_minutes:g} min"
        if profile.checkpoint_every_minutes is not None
        else "by steps only"
    )
    body = "\n".join(
        [
            profile.reason,
            "",
            f"device            {profile.device}",
            f"max trainable     {profile.max_trainable}",
            f"auto-resume       {'on' if profile.auto_resume else 'off'}",
            f"checkpoints       {checkpoint}",
        ]
    )
    title = f"Recommended profile: {profile.name}"
    return Panel(body, title=title, title_align="left", expand=False)


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


@app.command(context_settings={"allow_extra_args": False})
def train(
    recipe: Annotated[str, typer.Argument(help="YAML recipe whose keys are TrainingConfig fields.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. lora_rank=8 max_steps=50.")] = None,
    nproc: Annotated[int, typer.Option("--nproc", min=1, help=(
        "Processes on this machine: more than 1 launches torchrun and shards the model with FSDP2 "
        "(gloo on CPU, nccl on CUDA). batch_size is per process."))] = 1,
    nnodes: Annotated[int, typer.Option("--nnodes", min=1, help=(
        "Machines in the run; each runs this command with its own --node-rank (what `reactor launch --nodes` "
        "does on SkyPilot)."))] = 1,
    node_rank: Annotated[int, typer.Option("--node-rank", min=0, help="This machine's rank, 0 on the first.")] = 0,
    master_addr: Annotated[str, typer.Option("--master-addr", help="The first machine's address.")] = "127.0.0.1",
    master_port: Annotated[int, typer.Option("--master-port", min=1, max=65535,
                                             help="The first machine's rendezvous port.")] = 29500,
) -> None:
    """Train from a YAML recipe (SFT, DPO or GRPO; LoRA, QLoRA or full fine-tuning; SFT of
    vision models on chat data with images).

    Data is validated completely before anything is written; the result is a PRIME
    model directory under `output_dir`. The run resumes from the newest complete checkpoint (`resume: auto`).

    On SIGTERM/SIGINT or a GCP preemption notice it checkpoints and exits with code 75.
    Exit code 2 means a bad recipe, data or checkpoint.
    """
    import os

    if (nproc > 1 or nnodes > 1) and "WORLD_SIZE" not in os.environ:
        from reactor_core.training.launch import Nodes, launch_torchrun

        try:
            nodes = Nodes(nnodes, node_rank, master_addr, master_port)
        except ValueError as err:
            raise typer.BadParameter(str(err), param_hint="--node-rank") from None
        raise typer.Exit(code=launch_torchrun(recipe, overrides or [], nproc, nodes))
    raise typer.Exit(code=_train_here(recipe, overrides or []))


def _train_here(recipe: str, overrides: list[str]) -> int:
    """Train in this process (one rank of a torchrun job, or the whole run); the exit code."""
    from reactor_core.data import DataValidationError
    from reactor_core.training import ConfigError, Trainer, load_config
    from reactor_core.checkpoints.store import CheckpointError
    from reactor_core.training.distributed import shutdown_distributed
    from reactor_core.training.launch import report_exit_code
    from reactor_core.training.model import ModelSourceError
    from reactor_core.gcp.preemption import EXIT_PREEMPTED, Preempted

    err_console = Console(stderr=True, soft_wrap=True)  # `file:line: reason` stays on one line, greppable
    try:
        config = load_config(recipe, overrides)
        result = Trainer(config).train()
    except Preempted as err:
        err_console.print(f"[bold yellow]{err}[/]; run the same command again to resume", highlight=False)
        return report_exit_code(EXIT_PREEMPTED)
    except (ConfigError, DataValidationError, ModelSourceError, CheckpointError, ValueError, FileNotFoundError) as err:
        err_console.print(f"[bold red]error:[/] {err}", markup=True, highlight=False)
        return report_exit_code(2)
    finally:
        shutdown_distributed()
    if result.model_dir is None and not result.cancelled:
        return 0  # a rank other than 0 of a distributed run: rank 0 reports
    console = Console()
    if result.cancelled:
        console.print(f"cancelled at step {result.state.step}")
        return 1
    m = result.metrics
    console.print(
        f"[green]done[/]: {m['steps']} steps, {m['train_tokens']:,} tokens at {m['tokens_per_s']:.0f} tok/s; "
        f"eval loss {m.get('eval_loss', float('nan')):.4f} (ppl {m.get('perplexity', float('nan')):.2f})"
    )
    console.print(f"PRIME model: {result.model_dir}")
    console.print(f"logs: {result.output_dir / 'logs'} (metrics.jsonl, tensorboard/)")
    return 0


@app.command()
def drill(
    recipe: Annotated[str, typer.Argument(help="YAML recipe to drill.")],
    kills: Annotated[int, typer.Option("--kills", min=1, help="How many times to kill the run.")] = 3,
    work_dir: Annotated[str, typer.Option(help="Where the two runs go.")] = "./reactor-drill",
    checkpoint_every: Annotated[int, typer.Option(help="checkpoint_every_steps for both runs.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed for the kill times and signals.")] = 0,
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value recipe overrides.")] = None,
) -> None:
    """Preemption drill: kill a run K times (SIGTERM and SIGKILL), resume, compare bitwise.

    Trains the recipe once uninterrupted, then again while killing it at random moments
    and restarting it, and reports whether the final weights and per-step losses match.
    """
    from pathlib import Path

    from reactor_core.drill import run_drill

    console = Console()
    report = run_drill(Path(recipe), Path(work_dir), kills, seed=seed, checkpoint_every_steps=checkpoint_every,
                       overrides=overrides or [], log=console.print)
    table = Table("kill", "signal", "after (s)", "exit code", "logged up to step")
    for k in report.kills:
        table.add_row(str(k["kill"]), k["signal"], f"{k['after_s']:.1f}", str(k["exit_code"]), str(k["last_logged_step"]))
    console.print(table)
    verdict = "[green]PASS[/]" if report.passed else "[red]FAIL[/]"
    console.print(f"{verdict}: weights bitwise identical: {report.identical_weights} "
                  f"(max |diff| {report.max_abs_weight_diff:.3g}); per-step losses identical: {report.identical_losses}; "
                  f"uninterrupted {report.straight_seconds:.0f}s, drilled {report.drilled_seconds:.0f}s")
    if not report.passed:
        raise typer.Exit(code=1)


if __name__ == "__main__":
    app()
