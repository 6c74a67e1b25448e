"""`reactor launch`: the command group (registered by `reactor_core.cli`).

    reactor launch RECIPE.yaml --cloud gcp --gpus L4:1 [--nodes N] [--no-spot] [--dry-run]
    reactor launch fetch RECIPE.yaml        # the PRIME model, once the job is done
    reactor launch status | logs [JOB_ID] | cancel JOB_ID   # sky jobs queue | logs | cancel

`reactor launch RECIPE` is `reactor launch run RECIPE`: a group whose first word is not
one of its commands runs `run` (`_DefaultRun`), so the one command people type most has
no extra word.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from reactor_core.version import __version__


class _DefaultRun(TyperGroup):
    """`reactor launch RECIPE ...` means `reactor launch run RECIPE ...`."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = ["run", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_DefaultRun,
    help=("Train a recipe on spot VMs as a SkyPilot managed job (recovered after preemption), and bring the "
          "PRIME model back. `reactor launch RECIPE` is `reactor launch run RECIPE`."),
    no_args_is_help=True,
    add_completion=False,
)
console = Console(soft_wrap=True)  # commands and paths stay on one line, copyable
err_console = Console(stderr=True, soft_wrap=True)

PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _fail(err: Exception, code: int = 2) -> None:
    err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False)  # `skypilot[gcp]` is text
    raise typer.Exit(code=code)


def default_name(recipe: str) -> str:
    """A SkyPilot job name from the recipe's file name: `chat v2.yaml` -> `reactor-chat-v2`."""
    stem = re.sub(r"[^a-z0-9]+", "-", Path(recipe).stem.lower()).strip("-")
    return f"reactor-{stem}" if stem else "reactor-job"


@app.command("run")
def run(
    recipe: Annotated[str, typer.Argument(help="YAML recipe (as for `reactor train`); `checkpoint_remote` must be gs://.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. max_steps=500.")] = None,
    cloud: Annotated[str, typer.Option(help="SkyPilot infra: gcp (what this is tested against), aws, azure, ...")] = "gcp",
    spot: Annotated[bool, typer.Option("--spot/--no-spot", help="Spot VMs (preemptible, cheaper).")] = True,
    gpus: Annotated[str, typer.Option(help="GPUs per node, NAME[:COUNT] as SkyPilot names them (L4:1, A100-80GB:8); "
                                      "'none' for a CPU VM.")] = "L4:1",
    nodes: Annotated[int, typer.Option(min=1, help="VMs; more than 1 trains with torchrun + FSDP across them.")] = 1,
    region: Annotated[str | None, typer.Option(help="Pin a region (e.g. us-central1).")] = None,
    name: Annotated[str | None, typer.Option(help="Job name (default: reactor-<recipe file name>).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the recipe, print the task YAML, the `sky` "
                                          "command and SkyPilot's price; upload and launch nothing.")] = False,
    detach: Annotated[bool, typer.Option("--detach", help="Submit and return; `reactor launch fetch` later.")] = False,
    pull_to: Annotated[str | None, typer.Option(help="Where the model comes back (default: the recipe's "
                                                "output_dir, here).")] = None,
    install: Annotated[str | None, typer.Option(help="What setup pip-installs on the VMs (default: this "
                                                "reactor-core, as a wheel staged with the inputs when it was installed "
                                                "from a folder, else reactor-core[gcp]==<this version>; a wheel URL or "
                                                "git+https://...).")] = None,
    sky_python: Annotated[str | None, typer.Option(help="Python of SkyPilot's virtualenv (or $REACTOR_SKY_PYTHON; "
                                                   "else `sky` on PATH).")] = None,
) -> None:
    """Check RECIPE here, stage its data in its bucket, and run it as a SkyPilot managed job.

    SkyPilot recovers the job when a spot VM is preempted (and when `reactor train` exits 75
    after its emergency checkpoint); a bad recipe (exit 2) fails for good. Logs stream here;
    at the end the PRIME model comes back, every file checked against prime.json's sha256,
    and goes into the jarvis-prime store when `prime` is installed.
    """
    from reactor_core.launch.bucket import Bucket, plan_inputs, stage_inputs
    from reactor_core.launch.preflight import PreflightError, run_preflight
    from reactor_core.launch.skypilot import SkyPilotError, find_skypilot, launch_command
    from reactor_core.launch.source import WHEELS, build_wheel, local_source, vm_requirement
    from reactor_core.launch.task import INPUTS_MOUNT, Accelerators, BucketLayout, LaunchSpec, build_task, task_yaml

    source = None if install else local_source()  # a clone's reactor-core goes to the VMs as a wheel
    try:
        accelerators = None if gpus.lower() == "none" else Accelerators.parse(gpus)
        spec = LaunchSpec(name=name or default_name(recipe), cloud=cloud, gpus=accelerators, nodes=nodes, spot=spot,
                          region=region, install=install or vm_requirement(__version__, INPUTS_MOUNT, source))
    except ValueError as err:
        _fail(err)
    try:
        sky = find_skypilot(sky_python)
    except SkyPilotError as err:
        _fail(err)
    try:
        checked = run_preflight(recipe, overrides or [], accelerators, nodes)
    except PreflightError as err:
        _fail(err)
    _print_preflight(checked)
    layout = BucketLayout(checked.config.checkpoint_remote)
    task = build_task(spec, layout, __version__)
    text = task_yaml(task)
    try:
        parsed = sky.parse(text, price=dry_run)
    except (SkyPilotError, subprocess.TimeoutExpired) as err:
        _fail(err)

    if dry_run:
        typer.echo(text)  # plain: the YAML copies into a file as it is
        console.print(f"[green]valid[/]: SkyPilot ({sky.python}) parsed it: {parsed['num_nodes']} x "
                      f"{parsed['accelerators'] or 'CPU'} on {parsed['cloud']}, spot {parsed['use_spot']}, "
                      f"recovery {parsed['job_recovery']}", highlight=False)
        console.print("would run: " + " ".join(launch_command(sky, "<task.yaml>", spec.name)), highlight=False)
        _print_price(parsed, spot)
        return

    staged = plan_inputs(_launch_values(recipe, overrides or [], checked), lambda path: checked.images.get(path, False))
    with tempfile.TemporaryDirectory(prefix="reactor-launch-") as tmp:
        if source is not None:
            try:
                wheel = build_wheel(source, Path(tmp) / WHEELS, __version__)
            except RuntimeError as err:
                _fail(err)
            staged.files[f"{WHEELS}/{wheel.name}"] = wheel
            console.print(f"this machine's reactor-core ({escape(str(source))}) goes to the VMs as {wheel.name}",
                          highlight=False)
        try:
            stage_inputs(staged, Bucket(layout.inputs), log=console.print)
        except (OSError, ValueError) as err:
            _fail(f"staging the inputs in {layout.inputs}: {err}")
        task_file = Path(tmp) / "task.yaml"
        task_file.write_text(text, encoding="utf-8")
        code = subprocess.call(launch_command(sky, str(task_file), spec.name, detach=detach))
    if code != 0:
        _fail(f"`sky jobs launch` exited {code}; `reactor launch status` shows the job", code=code)
    if detach:
        console.print(f"submitted {spec.name}; `reactor launch logs --name {spec.name}`, then "
                      f"`reactor launch fetch {recipe}`", highlight=False)
        return
    _fetch_and_import(checked.config, layout, Path(pull_to) if pull_to else None)


@app.command("fetch")
def fetch(
    recipe: Annotated[str, typer.Argument(help="The recipe the job was launched with.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="The same key=value overrides.")] = None,
    pull_to: Annotated[str | None, typer.Option(help="Where the model comes (default: the recipe's output_dir).")] = None,
) -> None:
    """Bring a finished job's PRIME model back from the recipe's bucket (sha256 verified)."""
    from reactor_core.launch.task import BucketLayout
    from reactor_core.training import ConfigError, load_config

    try:
        config = load_config(recipe, overrides or [])
    except (ConfigError, ValueError) as err:
        _fail(err)
    if not (config.checkpoint_remote or "").startswith("gs://"):
        _fail(f"{recipe}: `checkpoint_remote` is not a gs:// bucket; nothing was launched from it")
    _fetch_and_import(config, BucketLayout(config.checkpoint_remote), Path(pull_to) if pull_to else None)


def _fetch_and_import(config, layout, pull_to: Path | None) -> None:
    from reactor_core.launch.bucket import Bucket, FetchError, fetch_model
    from reactor_core.training.prime_dir import output_name

    model = f"{output_name(config)}-{config.output_version}"
    try:
        local = fetch_model(Bucket(layout.output), model, pull_to or Path(config.output_dir))
    except FetchError as err:
        _fail(f"{err} (is the job done? `reactor launch status`)")
    console.print(f"[green]fetched[/] {model} from {escape(layout.output)}, every file verified: {escape(str(local))}",
                  highlight=False)
    _import_into_store(local, output_name(config), config.output_version)


def _import_into_store(local: Path, name: str, version: str) -> None:
    """`prime pull NAME --from DIR` when jarvis-prime is installed (Reactor Core never imports it).

    An adapter without merged weights (`merge_adapter: false`) goes in too: `prime pull
    --from` merges it onto its base, which must be in the store (it says how to get it)."""
    import json

    prime = shutil.which("prime")
    if prime is None:
        console.print(f"jarvis-prime not installed: the model stays at {escape(str(local))}")
        return
    task = json.loads((local / "prime.json").read_text(encoding="utf-8")).get("task", "chat")
    command = [prime, "pull", name, "--from", str(local), "--version", version, "--task", task]
    if subprocess.call(command) != 0:
        _fail(f"`{' '.join(command)}` failed; the model is at {local}", code=1)


def _launch_values(recipe: str, overrides: list[str], checked) -> dict:
    """The recipe as the VMs get it: a model name that only this machine's plugins resolve
    (a jarvis-prime catalog name) becomes the folder it resolved to, which travels with the
    inputs, and the output keeps the name it would have had here (`reactor launch fetch`
    looks for that name)."""
    from reactor_core.training.prime_dir import output_name

    values = _recipe_values(recipe, overrides)
    if checked.local_model is not None:
        values.update(model_name=checked.local_model, output_name=output_name(checked.config))
    return values


def _recipe_values(recipe: str, overrides: list[str]) -> dict:
    """The recipe's keys with the overrides applied (as `reactor train` would read them)."""
    import yaml

    from reactor_core.training.config import parse_overrides

    values = yaml.safe_load(Path(recipe).read_text(encoding="utf-8")) or {}
    return {**values, **parse_overrides(overrides)}


def _print_preflight(checked) -> None:
    table = Table(title="checked here, before any VM", show_header=False, title_justify="left")
    table.add_column("check", no_wrap=True, style="bold")
    table.add_column("result")
    table.add_row("recipe", escape(f"{checked.config.method}, {checked.config.model_name}"))
    for line in checked.data:
        table.add_row("data", escape(line))
    table.add_row("model", escape(checked.model))
    for part, size in checked.memory_rows:
        table.add_row(escape(f"memory: {part}"), size)
    table.add_row("memory", escape(checked.memory_note))
    console.print(table)


def _print_price(parsed: dict, spot: bool) -> None:
    price = parsed.get("price")
    if price:
        console.print(f"SkyPilot's price: ${price['hourly']:.2f}/hour ({parsed['num_nodes']} x "
                      f"{price['instance_type']}, {'spot' if spot else 'on-demand'}; plus the small managed-jobs "
                      "controller VM while jobs run)", highlight=False)
    else:
        reason = escape(parsed.get("price_error", "no GPU to price"))
        hint = " (SkyPilot downloads its price catalog on first use: rerun --dry-run online)" if parsed["accelerators"] else ""
        console.print(f"price unknown: {reason[:160]}{'...' if len(reason) > 160 else ''}{hint}", highlight=False)


def _pass_through(action: str, ctx: typer.Context, sky_python: str | None) -> None:
    from reactor_core.launch.skypilot import SkyPilotError, find_skypilot, jobs_command

    try:
        sky = find_skypilot(sky_python)
    except SkyPilotError as err:
        _fail(err)
    raise typer.Exit(code=subprocess.call(jobs_command(sky, action, list(ctx.args))))


SKY_PYTHON_OPTION = typer.Option("--sky-python", help="Python of SkyPilot's virtualenv.")


@app.command("status", context_settings=PASS_THROUGH)
def status(ctx: typer.Context, sky_python: Annotated[str | None, SKY_PYTHON_OPTION] = None) -> None:
    """`sky jobs queue ARGS`: the managed jobs and their states (RECOVERING after a preemption)."""
    _pass_through("status", ctx, sky_python)


@app.command("logs", context_settings=PASS_THROUGH)
def logs(ctx: typer.Context, sky_python: Annotated[str | None, SKY_PYTHON_OPTION] = None) -> None:
    """`sky jobs logs ARGS`: a job's logs (`--name NAME` or its id)."""
    _pass_through("logs", ctx, sky_python)


@app.command("cancel", context_settings=PASS_THROUGH)
def cancel(ctx: typer.Context, sky_python: Annotated[str | None, SKY_PYTHON_OPTION] = None) -> None:
    """`sky jobs cancel ARGS`: stop a job (its checkpoints stay in the bucket)."""
    _pass_through("cancel", ctx, sky_python)
