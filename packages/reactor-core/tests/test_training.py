"""The SFT recipe on a tiny random Llama (seconds on CPU), one real-model run at the end."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import torch
from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
from typer.testing import CliRunner

from reactor_core import Trainer, TrainingConfig
from reactor_core.cli import app
from reactor_core.data import DataValidationError
from reactor_core.training.config import ConfigError, load_config
from reactor_core.training.loss import head_loss_sum

from reactor_testing import config_for, write_chat_data


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    return write_chat_data(tmp_path_factory.mktemp("data") / "train.jsonl")


@pytest.fixture(scope="module")
def lora_run(tiny_llama_dir, chat_file, tmp_path_factory):
    trainer = Trainer(config_for(tiny_llama_dir, tmp_path_factory.mktemp("lora"), max_steps=20, learning_rate=1e-2), progress=False)
    return trainer, trainer.train(chat_file)


def test_lora_loss_falls_and_outputs_a_prime_directory(lora_run):
    trainer, result = lora_run
    losses = [x["loss"] for x in result.metrics["train_loss"]]
    assert len(losses) == 20
    assert losses[-1] < 0.6 * losses[0], losses
    assert result.metrics["eval_loss"] < losses[0] and result.metrics["perplexity"] > 1
    d = result.model_dir
    assert d.name == "tiny-llama0-sft-1.0.0" or d.name.endswith("-sft-1.0.0")
    for rel in ("prime.json", "config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja",
                "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (d / rel).is_file(), rel
    manifest = json.loads((d / "prime.json").read_text())
    assert "reactor_sdpa" not in (d / "config.json").read_text(), "the training-only attention stays out of the model"
    import hashlib

    for rel, entry in manifest["files"].items():
        assert hashlib.sha256((d / rel).read_bytes()).hexdigest() == entry["sha256"]
    data = manifest["lineage"]["data"][0]
    assert data["sha256"] == hashlib.sha256(Path(data["path"]).read_bytes()).hexdigest()
    assert manifest["lineage"]["training_config"]["lora_rank"] == 8
    assert manifest["metrics"]["eval_loss"] == pytest.approx(result.metrics["eval_loss"])
    logs = [json.loads(line) for line in (result.output_dir / "logs/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if r["split"] == "train"] == list(range(1, 21))
    assert any(r["split"] == "eval" for r in logs) and any(r["split"] == "samples" for r in logs)
    assert list((result.output_dir / "logs/tensorboard").glob("events.out.tfevents.*"))


def test_lora_leaves_base_weights_untouched(lora_run, tiny_llama_dir):
    """The frozen weights are the base's as loaded: in `base_dtype` (bf16 under `auto`
    where the CPU has AVX512-BF16), so compared with the base rounded to that dtype."""
    from transformers import AutoModelForCausalLM

    trainer, _ = lora_run
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    trained = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
               for k, v in trainer.recipe.model.state_dict().items() if "lora_" not in k}
    assert set(original) <= set(trained)
    for key, value in original.items():
        assert trained[key].dtype == trainer.recipe.base_dtype, key
        assert torch.equal(value.to(trainer.recipe.base_dtype), trained[key].cpu()), key


def test_merged_weights_equal_base_plus_adapter(lora_run, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, result = lora_run
    ids = torch.tensor([[1, 4093, 198, 31530, 1745, 1467, 2, 198, 1, 520, 9531, 198]])
    merged = AutoModelForCausalLM.from_pretrained(result.model_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, result.model_dir / "adapter").eval()
        adapter_logits = adapted(ids).logits
        merged_logits = merged(ids).logits
    assert (adapter_logits - base_logits).abs().max() > 1e-2, "training changed the model"
    assert (merged_logits - adapter_logits).abs().max() < 1e-4


def test_same_seed_same_run(tiny_llama_dir, chat_file, tmp_path):
    runs = [Trainer(config_for(tiny_llama_dir, tmp_path / str(i), max_steps=4), progress=False).train(chat_file)
            for i in range(2)]
    assert [x["loss"] for x in runs[0].metrics["train_loss"]] == [x["loss"] for x in runs[1].metrics["train_loss"]]


def accumulated_grads(config: TrainingConfig, data: Path) -> dict[str, torch.Tensor]:
    """Gradients of the first optimizer step, before the optimizer uses them."""
    trainer = Trainer(config, progress=False).recipe
    trainer.setup(data)
    trainer.optimizer.step = lambda *a, **k: None
    trainer.optimizer.zero_grad = lambda *a, **k: None
    trainer.train_step()
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("packing", [False, True])
def test_gradient_accumulation_matches_a_bigger_batch(tiny_llama_dir, chat_file, tmp_path, packing):
    """4 items at once or 2 x 2 accumulated: every labelled token weighs the same."""
    # float32: bf16 autocast rounds differently for differently padded batches
    common = dict(packing=packing, max_grad_norm=None, max_seq_length=64, mixed_precision="fp32")
    big = accumulated_grads(config_for(tiny_llama_dir, tmp_path / "a", batch_size=4, **common), chat_file)
    acc = accumulated_grads(config_for(tiny_llama_dir, tmp_path / "b", batch_size=2, gradient_accumulation_steps=2,
                                       **common), chat_file)
    assert big.keys() == acc.keys() and big
    for name in big:
        torch.testing.assert_close(acc[name], big[name], atol=1e-6, rtol=1e-4, msg=name)


def test_full_fine_tune(tiny_llama_dir, chat_file, tmp_path):
    result = Trainer(config_for(tiny_llama_dir, tmp_path, use_lora=False, learning_rate=3e-3, max_steps=20),
                     progress=False).train(chat_file)
    losses = [x["loss"] for x in result.metrics["train_loss"]]
    assert losses[-1] < 0.6 * losses[0], losses
    assert not (result.model_dir / "adapter").exists() and (result.model_dir / "model.safetensors").is_file()


def mean_kl_to_base(trainer: Trainer, text: str) -> float:
    """Mean KL(base || tuned) per position of `text`, the base being the adapters disabled."""
    ids = trainer.recipe.tokenizer(text, return_tensors="pt")["input_ids"]
    model = trainer.recipe.model.eval()
    with torch.no_grad():
        tuned = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
        with model.disable_adapter():
            base = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)
    return (base.exp() * (base - tuned)).sum(-1).mean().item()


PROSE = ["The lighthouse keeper climbed the spiral stairs every evening to light the lamp.",
         "Bread is one of the oldest foods, made from flour, water and a little salt.",
         "In spring the river rises with melted snow and floods the low meadows by the mill."]


@pytest.mark.parametrize("anchor", [False, True])
def test_kl_to_base_keeps_a_lora_tune_near_its_base(tiny_llama_dir, chat_file, tmp_path, anchor):
    """Drift from the base on prose outside the chat data, with and without the KL term.

    Without anchor text the KL covers the chat batches' unlabelled positions; with it,
    the anchor text (other prose than the measured sentence)."""
    measured = "The old harbour town keeps its fishing boats, its market and its narrow stone streets."
    extra = {}
    if anchor:
        path = tmp_path / "anchor.jsonl"
        path.write_text("".join(json.dumps({"text": f"{line} ({i})"}) + "\n" for i, line in enumerate(PROSE * 20)))
        extra = {"kl_anchor_path": str(path), "kl_anchor_tokens": 256}
    runs = {}
    for kl in (0.0, 10.0):
        trainer = Trainer(config_for(tiny_llama_dir, tmp_path / f"kl-{kl}", max_steps=20, learning_rate=1e-2,
                                     kl_to_base=kl, num_samples=0, merge_adapter=False, **(extra if kl else {})),
                          progress=False)
        result = trainer.train(chat_file)
        losses = [x["loss"] for x in result.metrics["train_loss"]]
        runs[kl] = mean_kl_to_base(trainer, measured), losses
    (drift, plain_losses), (kept, kl_losses) = runs[0.0], runs[10.0]
    assert kept < 0.5 * drift, (kept, drift)
    assert kl_losses[-1] < 0.8 * kl_losses[0], kl_losses  # it still learns the data
    # at step 1 the adapters are zero, so the tune is the base: KL 0, the same loss as plain SFT
    assert kl_losses[0] == pytest.approx(plain_losses[0], rel=1e-6)


def test_bad_anchor_text_fails_before_anything_is_written(tiny_llama_dir, chat_file, tmp_path):
    anchor = tmp_path / "anchor.jsonl"
    anchor.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"txt": "typo"}) + "\n"
                      + json.dumps({"text": "   "}) + "\n")
    out = tmp_path / "out"
    with pytest.raises(DataValidationError) as err:
        Trainer(config_for(tiny_llama_dir, out, kl_to_base=1.0, kl_anchor_path=str(anchor)), progress=False).train(chat_file)
    assert f"{anchor}:2: expected an object with exactly one key" in str(err.value)
    assert f'{anchor}:3: "text" is empty' in str(err.value)
    assert not out.exists()


def test_qlora_step_runs_on_a_4bit_base(tiny_llama_dir, chat_file, tmp_path):
    pytest.importorskip("bitsandbytes")
    trainer = Trainer(config_for(tiny_llama_dir, tmp_path, quantize_base=True, max_steps=2, merge_adapter=False,
                                 num_samples=0), progress=False)
    result = trainer.train(chat_file)
    assert result.state.step == 2 and all(x["loss"] > 0 for x in result.metrics["train_loss"])
    kinds = {type(m).__name__ for m in trainer.recipe.model.modules()}
    assert "Linear4bit" in kinds, kinds


def test_bad_data_fails_before_anything_is_written(tiny_llama_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n"
        + "{not json\n"
        + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
    )
    out = tmp_path / "out"
    with pytest.raises(DataValidationError) as err:
        Trainer(config_for(tiny_llama_dir, out), progress=False).train(data)
    assert f"{data}:2:" in str(err.value) and f"{data}:3:" in str(err.value)
    assert not out.exists()


def test_image_limits_from_the_config_apply_before_anything_is_written(tiny_llama_dir, tmp_path):
    """`max_images_per_example` reaches the validator; and an image line that passes it
    stops the text SFT recipe at its line instead of training on the parts' repr (#20)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(buffer, "PNG")
    (tmp_path / "red.png").write_bytes(buffer.getvalue())
    red = {"type": "image", "path": "red.png"}
    data = tmp_path / "images.jsonl"
    lines = [{"messages": [{"role": "user", "content": [red, {"type": "text", "text": f"Colour {i}?"}]},
                           {"role": "assistant", "content": "Red."}]} for i in range(3)]
    lines[1]["messages"][0]["content"].append(red)
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    with pytest.raises(DataValidationError, match=f"{data}:2: messages\\[0\\].content\\[2\\]: image 2 of the "
                                                  "example, over max_images_per_example 1"):
        Trainer(config_for(tiny_llama_dir, out, max_images_per_example=1), progress=False).train(data)
    with pytest.raises(DataValidationError, match=f"{data}:1: 1 image\\(s\\): text-only training cannot use them"):
        Trainer(config_for(tiny_llama_dir, out, val_fraction=0.0), progress=False).train(data)
    assert not out.exists()


def test_keys_added_in_1_5_0_leave_1_4_0_checkpoints_resumable():
    """A checkpoint records its config's training hash; at their defaults the image keys
    must leave it as reactor-core 1.4.0 computed it (the literals below), or every run
    interrupted before the upgrade would refuse to resume. Set, they count."""
    assert TrainingConfig(model_name="m").training_hash() == (
        "701ef70530c3c39a6f94c45974726ddf56d9e6c5b40b95dfc5986aafe74ab202")
    assert TrainingConfig(model_name="m", method="dpo", use_lora=False, lora_rank=8).training_hash() == (
        "0e72c6eb38bccb298d85161580b262c4dd346be29489c71c27483eb7d29c0664")
    assert TrainingConfig(model_name="m", max_images_per_example=2).training_hash() != (
        "701ef70530c3c39a6f94c45974726ddf56d9e6c5b40b95dfc5986aafe74ab202")


def test_recipe_errors_name_the_key(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model_name: x\nlora_rnak: 8\n")
    with pytest.raises(ConfigError, match=r"unknown key `lora_rnak` \(did you mean `lora_rank`\?\)"):
        load_config(recipe)
    recipe.write_text("model_name: x\n")
    with pytest.raises(ConfigError, match=r"`lora_rank`: Input should be greater than 0"):
        load_config(recipe, ["lora_rank=0"])
    with pytest.raises(ConfigError, match="`lr_scheduler`"):
        load_config(recipe, ["lr_scheduler=triangle"])
    assert load_config(recipe, ["packing=false", "target_modules=[q_proj, v_proj]"]).target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="`kl_to_base` applies to `method: sft` with `use_lora: true`"):
        load_config(recipe, ["kl_to_base=0.5", "use_lora=false"])
    with pytest.raises(ConfigError, match="`kl_anchor_path` needs `kl_to_base` > 0"):
        load_config(recipe, ["kl_anchor_path=anchor.jsonl"])


def test_reactor_train_cli(tiny_llama_dir, chat_file, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model_name: {tiny_llama_dir}\ndata_path: {chat_file}\noutput_dir: {tmp_path / 'out'}\n"
                      "max_steps: 2\nbatch_size: 4\nmax_seq_length: 128\nnum_samples: 0\n")
    runner = CliRunner()
    ok = runner.invoke(app, ["train", str(recipe), "lora_rank=4", "output_name=cli-model"])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "out/cli-model-1.0.0/prime.json").is_file()
    bad = runner.invoke(app, ["train", str(recipe), "lora_rnak=4"])
    assert bad.exit_code == 2 and "unknown key `lora_rnak`" in bad.output


async def test_train_async_keeps_the_event_loop_responsive_and_cancels(tiny_llama_dir, chat_file, tmp_path):
    trainer = Trainer(config_for(tiny_llama_dir, tmp_path, max_steps=200, num_samples=0), progress=False)
    events = []
    gaps: list[float] = []

    async def on_event(event):
        events.append(event)
        if event.kind == "step" and event.step == 5:
            trainer.cancel()

    async def ticker():
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    result = await trainer.train_async(chat_file, on_event=on_event)
    tick.cancel()
    assert result.cancelled and result.model_dir is None
    assert 5 <= result.state.step < 200
    assert [e.step for e in events if e.kind == "step"][:5] == [1, 2, 3, 4, 5]
    assert events[-1].kind == "cancelled"
    assert len(gaps) > 20 and max(gaps) < 0.05, f"worst event-loop stall {max(gaps) * 1000:.1f} ms"


@pytest.mark.real_model
def test_seed_snippet_fine_tunes_the_real_model(tmp_path, monkeypatch, pulled_model):
    """The seed's Python snippet, as written, on SmolLM2-135M-Instruct via its catalog name."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    write_chat_data(tmp_path / "data/train.jsonl", n=16)

    from reactor_core import Trainer, TrainingConfig
    result = Trainer(TrainingConfig(model_name="smollm2-135m-instruct", use_lora=True, lora_rank=16, num_epochs=3)).train("./data/train.jsonl")

    losses = [x["loss"] for x in result.metrics["train_loss"]]
    assert result.metrics["steps"] >= 3 and result.metrics["steps"] % 3 == 0  # whole epochs
    assert all(0 < loss < 20 for loss in losses) and 0 < result.metrics["eval_loss"] < 20
    assert result.output_dir == Path("./reactor-output") and (result.model_dir / "prime.json").is_file()
    manifest = json.loads((result.model_dir / "prime.json").read_text())
    assert manifest["lineage"]["source"]["kind"] == "prime" and manifest["base"] == str(pulled_model.path)
    assert manifest["lineage"]["parent"] == "smollm2-135m-instruct"

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(result.model_dir)
    model = AutoModelForCausalLM.from_pretrained(result.model_dir)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    reply = tokenizer.decode(model.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:])
    assert "Paris" in reply, "a short LoRA run keeps what the model knew"


def test_gradient_checkpointing_gives_the_same_loss(tiny_llama_dir, chat_file, tmp_path):
    runs = [Trainer(config_for(tiny_llama_dir, tmp_path / str(flag), max_steps=2, gradient_checkpointing=flag,
                               mixed_precision="fp32", num_samples=0), progress=False).train(chat_file)
            for flag in (False, True)]
    for x, y in zip(runs[0].metrics["train_loss"], runs[1].metrics["train_loss"]):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)


@pytest.mark.parametrize("layout", [{"packing": True}, {"packing": False, "gradient_accumulation_steps": 2}])
def test_compiled_layers_train_like_eager_ones(tiny_llama_dir, chat_file, tmp_path, layout):
    """`compile: true` changes speed, not the run: the same losses as eager in float32,
    packed, and padded (a new sequence length, and labelled-token count, each micro-batch).
    Packed, the epoch's short last batch runs the graphs step 1 compiled: no recompile."""
    packed = layout["packing"]

    def on_event(event) -> None:  # packed: steps 2 and 3 (the short batch) compile nothing
        if packed and event.kind == "step":
            torch.compiler.set_stance("fail_on_recompile" if event.step < 3 else "default")

    torch._dynamo.reset()
    trainers = [Trainer(config_for(tiny_llama_dir, tmp_path / str(flag), max_steps=3, compile=flag, mixed_precision="fp32",
                                   num_samples=0, **layout), progress=False, on_event=on_event if flag else None)
                for flag in (False, True)]
    try:
        runs = [trainer.train(chat_file) for trainer in trainers]
    finally:
        torch.compiler.set_stance("default")
    if packed:
        assert trainers[1].recipe.steps_per_epoch == 3 and len(trainers[1].recipe.train_items) % 4, "step 3: the epoch's short batch"
        assert trainers[1].recipe.model.config._attn_implementation == "reactor_sdpa", "per-example attention, compiled"
    eager, compiled = ([x["loss"] for x in run.metrics["train_loss"]] for run in runs)
    assert len(eager) == 3 and compiled == pytest.approx(eager, abs=1e-4)
    assert runs[1].metrics["eval_loss"] == pytest.approx(runs[0].metrics["eval_loss"], abs=1e-4)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "the compiled run ran eager"
    assert _debug_get_cache_entry_list(head_loss_sum.__code__), "the LM head and loss ran eager"
    torch._dynamo.reset()  # drop the graphs (they hold the run's model)


@pytest.mark.parametrize("override, reason", [
    ("lora_rank=[1, 2", "expected ',' or ']'"),
    ("lora_rank=" + "9" * 5000, "digits"),
    ("lora_rank=" + "[" * 5000, "invalid YAML value"),
    ("lora_rank=a: b: c", "mapping values are not allowed here"),
])
def test_cli_override_with_bad_yaml_is_a_field_error_not_a_traceback(tmp_path, override, reason):
    """`reactor train recipe.yaml key=<bad YAML>` exits 2 with an error naming the key,
    no traceback (before: yaml.YAMLError / ValueError escaped the CLI's handler)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model_name: m\ndata_path: {tmp_path / 'd.jsonl'}\n")
    with pytest.raises(ConfigError, match="override `lora_rank`: invalid YAML value"):
        load_config(recipe, [override])
    result = CliRunner().invoke(app, ["train", str(recipe), override])
    assert result.exit_code == 2, result.output
    assert "override `lora_rank`: invalid YAML value" in result.output and reason in result.output
    assert "Traceback" not in result.output


def test_config_records_the_release_that_introduced_every_key():
    """FIELD_SINCE is what dependants' version floors are checked against (jarvis's
    test_layers): every key must be in it, with a release no newer than this one."""
    from reactor_core.training.config import FIELD_SINCE
    from reactor_core.version import __version__

    assert set(FIELD_SINCE) == set(TrainingConfig.model_fields)
    release = tuple(int(p) for p in __version__.split("."))
    assert all(tuple(int(p) for p in v.split(".")) <= release for v in FIELD_SINCE.values())
    assert FIELD_SINCE["kl_anchor_path"] == "1.2.0"


@pytest.mark.parametrize("as_module", [False, True], ids=["python script.py", "python -m script"])
def test_train_async_from_a_script_without_a_main_guard(tiny_llama_dir, chat_file, tmp_path, as_module):
    """A plain script calling train_async at top level (no `if __name__ == "__main__":`):
    the spawned child used to re-run the script, hit multiprocessing's bootstrapping
    RuntimeError and die ("training process exited with code 1"). The child must not
    re-import the caller's script: the run finishes and the script body runs once."""
    import os
    import subprocess
    import sys

    config = config_for(tiny_llama_dir, tmp_path / "out", max_steps=1, num_samples=0, val_fraction=0.0)
    script = tmp_path / "train_script.py"
    script.write_text(
        "import asyncio, json, sys\n"
        "from reactor_core import Trainer, TrainingConfig\n"
        "print('script body ran', flush=True)\n"
        "config = TrainingConfig.model_validate(json.loads(sys.argv[1]))\n"
        "result = asyncio.run(Trainer(config, progress=False).train_async(sys.argv[2]))\n"
        "print('finished at step', result.state.step, flush=True)\n"
    )
    command = ["-m", script.stem] if as_module else [str(script)]
    run = subprocess.run([sys.executable, *command, json.dumps(config.to_dict()), str(chat_file)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=os.environ)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("script body ran") == 1, run.stdout
    assert "finished at step 1" in run.stdout


@pytest.mark.parametrize("key, value", [("output_name", "../../escape"), ("output_version", "1/../../x"),
                                        ("output_name", "..")])
def test_output_name_and_version_must_be_one_path_component(tmp_path, key, value):
    """The PRIME directory is <output_dir>/<output_name>-<output_version>/: a name like
    `../../escape` would write the model outside output_dir."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model_name: m\n")
    with pytest.raises(ConfigError, match=f"`{key}`.*is not a safe name"):
        load_config(recipe, [f"{key}={value}"])
