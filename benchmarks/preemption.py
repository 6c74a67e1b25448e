"""Preemption latency: notice -> checkpoint uploaded, and restart -> first resumed step.

    python benchmarks/preemption.py

SmolLM2-135M (the embedded default), LoRA and full fine-tuning, checkpoints mirrored
to a gcp-storage-emulator bucket on loopback (its own process; it accepts ~100 MB/s,
far below a real bucket from a GCE VM, so the full-model figure is an upper bound), a loopback metadata server that posts
the preemption notice (`instance/preempted` -> TRUE) at step 3. Measures:
  notice -> uploaded: from the notice being posted to the emergency checkpoint's
      COMPLETE marker in the bucket (includes finishing the current step);
  restart -> first step: a new Trainer on an empty disk: load model and data,
      download the checkpoint from the bucket, restore, run one step.
GCP gives a spot VM 30 s between the notice and the shutdown. Targets (issue 4):
LoRA <= 5 s, full 135M <= 15 s. Writes benchmarks/results/preemption.json.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results" / "preemption.json"


class Notice(http.server.BaseHTTPRequestHandler):
    posted = threading.Event()

    def do_GET(self):  # noqa: N802
        body = b"TRUE" if self.posted.wait(timeout=30) else b"FALSE"
        self.send_response(200)
        self.send_header("Metadata-Flavor", "Google")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"storage emulator did not start on port {port}")


def write_data(path: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Tell me fact number {i} about the sea."},
                          {"role": "assistant", "content": f"Fact {i}: the sea is deep, salty and full of life. " * 3}]}
            for i in range(64)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def measure(mode: str, model: str, data: Path, work: Path, bucket: str) -> dict:
    from reactor_core import Trainer, TrainingConfig
    from reactor_core.gcp.preemption import Preempted

    config = TrainingConfig(
        model_name=model, data_path=str(data), output_dir=str(work / f"{mode}-vm1"), use_lora=mode == "lora",
        learning_rate=1e-4, max_steps=1000, batch_size=1, max_seq_length=256, num_samples=0, val_fraction=0.05,
        checkpoint_remote=f"{bucket}/{mode}", watch_gcp_preemption=True, spot_defaults=False, seed=0,
    )
    Notice.posted.clear()
    posted_at: list[float] = []

    def post_notice(event) -> None:
        if event.kind == "step" and event.step == 3 and not posted_at:
            posted_at.append(time.perf_counter())
            Notice.posted.set()

    trainer = Trainer(config, on_event=post_notice, progress=False)
    try:
        trainer.train()
        raise RuntimeError("training finished without being preempted")
    except Preempted as err:
        uploaded = time.perf_counter() - posted_at[0]
        checkpoint, preempted_step = Path(err.checkpoint), err.step
    size_mb = sum(f.stat().st_size for f in checkpoint.iterdir()) / 1e6
    del trainer

    Notice.posted.clear()
    start = time.perf_counter()
    first: list[float] = []
    resumed = Trainer(config.model_copy(update={"output_dir": str(work / f"{mode}-vm2")}), progress=False)

    def stop_after_first(event) -> None:
        if event.kind == "step" and not first:
            first.append(time.perf_counter() - start)
            resumed.cancel()

    resumed.recipe.on_event = stop_after_first
    resumed.train()
    return {"mode": mode, "notice_to_uploaded_s": uploaded, "checkpoint_mb": size_mb, "preempted_at_step": preempted_step,
            "restart_to_first_step_s": first[0], "resumed_from_step": resumed.state.step - 1}


def main() -> None:
    from jarvis_prime.store import resolve

    console = Console()
    storage_port = free_port()
    # its own process, as a real bucket is: in-process it would share our GIL
    storage = subprocess.Popen([str(Path(sys.executable).parent / "gcp-storage-emulator"), "start", "--host", "127.0.0.1",
                                "--port", str(storage_port), "--in-memory", "--default-bucket", "bench", "--quiet"])
    wait_for_port(storage_port)
    metadata = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Notice)
    threading.Thread(target=metadata.serve_forever, daemon=True).start()
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{storage_port}"
    os.environ["GCE_METADATA_HOST"] = f"127.0.0.1:{metadata.server_address[1]}"
    model = str(resolve("smollm2-135m-instruct").path)
    work = Path(tempfile.mkdtemp(prefix="reactor-preempt-"))
    data = write_data(work / "data.jsonl")
    results = []
    try:
        for mode in ("lora", "full"):
            console.print(f"measuring {mode} ...")
            results.append(measure(mode, model, data, work, "gs://bench/runs"))
    finally:
        metadata.shutdown()
        storage.terminate()
        storage.wait()
        shutil.rmtree(work, ignore_errors=True)

    targets = {"lora": 5.0, "full": 15.0}
    table = Table(title="preemption, SmolLM2-135M, checkpoints to a loopback gcs emulator")
    for col in ("mode", "checkpoint MB", "notice -> uploaded (s)", "target", "restart -> first step (s)"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for r in results:
        table.add_row(r["mode"], f"{r['checkpoint_mb']:.1f}", f"{r['notice_to_uploaded_s']:.2f}",
                      f"<= {targets[r['mode']]:.0f}", f"{r['restart_to_first_step_s']:.2f}")
    console.print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"results": results, "targets_s": targets}, indent=2) + "\n")
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
