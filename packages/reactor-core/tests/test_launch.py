"""`reactor launch`: the SkyPilot task, checked offline by SkyPilot's own code, and its run
script executed here as the managed job would run it on a VM.

SkyPilot lives in its own virtualenv ($REACTOR_SKY_PYTHON, else the repository's
`.venv-sky`, which `make setup-test` creates); the tests that need its code skip
without it. Nothing here reaches a cloud: the bucket is gcp-storage-emulator on
127.0.0.1, the file mounts are folders, the nodes are processes of this machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from reactor_core.checkpoints.remote import GcsRemote, open_remote
from reactor_core.cli import app
from reactor_core.gcp.preemption import EXIT_PREEMPTED
from reactor_core.launch.bucket import Bucket, FetchError, fetch_model, plan_inputs, stage_inputs
from reactor_core.launch.preflight import PreflightError, run_preflight
from reactor_core.launch.skypilot import SKY_PYTHON_ENV, SkyPilot, SkyPilotError, find_skypilot, jobs_command
from reactor_core.launch.task import Accelerators, BucketLayout, LaunchSpec, build_task, task_yaml
from reactor_core.version import __version__

from reactor_testing import logged, model_dir, write_chat_data, write_recipe

REPO = Path(__file__).resolve().parents[3]


def sky_python() -> Path | None:
    given = os.environ.get(SKY_PYTHON_ENV)
    path = Path(given) if given else REPO / ".venv-sky/bin/python"
    return path if path.is_file() and (path.parent / "sky").is_file() else None


needs_sky = pytest.mark.skipif(sky_python() is None, reason="no SkyPilot virtualenv (make setup-test creates .venv-sky)")


@pytest.fixture
def sky(tmp_path, monkeypatch) -> SkyPilot:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # SkyPilot writes ~/.sky; never the user's
    return find_skypilot(str(sky_python()))


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    return write_chat_data(tmp_path_factory.mktemp("data") / "train.jsonl")


@pytest.fixture
def gcs_emulator(monkeypatch):
    """gcp-storage-emulator on 127.0.0.1 with bucket `spot-ckpt` (as test_remote_checkpoints)."""
    from gcp_storage_emulator.server import create_server

    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="spot-ckpt")
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    yield "gs://spot-ckpt/runs/tiny"
    server.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_values(model: Path, data: Path, bucket: str, **extra) -> dict:
    values = dict(model_name=str(model), data_path=str(data), max_steps=12, batch_size=4, lora_rank=4,
                  lora_dropout=0.0, max_seq_length=64, num_samples=0, merge_adapter=False, seed=3, packing=False,
                  mixed_precision="fp32", checkpoint_every_steps=4, checkpoint_remote=bucket, output_name="tiny-chat")
    return values | extra


# -- the task ------------------------------------------------------------------------------

@needs_sky
def test_the_task_parses_with_skypilots_loader_and_holds_resources_recovery_mounts_envs_and_run(sky):
    spec = LaunchSpec(name="reactor-chat", gpus=Accelerators.parse("A100-80GB:8"), nodes=2, spot=True,
                      region="us-central1")
    task = build_task(spec, BucketLayout("gs://b/runs/chat"), "1.8.0")
    parsed = sky.parse(task_yaml(task))
    assert parsed["name"] == "reactor-chat" and parsed["num_nodes"] == 2
    assert parsed["cloud"] == "gcp" and parsed["region"] == "us-central1" and parsed["use_spot"] is True
    assert parsed["accelerators"] == {"A100-80GB": 8}
    assert parsed["job_recovery"]["recover_on_exit_codes"] == [EXIT_PREEMPTED]
    assert parsed["job_recovery"]["max_restarts_on_errors"] == 0
    assert parsed["file_mounts"] == {
        "/reactor/inputs": {"source": "gs://b/runs/chat/launch/inputs", "mode": "COPY"},
        "/reactor/output": {"source": "gs://b/runs/chat/launch/output", "mode": "MOUNT_CACHED"},
    }
    assert parsed["envs"]["REACTOR_CHECKPOINTS"] == "gs://b/runs/chat"
    assert "pip install 'reactor-core[gcp]==1.8.0'" in parsed["setup"]
    assert "reactor train recipe.yaml" in parsed["run"] and "$SKYPILOT_NODE_RANK" not in parsed["run"]
    assert "${SKYPILOT_NODE_RANK:-0}" in parsed["run"] and "--master-addr" in parsed["run"]


@needs_sky
def test_skypilots_recovery_restarts_on_exit_75_and_not_on_exit_2(sky):
    """SkyPilot's own decision (`should_restart_on_failure`) with the task's job_recovery."""
    parsed = sky.parse(task_yaml(build_task(LaunchSpec(name="reactor-x"), BucketLayout("gs://b/x"), "1.8.0")))
    script = (
        "import json, sys\n"
        "from sky.jobs.recovery_strategy import StrategyExecutor\n"
        "recovery = json.loads(sys.argv[1])\n"
        "def restarts(code):\n"
        "    ex = object.__new__(StrategyExecutor)\n"
        "    ex.max_restarts_on_errors = recovery['max_restarts_on_errors']\n"
        "    ex.recover_on_exit_codes = recovery['recover_on_exit_codes']\n"
        "    ex.restart_cnt_on_failure = 0\n"
        "    return [ex.should_restart_on_failure(exit_codes=[code]) for _ in range(3)]\n"
        "print(json.dumps({c: restarts(c) for c in (75, 2, 1)}))\n"
    )
    run = subprocess.run([str(sky.python), "-c", script, json.dumps(parsed["job_recovery"])], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    decisions = json.loads(run.stdout.strip().splitlines()[-1])
    assert decisions == {"75": [True, True, True], "2": [False, False, False], "1": [False, False, False]}


@needs_sky
def test_a_task_skypilot_refuses_is_an_error_quoting_skypilot(sky):
    text = task_yaml(build_task(LaunchSpec(name="reactor-x"), BucketLayout("gs://b/x"), "1.8.0"))
    with pytest.raises(SkyPilotError, match="resourcez.*resources|resources.*resourcez"):
        sky.parse(text.replace("resources:", "resourcez:"))


@needs_sky
def test_dry_run_checks_the_recipe_and_prints_the_task_the_command_and_the_price_or_why_not(
        sky, tiny_llama_dir, chat_file, tmp_path):
    recipe = write_recipe(tmp_path / "chat.yaml", launch_values(tiny_llama_dir, chat_file, "gs://spot-ckpt/runs/tiny"))
    result = CliRunner().invoke(app, ["launch", str(recipe), "--dry-run", "--gpus", "L4:1", "--nodes", "2",
                                      "--sky-python", str(sky.python)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "32 examples" in out and "fits one L4" in out  # checked here
    assert "recover_on_exit_codes:\n    - 75" in out and "num_nodes: 2" in out  # the task YAML, as written
    assert "valid" in out and "jobs launch <task.yaml> --name reactor-chat --yes" in out
    assert "SkyPilot's price: $" in out or "price unknown:" in out  # offline: the catalog cannot download


@needs_sky
@pytest.mark.parametrize("spot, price", [(True, "$1.00/hour (2 x g2-standard-4, spot"),
                                         (False, "$2.80/hour (2 x g2-standard-4, on-demand")])
def test_dry_run_prices_the_job_from_skypilots_catalog_when_it_has_one(sky, tiny_llama_dir, chat_file, tmp_path,
                                                                     spot, price):
    """A catalog SkyPilot already downloaded (here a one-instance stand-in in ~/.sky, which
    SkyPilot then never refreshes): L4 on g2-standard-4 at 0.25 (spot) / 0.70 an hour for the
    VM and the same for the GPU, so 2 nodes cost 2 x (0.25 + 0.25) or 2 x (0.70 + 0.70)."""
    catalog = Path(os.environ["HOME"]) / ".sky/catalogs/v8/gcp/vms.csv"
    catalog.parent.mkdir(parents=True)
    catalog.write_text("InstanceType,AcceleratorName,AcceleratorCount,vCPUs,MemoryGiB,GpuInfo,Price,SpotPrice,Region,"
                       "AvailabilityZone\n"
                       "g2-standard-4,L4,1,4,16,L4,0.7,0.25,us-central1,us-central1-a\n"
                       "g2-standard-4,,,4,16,,0.7,0.25,us-central1,us-central1-a\n")
    recipe = write_recipe(tmp_path / "chat.yaml", launch_values(tiny_llama_dir, chat_file, "gs://spot-ckpt/runs/tiny"))
    result = CliRunner().invoke(app, ["launch", str(recipe), "--dry-run", "--gpus", "L4:1", "--nodes", "2",
                                      "--spot" if spot else "--no-spot", "--sky-python", str(sky.python)])
    assert result.exit_code == 0, result.output
    assert f"SkyPilot's price: {price}" in result.output


def test_the_recipe_is_checked_before_anything_is_launched(tiny_llama_dir, chat_file, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(chat_file.read_text() + '{"messages": [{"role": "user"}]}\n')
    with pytest.raises(PreflightError, match=rf"{bad.name}:33"):
        run_preflight(str(write_recipe(tmp_path / "a.yaml", launch_values(tiny_llama_dir, bad, "gs://b/x"))), [],
                      Accelerators("L4"), 1)
    with pytest.raises(PreflightError, match="`checkpoint_remote` must be a gs:// bucket"):
        run_preflight(str(write_recipe(tmp_path / "b.yaml", launch_values(tiny_llama_dir, chat_file, "/mnt/x"))), [],
                      Accelerators("L4"), 1)
    # 64 x 512 tokens of a 49k vocabulary: ~25 GiB of logits; no T4 (16 GiB), an H100 (80 GiB)
    big = str(write_recipe(tmp_path / "c.yaml", launch_values(tiny_llama_dir, chat_file, "gs://b/x", batch_size=64,
                                                              max_seq_length=512)))
    with pytest.raises(PreflightError, match=r"on T4:1: needs about .* GiB of GPU memory, 16\.0 GiB is free"):
        run_preflight(big, [], Accelerators("T4"), 1)
    assert "fits one H100" in run_preflight(big, [], Accelerators("H100"), 1).memory_note


def test_grpo_rewards_and_several_process_limits_are_checked_before_anything_is_launched(tiny_llama_dir, chat_file,
                                                                                         tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}.", "answer": str(i)}) + "\n" for i in range(8)))
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text("def says_it(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    grpo = dict(method="grpo", num_generations=2, max_completion_length=4)
    good = write_recipe(tmp_path / "g.yaml", launch_values(tiny_llama_dir, prompts, "gs://b/x", **grpo,
                                                           reward_funcs=["exact_answer", f"{rewards}:says_it"]))
    assert "8 examples" in run_preflight(str(good), [], Accelerators("L4"), 1).data[0]
    typo = write_recipe(tmp_path / "t.yaml", launch_values(tiny_llama_dir, prompts, "gs://b/x", **grpo,
                                                           reward_funcs=[f"{rewards}:say_it"]))
    with pytest.raises(PreflightError, match=r"my_rewards.py has no function 'say_it'"):
        run_preflight(str(typo), [], Accelerators("L4"), 1)
    qlora = str(write_recipe(tmp_path / "q.yaml", launch_values(tiny_llama_dir, chat_file, "gs://b/x",
                                                                quantize_base=True)))
    with pytest.raises(PreflightError, match=r"`quantize_base` \(QLoRA\) runs in one process, and L4:2 x 1"):
        run_preflight(qlora, [], Accelerators("L4", 2), 1)
    with pytest.raises(PreflightError, match=r"`quantize_base` \(QLoRA\) runs in one process, and L4:1 x 2"):
        run_preflight(qlora, [], Accelerators("L4", 1), 2)


def test_gpus_and_names_are_checked_where_they_are_given():
    assert Accelerators.parse("A100-80GB:8") == Accelerators("A100-80GB", 8)
    assert Accelerators.parse("L4") == Accelerators("L4", 1)
    for bad in ("L4:0", "L4:x", ":2", "L4 x2"):
        with pytest.raises(ValueError, match="--gpus"):
            Accelerators.parse(bad)
    with pytest.raises(ValueError, match="--name"):
        LaunchSpec(name="Chat_Run")


def test_without_skypilot_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.delenv(SKY_PYTHON_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SkyPilotError, match=r"python3 -m venv ~/.venv-sky .*pip install 'skypilot\[gcp\]'"):
        find_skypilot()
    with pytest.raises(SkyPilotError, match="no `sky` beside it"):
        find_skypilot(sys.executable)


def test_status_logs_cancel_pass_their_arguments_to_sky_jobs(tmp_path):
    env = tmp_path / "venv-sky/bin"
    env.mkdir(parents=True)
    (env / "python").write_text("")
    log = tmp_path / "calls"
    (env / "sky").write_text(f'#!/bin/sh\necho "$@" >> {log}\nexit 3\n')
    (env / "sky").chmod(0o755)
    for args, expected in ((["status", "--skip-finished"], "jobs queue --skip-finished"),
                           (["logs", "--name", "reactor-chat", "--no-follow"], "jobs logs --name reactor-chat --no-follow"),
                           (["cancel", "7", "-y"], "jobs cancel 7 -y")):
        result = CliRunner().invoke(app, ["launch", args[0], "--sky-python", str(env / "python"), *args[1:]])
        assert result.exit_code == 3, result.output  # sky's own exit code
        assert log.read_text().splitlines()[-1] == expected
    assert jobs_command(SkyPilot(env / "python", env / "sky"), "status", []) == [str(env / "sky"), "jobs", "queue"]


# -- the bucket ----------------------------------------------------------------------------

def test_inputs_are_staged_under_their_own_names_and_a_chat_file_with_images_brings_its_folder(tmp_path):
    data = tmp_path / "d"
    (data / "images").mkdir(parents=True)
    (data / "train.jsonl").write_text("{}\n")
    (data / "images/a.png").write_bytes(b"png")
    (data / ".cache").write_text("not staged")
    anchor = tmp_path / "anchor.jsonl"
    anchor.write_text("{}\n")
    model = tmp_path / "SmolLM2-135M"
    model.mkdir()
    (model / "config.json").write_text("{}")
    rewards = tmp_path / "my_rewards.py"
    rewards.write_text("def f(**kw): ...\n")
    staged = plan_inputs({"model_name": str(model), "data_path": str(data / "train.jsonl"),
                          "kl_anchor_path": str(anchor), "lora_rank": 8, "checkpoint_dir": "/home/me/ckpt",
                          "reward_funcs": ["length", f"{rewards}:f", "pkg.mod:g"]},
                         lambda path: path.endswith("train.jsonl"))
    assert staged.recipe == {"model_name": "model/SmolLM2-135M", "data_path": "data/data_path/train.jsonl",
                             "kl_anchor_path": "data/kl_anchor_path/anchor.jsonl", "lora_rank": 8,
                             "reward_funcs": ["length", "rewards/1/my_rewards.py:f", "pkg.mod:g"]}
    assert set(staged.files) == {"data/data_path/train.jsonl", "data/data_path/images/a.png",
                                 "data/kl_anchor_path/anchor.jsonl", "model/SmolLM2-135M/config.json",
                                 "rewards/1/my_rewards.py"}
    bucket = Bucket(str(tmp_path / "bucket"))
    stage_inputs(staged, bucket)
    assert (tmp_path / "bucket/data/data_path/images/a.png").read_bytes() == b"png"
    assert "data_path: data/data_path/train.jsonl" in (tmp_path / "bucket/recipe.yaml").read_text()


def prime_folder(root: Path, name: str = "tiny-chat-1.0.0") -> Path:
    from reactor_core.files import sha256_file

    folder = root / name
    (folder / "adapter").mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "adapter/adapter_model.safetensors").write_bytes(os.urandom(4096))
    files = {rel: {"sha256": sha256_file(folder / rel), "bytes": (folder / rel).stat().st_size}
             for rel in ("config.json", "adapter/adapter_model.safetensors")}
    (folder / "prime.json").write_text(json.dumps({"name": "tiny-chat", "version": "1.0.0", "task": "chat",
                                                   "files": files}))
    return folder


def upload_tree(folder: Path, bucket: Bucket, under: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            bucket.put(path, f"{under}/{path.relative_to(folder).as_posix()}")


def test_the_model_comes_back_from_the_bucket_verified_and_a_tampered_file_is_refused(tmp_path, gcs_emulator):
    folder = prime_folder(tmp_path / "vm")
    bucket = Bucket(BucketLayout(gcs_emulator).output)
    upload_tree(folder, bucket, folder.name)
    assert bucket.folders() == ["tiny-chat-1.0.0"]
    local = fetch_model(bucket, "tiny-chat-1.0.0", tmp_path / "here")
    for rel in ("prime.json", "config.json", "adapter/adapter_model.safetensors"):
        assert (local / rel).read_bytes() == (folder / rel).read_bytes()

    data = bytearray((folder / "adapter/adapter_model.safetensors").read_bytes())
    data[100] ^= 0xFF  # one byte, same size: only the sha256 tells
    (tmp_path / "flipped").write_bytes(bytes(data))
    bucket.put(tmp_path / "flipped", "tiny-chat-1.0.0/adapter/adapter_model.safetensors")
    with pytest.raises(FetchError, match=r"adapter_model.safetensors: sha256 .* does not match prime.json"):
        fetch_model(bucket, "tiny-chat-1.0.0", tmp_path / "again")
    assert not (tmp_path / "again/tiny-chat-1.0.0").exists()
    assert [p.name for p in (tmp_path / "again").iterdir()] == []  # no staging left behind
    with pytest.raises(FetchError, match="not in the bucket"):
        fetch_model(bucket, "other-1.0.0", tmp_path / "again")


def test_a_manifest_listing_a_path_outside_the_folder_is_refused(tmp_path):
    folder = prime_folder(tmp_path / "bucket")
    manifest = json.loads((folder / "prime.json").read_text())
    manifest["files"]["../../escape"] = {"sha256": "0" * 64}
    (folder / "prime.json").write_text(json.dumps(manifest))
    with pytest.raises(FetchError, match="unsafe path '../../escape'"):
        fetch_model(Bucket(str(tmp_path / "bucket")), folder.name, tmp_path / "here")
    assert not (tmp_path / "escape").exists()


# -- the run script, as the managed job runs it ----------------------------------------------

def download_tree(url: str, local: Path) -> Path:
    """What a COPY file mount does when a VM boots: the bucket folder onto local disk."""
    remote = GcsRemote(url)
    prefix = remote.prefix + "/"
    for blob in remote.client.list_blobs(remote.bucket, prefix=prefix):
        target = local / blob.name.removeprefix(prefix)
        target.parent.mkdir(parents=True, exist_ok=True)
        blob.download_to_filename(str(target))
    return local


def vm_env(task: dict, vm: Path, inputs: Path, output: Path, **skypilot: str) -> dict[str, str]:
    """The task's envs with the mounts as folders, plus what SkyPilot sets on a node."""
    env = {**os.environ, **task["envs"], "REACTOR_INPUTS": str(inputs), "REACTOR_OUTPUT": str(output),
           "REACTOR_WORK": str(vm / "work"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # `reactor` of this env
           "SKYPILOT_NODE_RANK": "0", "SKYPILOT_NUM_NODES": "1", "SKYPILOT_NODE_IPS": "127.0.0.1",
           "SKYPILOT_NUM_GPUS_PER_NODE": "0"}
    return env | skypilot


def start_run(task: dict, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(["bash", "-c", task["run"]], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_the_run_script_trains_is_sigtermed_and_a_recovered_vm_resumes_exactly_from_the_bucket(
        tiny_llama_dir, chat_file, tmp_path, gcs_emulator):
    values = launch_values(tiny_llama_dir, chat_file, gcs_emulator)
    staged = plan_inputs(values, lambda path: False)
    layout = BucketLayout(gcs_emulator)
    stage_inputs(staged, Bucket(layout.inputs))
    task = build_task(LaunchSpec(name="reactor-tiny", gpus=None), layout, "1.8.0")

    # the same job never interrupted, its checkpoints elsewhere in the bucket
    straight = tmp_path / "straight"
    env = vm_env(task, straight, download_tree(layout.inputs, straight / "inputs"), straight / "output",
                 REACTOR_CHECKPOINTS=f"{gcs_emulator}-straight")
    out, err = start_run(task, env).communicate(timeout=300)
    assert "PRIME model:" in out, err[-3000:]

    vm1 = tmp_path / "vm1"
    run = start_run(task, vm_env(task, vm1, download_tree(layout.inputs, vm1 / "inputs"), tmp_path / "output"))
    metrics = vm1 / "work/logs/metrics.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 6):
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)  # to the script, as SkyPilot's cancel or a VM shutdown does
    _, err = run.communicate(timeout=180)
    assert run.returncode == EXIT_PREEMPTED, err[-3000:]  # what recover_on_exit_codes names
    stopped_at = max(step for step, _ in logged(vm1 / "work", "train", "loss"))
    assert 6 <= stopped_at < 12
    assert open_remote(gcs_emulator).steps()[0] == stopped_at  # the emergency checkpoint is in the bucket
    assert not (tmp_path / "output").exists()  # nothing half-trained is published

    vm2 = tmp_path / "vm2"  # the recovery: a new VM, nothing on its disk
    run = start_run(task, vm_env(task, vm2, download_tree(layout.inputs, vm2 / "inputs"), tmp_path / "output"))
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    assert f"(step {stopped_at}" in err and "resumed from" in err
    resumed = logged(vm2 / "work", "train", "loss")
    assert [s for s, _ in resumed] == list(range(stopped_at + 1, 13))
    assert resumed == [(s, loss) for s, loss in logged(straight / "work", "train", "loss") if s > stopped_at]
    published = tmp_path / "output/tiny-chat-1.0.0"
    a = load_file(model_dir(straight / "work") / "adapter/adapter_model.safetensors")
    b = load_file(published / "adapter/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # and back to this machine through the bucket, as `reactor launch fetch` does
    upload_tree(published, Bucket(layout.output), published.name)
    recipe = write_recipe(tmp_path / "chat.yaml", values)
    result = CliRunner(env={"PATH": str(tmp_path / "no-prime")}).invoke(
        app, ["launch", "fetch", str(recipe), "--pull-to", str(tmp_path / "here")])
    assert result.exit_code == 0, result.output
    assert "every file verified" in result.output and "jarvis-prime not installed" in result.output
    assert (tmp_path / "here/tiny-chat-1.0.0/adapter/adapter_model.safetensors").read_bytes() == \
        (published / "adapter/adapter_model.safetensors").read_bytes()


def test_two_nodes_train_through_torchrun_with_skypilots_variables(tiny_llama_dir, chat_file, tmp_path):
    """Two "nodes" (processes here, 127.0.0.1) run the same script with the variables
    SkyPilot sets on each: they rendezvous at the head and train like one process with
    the same global batch; only the head publishes the model."""
    values = launch_values(tiny_llama_dir, chat_file, str(tmp_path / "bucket"), batch_size=2, max_steps=6,
                           checkpoint_every_steps=None)
    staged = plan_inputs(values, lambda path: False)
    stage_inputs(staged, Bucket(str(tmp_path / "inputs")))
    task = build_task(LaunchSpec(name="reactor-tiny", gpus=None, nodes=2), BucketLayout(str(tmp_path / "bucket")),
                      "1.8.0")
    port = str(free_port())
    runs = [start_run(task, vm_env(task, tmp_path / f"node{rank}", tmp_path / "inputs", tmp_path / "output",
                                   SKYPILOT_NODE_RANK=str(rank), SKYPILOT_NUM_NODES="2",
                                   SKYPILOT_NODE_IPS="127.0.0.1\n127.0.0.1", REACTOR_MASTER_PORT=port))
            for rank in (0, 1)]
    for rank, run in enumerate(runs):
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, (rank, err[-3000:])
    assert [p.name for p in (tmp_path / "output").iterdir()] == ["tiny-chat-1.0.0"]
    assert not (tmp_path / "node1/work/logs").exists()  # rank 0 alone logs and writes

    one = tmp_path / "one"  # one process, twice the batch: the same global batch
    single = subprocess.run([sys.executable, "-m", "reactor_core.cli", "train", str(tmp_path / "inputs/recipe.yaml"),
                             f"output_dir={one}", "checkpoint_remote=null", "batch_size=4"],
                            cwd=tmp_path / "inputs", capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    two_nodes, one_process = logged(tmp_path / "node0/work", "train", "loss"), logged(one, "train", "loss")
    assert [s for s, _ in two_nodes] == [s for s, _ in one_process] == list(range(1, 7))
    for (step, a), (_, b) in zip(one_process, two_nodes):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (step, a, b)


# -- the whole command, with a stand-in for SkyPilot's VMs ----------------------------------

FAKE_SKY = '''\
"""`sky jobs launch TASK ...` as one managed job on this machine: the COPY mount downloaded,
the run script run with SkyPilot's variables, the MOUNT_CACHED folder uploaded after."""
import json, os, subprocess, sys
from pathlib import Path

import yaml

from reactor_core.checkpoints.remote import GcsRemote
from reactor_core.launch.bucket import Bucket

vm = Path(os.environ["FAKE_SKY_VM"])
(vm / "calls").parent.mkdir(parents=True, exist_ok=True)
with open(vm / "calls", "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
task = yaml.safe_load(Path(sys.argv[3]).read_text())
(vm / "setup.sh").write_text(task["setup"])  # not run: it would pip-install into this environment
mounts = {path: Path(vm / path.strip("/")) for path in task["file_mounts"]}
remote = GcsRemote(task["file_mounts"]["/reactor/inputs"]["source"])
for blob in remote.client.list_blobs(remote.bucket, prefix=remote.prefix + "/"):
    target = mounts["/reactor/inputs"] / blob.name.removeprefix(remote.prefix + "/")
    target.parent.mkdir(parents=True, exist_ok=True)
    blob.download_to_filename(str(target))
env = {**os.environ, **task["envs"], "REACTOR_INPUTS": str(mounts["/reactor/inputs"]),
       "REACTOR_OUTPUT": str(mounts["/reactor/output"]), "REACTOR_WORK": str(vm / "work"), "SKYPILOT_NODE_RANK": "0",
       "SKYPILOT_NUM_NODES": str(task["num_nodes"]), "SKYPILOT_NODE_IPS": "127.0.0.1", "SKYPILOT_NUM_GPUS_PER_NODE": "0"}
code = subprocess.call(["bash", "-c", task["run"]], env=env)
output = Bucket(task["file_mounts"]["/reactor/output"]["source"])
for path in sorted(mounts["/reactor/output"].rglob("*")):
    if path.is_file():
        output.put(path, path.relative_to(mounts["/reactor/output"]).as_posix())
sys.exit(code)
'''


@needs_sky
def test_reactor_launch_checks_stages_launches_and_brings_the_model_back_into_the_store(
        tiny_llama_dir, chat_file, tmp_path, gcs_emulator, monkeypatch):
    env = tmp_path / "venv-sky/bin"  # SkyPilot's real Python (the task parser), a stand-in `sky`
    env.mkdir(parents=True)
    (env / "python").write_text(f'#!/bin/sh\nexec {sky_python()} "$@"\n')
    (env / "sky").write_text(f"#!{sys.executable}\n{FAKE_SKY}")
    for script in ("python", "sky"):
        (env / script).chmod(0o755)
    monkeypatch.setenv("FAKE_SKY_VM", str(tmp_path / "vm"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # reactor, prime
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    recipe = write_recipe(tmp_path / "chat.yaml", launch_values(tiny_llama_dir, chat_file, gcs_emulator,
                                                                merge_adapter=True, max_steps=4))
    result = CliRunner().invoke(app, ["launch", str(recipe), "--gpus", "none", "--sky-python", str(env / "python"),
                                      "--pull-to", str(tmp_path / "here")])
    assert result.exit_code == 0, result.output
    (call,) = [json.loads(line) for line in (tmp_path / "vm/calls").read_text().splitlines()]
    assert call[:2] == ["jobs", "launch"] and call[3:] == ["--name", "reactor-chat", "--yes", "--secret", "HF_TOKEN"]
    staged = yaml_of(Bucket(BucketLayout(gcs_emulator).inputs), "recipe.yaml", tmp_path)
    assert staged["model_name"] == f"model/{tiny_llama_dir.name}" and staged["data_path"] == "data/data_path/train.jsonl"
    # the VMs install this clone's reactor-core: the wheel staged with the inputs, not an index's release
    wheel = f"reactor_core-{__version__}-py3-none-any.whl"
    assert f"pip install '/reactor/inputs/wheels/{wheel}[gcp]'" in (tmp_path / "vm/setup.sh").read_text()
    with zipfile.ZipFile(tmp_path / "vm/reactor/inputs/wheels" / wheel) as built:
        assert "reactor_core/launch/source.py" in built.namelist()
    local = tmp_path / "here/tiny-chat-1.0.0"
    assert "every file verified" in result.output
    assert (local / "model.safetensors").read_bytes() == \
        (tmp_path / "vm/work/tiny-chat-1.0.0/model.safetensors").read_bytes()
    if shutil.which("prime"):  # jarvis-prime beside it: the model is in its store
        stored = Path(os.environ["JARVIS_PRIME_HOME"]) / "models/tiny-chat-1.0.0"
        assert json.loads((stored / "prime.json").read_text())["files"]["model.safetensors"]["sha256"] == \
            json.loads((local / "prime.json").read_text())["files"]["model.safetensors"]["sha256"]


VENV_PATH = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # reactor, prime


@pytest.mark.skipif(shutil.which("prime", path=VENV_PATH) is None, reason="jarvis-prime's `prime` is not installed")
def test_an_adapter_only_model_comes_back_into_the_store_merged_onto_its_base(tiny_llama_dir, chat_file, tmp_path,
                                                                             monkeypatch):
    """`merge_adapter: false` on a VM whose base was a store model staged as `model/<name>-<version>`:
    `reactor launch fetch` brings the adapter back and `prime pull --from` merges it onto the
    store's base, found by the name and weights Reactor Core recorded."""
    from reactor_core.launch.cli import _fetch_and_import
    from reactor_core.training import Trainer
    from reactor_testing import config_for

    monkeypatch.setenv("JARVIS_PRIME_HOME", str(tmp_path / "store"))
    monkeypatch.setenv("PATH", VENV_PATH)
    subprocess.run(["prime", "pull", "tiny-base", "--from", str(tiny_llama_dir)], check=True, capture_output=True)
    base = tmp_path / "store/models/tiny-base-1.0.0"
    vm = tmp_path / "vm"  # the VM's inputs folder, which the run script cds into
    shutil.copytree(base, vm / "model" / base.name)
    monkeypatch.chdir(vm)
    config = config_for(Path("model") / base.name, vm / "work", output_name="tiny-chat", merge_adapter=False,
                        max_steps=2, val_fraction=0.0, num_samples=0, mixed_precision="fp32",
                        checkpoint_remote=str(tmp_path / "bucket"))
    trained = Trainer(config, progress=False).train(chat_file).model_dir
    monkeypatch.chdir(tmp_path)
    layout = BucketLayout(config.checkpoint_remote)
    upload_tree(trained, Bucket(layout.output), trained.name)

    _fetch_and_import(config, layout, tmp_path / "here")
    stored = tmp_path / "store/models/tiny-chat-1.0.0"
    manifest = json.loads((stored / "prime.json").read_text())
    assert "model.safetensors" not in json.loads((tmp_path / "here/tiny-chat-1.0.0/prime.json").read_text())["files"]
    assert {"model.safetensors", "adapter/adapter_model.safetensors"} <= set(manifest["files"])
    assert manifest["lineage"]["source"]["merged_onto"]["name"] == "tiny-base"
    merged, original = load_file(stored / "model.safetensors"), load_file(base / "model.safetensors")
    assert any(not merged[k].equal(original[k]) for k in merged)


def test_an_adapter_only_run_records_its_hugging_face_bases_weights(tiny_llama_dir):
    """A Hub or folder base has no name to find it by elsewhere; its weights' sha256 at least
    tell `prime pull --from` whether the base it found is the one trained on."""
    from reactor_core.files import sha256_file
    from reactor_core.training.model import ModelSource
    from reactor_core.training.prime_dir import base_identity

    source = ModelSource("hf", str(tiny_llama_dir))
    assert base_identity(source, adapter_only=True) == \
        {"weights_sha256": {"model.safetensors": sha256_file(tiny_llama_dir / "model.safetensors")}}
    assert base_identity(source, adapter_only=False) == {}  # merged weights: nothing to find again


def yaml_of(bucket: Bucket, rel: str, tmp_path: Path) -> dict:
    import yaml

    bucket.get(rel, tmp_path / "fetched.yaml")
    return yaml.safe_load((tmp_path / "fetched.yaml").read_text())


def test_a_name_only_this_machines_plugins_resolve_travels_as_its_folder(tiny_llama_dir, chat_file, tmp_path,
                                                                        monkeypatch):
    """A jarvis-prime catalog name resolves here (its plugin), not on the VMs (reactor-core alone):
    the folder it resolved to is staged, and the output keeps the name `fetch` looks for."""
    import reactor_core.training.model as model_module
    from reactor_core.launch.cli import _launch_values

    class Plugin:
        name = "catalog"

        def load(self):
            return lambda name: str(tiny_llama_dir) if name == "tiny-base" else None

    monkeypatch.setattr(model_module, "entry_points", lambda group: [Plugin()])
    values = launch_values(tiny_llama_dir, chat_file, "gs://b/x")
    del values["output_name"]
    recipe = str(write_recipe(tmp_path / "named.yaml", values | {"model_name": "tiny-base"}))
    checked = run_preflight(recipe, [], Accelerators("L4"), 1)
    assert checked.local_model == str(tiny_llama_dir)
    staged = plan_inputs(_launch_values(recipe, [], checked), lambda path: False)
    assert staged.recipe["model_name"] == f"model/{tiny_llama_dir.name}"
    assert staged.recipe["output_name"] == "tiny-base-sft"  # as `reactor launch fetch` computes it here
    assert (f"model/{tiny_llama_dir.name}/config.json", tiny_llama_dir / "config.json") in staged.files.items()
    # a path or a Hub id is left as it is
    plain = str(write_recipe(tmp_path / "path.yaml", launch_values(tiny_llama_dir, chat_file, "gs://b/x")))
    assert run_preflight(plain, [], Accelerators("L4"), 1).local_model is None
