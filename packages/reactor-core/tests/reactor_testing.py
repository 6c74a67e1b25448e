"""Helpers shared by Reactor Core's test modules (on pytest's `pythonpath`)."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

from reactor_core import TrainingConfig

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]


def write_chat_data(path: Path, n: int = 32) -> Path:
    """Small, learnable chat data: a fixed pattern the model can memorize quickly."""
    with open(path, "w") as f:
        for i in range(n):
            color = COLORS[i % len(COLORS)]
            messages = [
                {"role": "system", "content": "You are JARVIS."},
                {"role": "user", "content": f"Name color number {i}."},
                {"role": "assistant", "content": f"Color {i} is {color}."},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def write_preferences(path: Path, n: int = 48) -> Path:
    rows = []
    for i in range(n):
        color = COLORS[i % len(COLORS)]
        rows.append({"prompt": [{"role": "system", "content": "You are JARVIS."},
                                {"role": "user", "content": f"Name color number {i}."}],
                     "chosen": f"Color {i} is {color}.", "rejected": f"Color {i} is unknown, sorry."})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config_for(model_dir: Path, out: Path, **overrides) -> TrainingConfig:
    values = dict(
        model_name=str(model_dir), output_dir=str(out), use_lora=True, lora_rank=8, lora_alpha=16, lora_dropout=0.0,
        max_steps=12, batch_size=4, learning_rate=3e-3, warmup_steps=2, max_seq_length=128, val_fraction=0.125,
        num_samples=1, sample_max_new_tokens=8, seed=7,
    )
    values.update(overrides)
    return TrainingConfig(**values)



def write_recipe(path: Path, values: dict) -> Path:
    """A YAML recipe (JSON values are valid YAML) for `reactor train`."""
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()))
    return path


def reactor_train(recipe_path: Path, *args: str) -> subprocess.Popen:
    """`reactor train RECIPE ARGS...` in a fresh process, as a user runs it."""
    return subprocess.Popen([sys.executable, "-m", "reactor_core.cli", "train", str(recipe_path), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def logged(output_dir: Path, split: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of `key` in the run's metrics.jsonl, for one split."""
    records = [json.loads(line) for line in (output_dir / "logs/metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in records if r["split"] == split]


def model_dir(output_dir: Path) -> Path:
    """The PRIME model directory a run wrote."""
    (found,) = [p for p in output_dir.iterdir() if (p / "prime.json").is_file()]
    return found


class PreemptionNoticeServer(http.server.BaseHTTPRequestHandler):
    """A GCE metadata server on loopback: `instance/preempted` long-polls (up to 5 s) and
    answers TRUE once `posted` is set; it requires and returns `Metadata-Flavor: Google`."""

    posted = threading.Event()

    def do_GET(self):  # noqa: N802
        if self.headers.get("Metadata-Flavor") != "Google" or "instance/preempted" not in self.path:
            self.send_error(403 if self.headers.get("Metadata-Flavor") != "Google" else 404)
            return
        body = b"TRUE" if self.posted.wait(timeout=5) else b"FALSE"
        self.send_response(200)
        self.send_header("Metadata-Flavor", "Google")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

    @classmethod
    def start(cls) -> http.server.ThreadingHTTPServer:
        """Serve on 127.0.0.1:<free port> in a daemon thread; `.shutdown()` when done."""
        cls.posted.clear()
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), cls)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server
