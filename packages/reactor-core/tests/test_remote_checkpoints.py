"""Checkpoints mirrored to gs:// (a real gcp-storage-emulator server on loopback) and
to a plain directory; resume from the bucket on a VM whose disk is empty."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reactor_core import Trainer
from reactor_core.checkpoints.remote import Retry, Upload, download_newest, open_remote, upload_folder
from reactor_core.checkpoints.store import COMPLETE, WEIGHTS, CheckpointError, LocalCheckpointStore, verify
from reactor_core.gcp import SpotVMCheckpointer
from reactor_core.gcp.preemption import EXIT_PREEMPTED, Preempted

from reactor_testing import PreemptionNoticeServer, config_for, write_chat_data, write_recipe


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory) -> Path:
    return write_chat_data(tmp_path_factory.mktemp("data") / "train.jsonl")


@pytest.fixture
def gcs_emulator(monkeypatch):
    """The gcp-storage-emulator package's server on 127.0.0.1, with bucket `spot-ckpt`."""
    from gcp_storage_emulator.server import create_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket="spot-ckpt")
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    yield "gs://spot-ckpt/runs/tiny"
    server.stop()


class BucketOutage:
    """The emulator answers object uploads with 503 Service Unavailable, as GCS does in a
    bad minute: the next `count` uploads, or every one until `end()`.

    Injected into the emulator's request handler because a real outage cannot be had on
    cue; the client still gets a real HTTP 503 over a real connection.
    """

    def __init__(self) -> None:
        self._left = 0.0
        self.refused = 0
        self._lock = threading.Lock()

    def begin(self, count: float = float("inf")) -> None:
        with self._lock:
            self._left = count

    def end(self) -> None:
        self.begin(0)

    def refuses(self) -> bool:
        with self._lock:
            if self._left <= 0:
                return False
            self._left -= 1
            self.refused += 1
            return True


@pytest.fixture
def bucket_outage(gcs_emulator, monkeypatch) -> BucketOutage:
    from gcp_storage_emulator.server import RequestHandler

    outage = BucketOutage()
    real_post = RequestHandler.do_POST

    def do_post(handler):
        if "uploadType=" in handler.path and outage.refuses():
            handler.rfile.read(int(handler.headers.get("Content-Length", 0)))  # the body, then the refusal
            handler.send_error(503, "Service Unavailable")
            return
        real_post(handler)

    monkeypatch.setattr(RequestHandler, "do_POST", do_post)
    return outage


def reactor_train_here(recipe_path: Path, *overrides: str) -> int:
    """`reactor train RECIPE OVERRIDES...` in this process (the emulator runs here); its exit code."""
    from typer.testing import CliRunner

    from reactor_core.cli import app

    result = CliRunner().invoke(app, ["train", str(recipe_path), *overrides])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code


def remote_recipe(tmp_path: Path, model_dir: Path, data: Path, bucket: str, **extra) -> Path:
    values = dict(model_name=str(model_dir), data_path=str(data), output_dir=str(tmp_path / "out"), max_steps=4,
                  batch_size=4, lora_rank=4, max_seq_length=128, num_samples=0, merge_adapter=False, seed=3,
                  checkpoint_every_steps=2, checkpoint_remote=bucket)
    return write_recipe(tmp_path / "recipe.yaml", values | extra)


def test_a_transient_bucket_error_is_retried_and_the_checkpoints_arrive(tiny_llama_dir, chat_file, tmp_path,
                                                                         gcs_emulator, bucket_outage, caplog):
    bucket_outage.begin(3)  # the first three uploads get a 503
    path = remote_recipe(tmp_path, tiny_llama_dir, chat_file, gcs_emulator)
    with caplog.at_level(logging.WARNING, logger="reactor_core"):
        assert reactor_train_here(path) == 0
    assert bucket_outage.refused == 3
    assert "ServiceUnavailable" in caplog.text and "try 2 of 5" in caplog.text
    assert open_remote(gcs_emulator).steps() == [4, 2]
    fresh = LocalCheckpointStore(tmp_path / "fresh")
    assert (download_newest(open_remote(gcs_emulator), fresh.root) / COMPLETE).is_file()


def test_a_bucket_that_stays_down_costs_the_mirror_not_the_run(tiny_llama_dir, chat_file, tmp_path, gcs_emulator,
                                                               bucket_outage, caplog):
    """Used to end the run with exit 2 ('bad recipe, data or checkpoint') at the first
    checkpoint, once google-cloud-storage's own retries gave up after two minutes."""
    bucket_outage.begin()
    path = remote_recipe(tmp_path, tiny_llama_dir, chat_file, gcs_emulator, checkpoint_upload_attempts=2)
    with caplog.at_level(logging.WARNING, logger="reactor_core"):
        assert reactor_train_here(path) == 0
    for step in (2, 4):
        assert f"checkpoint step {step} is on local disk only" in caplog.text
    assert f"not in {gcs_emulator}: upload of" in caplog.text and "ServiceUnavailable" in caplog.text
    local = LocalCheckpointStore(tmp_path / "out/checkpoints")
    assert [c.step for c in local.candidates()] == [4, 2]
    for checkpoint in local.candidates():
        verify(checkpoint.path)
    assert open_remote(gcs_emulator).steps() == []
    assert any((tmp_path / "out").glob("*/prime.json"))


def test_preempted_while_the_bucket_is_down_exits_75_and_resumes_from_the_local_checkpoint(
        tiny_llama_dir, chat_file, tmp_path, gcs_emulator, bucket_outage, monkeypatch, caplog):
    """The emergency checkpoint's upload fails for good: the process must still exit 75
    (a supervisor restarts on exactly that), not 2, with a complete local checkpoint
    that the restart resumes from."""
    metadata = PreemptionNoticeServer.start()
    monkeypatch.setenv("GCE_METADATA_HOST", f"127.0.0.1:{metadata.server_address[1]}")
    PreemptionNoticeServer.posted.set()  # the notice is out as training starts
    bucket_outage.begin()
    path = remote_recipe(tmp_path, tiny_llama_dir, chat_file, gcs_emulator, max_steps=8, checkpoint_every_steps=None,
                         checkpoint_upload_attempts=2, watch_gcp_preemption=True)
    try:
        with caplog.at_level(logging.WARNING, logger="reactor_core"):
            assert reactor_train_here(path) == EXIT_PREEMPTED
    finally:
        metadata.shutdown()
    saved = LocalCheckpointStore(tmp_path / "out/checkpoints").latest()
    assert saved is not None and saved.state()["reason"] == "preemption"
    assert f"checkpoint step {saved.step} is on local disk only" in caplog.text
    assert open_remote(gcs_emulator).steps() == []

    bucket_outage.end()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="reactor_core"):
        assert reactor_train_here(path, "watch_gcp_preemption=false") == 0
    assert f"resumed from {saved.path} (step {saved.step}" in caplog.text
    assert open_remote(gcs_emulator).steps() == [8]


@pytest.mark.parametrize("kind", ["dir", "gs"])
def test_reuploading_a_step_unmarks_it_before_any_file_is_replaced(tmp_path, request, kind):
    """Step 7 is in the remote; uploading step 7 again is cut short after one new file
    arrived (the `with` block left without `finish`, as a crash would). The remote used to
    keep the old COMPLETE over a mix of old and new files, listed and then refused at
    download; now the step is simply not there until a new marker is."""
    url = request.getfixturevalue("gcs_emulator") if kind == "gs" else str(tmp_path / "mount")
    remote = open_remote(url)
    store = LocalCheckpointStore(tmp_path / "local")
    first = store.save(7, lambda folder, written: [(folder / n).write_bytes(b"v1" + n.encode()) for n in ("a", "b")])
    upload_folder(remote, first.path)
    assert remote.steps() == [7]

    second = LocalCheckpointStore(tmp_path / "again").save(
        7, lambda folder, written: [(folder / n).write_bytes(b"v2" + n.encode()) for n in ("a", "b")])
    with remote.start_upload(second.path.name) as upload:
        upload.send(second.path / "a")  # and then the VM is gone
    assert remote.steps() == []
    assert download_newest(remote, tmp_path / "fresh") is None

    upload_folder(remote, second.path)  # the next try completes it
    assert remote.steps() == [7]
    assert (remote.download(7, tmp_path / "fresh") / "a").read_bytes() == b"v2a"


def test_preemption_uploads_to_the_bucket_and_an_empty_vm_resumes_from_it(tiny_llama_dir, chat_file, tmp_path,
                                                                           gcs_emulator, monkeypatch):
    metadata = PreemptionNoticeServer.start()
    monkeypatch.setenv("GCE_METADATA_HOST", f"127.0.0.1:{metadata.server_address[1]}")
    first_vm = tmp_path / "vm1"
    config = config_for(tiny_llama_dir, first_vm, max_steps=40, num_samples=0, merge_adapter=False)
    checkpointer = SpotVMCheckpointer(checkpoint_interval=1000, gcs_bucket=gcs_emulator)
    trainer = Trainer(config, checkpointer, on_event=lambda e: e.step == 6 and PreemptionNoticeServer.posted.set(), progress=False)
    try:
        with pytest.raises(Preempted) as err:
            trainer.train(chat_file)
    finally:
        metadata.shutdown()
    step = err.value.step
    remote = open_remote(gcs_emulator)
    assert remote.steps() == [step]

    second_vm = tmp_path / "vm2"  # a new VM: nothing on disk but the recipe and data
    resumed = Trainer(config.model_copy(update={"output_dir": str(second_vm)}), checkpointer, progress=False).recipe
    resumed.setup(chat_file)
    assert resumed.state.step == step
    local = LocalCheckpointStore(second_vm / "checkpoints").latest()
    saved = load_file(first_vm / "checkpoints" / local.path.name / WEIGHTS)
    assert set(saved) == {n for n, p in resumed.model.named_parameters() if p.requires_grad}  # no frozen tied head
    for name, param in resumed.model.named_parameters():
        if param.requires_grad:
            assert torch.equal(param.detach(), saved[name]), name
    result = resumed.train()
    assert result.state.step == 40 and result.model_dir.is_dir()


def test_a_remote_checkpoint_with_a_bad_file_is_not_downloaded(tiny_llama_dir, chat_file, tmp_path, caplog):
    remote_dir = tmp_path / "mount"  # a directory remote behaves like the bucket
    config = config_for(tiny_llama_dir, tmp_path / "vm1", max_steps=4, checkpoint_every_steps=2, num_samples=0,
                        merge_adapter=False, checkpoint_remote=str(remote_dir), keep_last_checkpoints=3)
    Trainer(config, progress=False).train(chat_file)
    assert open_remote(str(remote_dir)).steps() == [4, 2]
    weights = remote_dir / "step-00000004" / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    weights.write_bytes(bytes(data))
    fresh = Trainer(config.model_copy(update={"output_dir": str(tmp_path / "vm2")}), progress=False).recipe
    fresh.setup(chat_file)
    assert fresh.state.step == 2
    assert "skipping remote checkpoint step 4" in caplog.text


def test_upload_sends_the_marker_last(tmp_path, gcs_emulator):
    from reactor_core.files import sha256_file

    checkpoint = tmp_path / "step-00000007"
    checkpoint.mkdir()
    for name, size in [("a.bin", 3_000_000), ("b.bin", 1000), ("c.bin", 2_000_000)]:
        (checkpoint / name).write_bytes(os.urandom(size))
    (checkpoint / COMPLETE).write_text(json.dumps({n: sha256_file(checkpoint / n) for n in ("a.bin", "b.bin", "c.bin")}))
    remote = open_remote(gcs_emulator)
    upload_folder(remote, checkpoint)
    blobs = list(remote.client.list_blobs(remote.bucket, prefix="runs/tiny/"))
    names = [b.name for b in sorted(blobs, key=lambda b: b.updated)]
    assert len(names) == 4 and names[-1] == "runs/tiny/step-00000007/COMPLETE"
    assert remote.steps() == [7]


def test_a_failed_file_upload_sends_no_marker(tmp_path):
    """A network failure mid-upload (simulated: a send that raises for one file, since a
    real connection cannot be made to fail on cue here) must leave the remote unmarked."""
    files = []
    for name in ("a.bin", "b.bin"):
        (tmp_path / name).write_bytes(b"x" * 100)
        files.append(tmp_path / name)
    (tmp_path / COMPLETE).write_text("{}")
    sent: list[str] = []

    def send(handle, name):
        if name == "b.bin":
            raise ConnectionResetError("connection reset by peer")
        sent.append(name)

    with pytest.raises(CheckpointError, match="upload of b.bin to gs://x/y failed: ConnectionResetError"):
        with Upload("gs://x/y", send, workers=2, retry=Retry(attempts=1)) as upload:
            for file in files:
                upload.send(file)
            upload.finish(tmp_path / COMPLETE)
    assert COMPLETE not in sent and "a.bin" in sent


def test_download_over_a_local_step_keeps_it_until_the_new_copy_is_in_place(tmp_path, monkeypatch):
    """Downloading step 3 from a remote where a complete local step 3 exists, crashing
    (injected: the rename of the verified download into place fails) before the copy is
    in place: the next start still has the local step 3."""
    local = LocalCheckpointStore(tmp_path / "local", keep_last=1)
    local.save(3, lambda folder, written: (folder / WEIGHTS).write_bytes(b"local"))
    remote_root = tmp_path / "remote"
    upload_folder(open_remote(str(remote_root)), LocalCheckpointStore(tmp_path / "other").save(
        3, lambda folder, written: (folder / WEIGHTS).write_bytes(b"remote")).path)
    real_replace = os.replace

    def replace(src, dst):
        if ".download-" in Path(src).name:
            raise OSError("injected crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="injected"):
        open_remote(str(remote_root)).download(3, local.root)
    monkeypatch.undo()
    latest = LocalCheckpointStore(tmp_path / "local").latest()
    assert latest is not None and (latest.path / WEIGHTS).read_bytes() == b"local"
    assert (open_remote(str(remote_root)).download(3, local.root) / WEIGHTS).read_bytes() == b"remote"
    assert sorted(p.name for p in local.root.iterdir()) == ["step-00000003"]
