"""Helpers shared by Reactor Core's test modules (on pytest's `pythonpath`)."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

from reactor_core import Trainer, TrainingConfig

# SmolVLM's image special tokens: the processor expands <image> into these.
IDEFICS3_SPECIAL_TOKENS: tuple[str, ...] = (
    "<fake_token_around_image>", "<image>", "<global-img>",
    *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
)

# Chat template of the SmolVLM kind: content is a string or a list of text/image parts.
VISION_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<image>{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

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


def train_cancelled_at(config: TrainingConfig, data: Path, step: int):
    """A run of `config` cancelled once step `step` is done (what Ctrl-C does), its result;
    the checkpoints it wrote stay for a resume."""
    trainer = Trainer(config, progress=False)
    trainer.recipe.on_event = lambda event: event.kind == "step" and event.step == step and trainer.cancel()
    result = trainer.train(data)
    assert result.cancelled
    return result


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


def build_idefics3(path: Path, tokenizer) -> Path:
    """A tiny random Idefics3 / SmolVLM HF directory (2-layer Llama text model, 2-layer
    SigLIP-style encoder, pixel-shuffle connector) with its processor files; `tokenizer`
    (SmolLM2's, a copy: it is changed) gets SmolVLM's image special tokens.

    The idea of jarvis-prime's tests/tiny_vision.py, kept here because Reactor Core's
    tests import nothing of jarvis-prime's.
    """
    import torch
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    tokenizer.add_special_tokens({"additional_special_tokens": list(IDEFICS3_SPECIAL_TOKENS)})
    tokenizer.chat_template = VISION_CHAT_TEMPLATE
    torch.manual_seed(0)
    config = Idefics3Config(
        text_config=dict(
            model_type="llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, initializer_range=0.2,
        ),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=64, patch_size=16),  # 4x4 patches -> 2x2 = 4 tokens per tile
        scale_factor=2, tie_word_embeddings=False, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
    )
    Idefics3ForConditionalGeneration(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    (path / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Idefics3ImageProcessor", "do_resize": True, "size": {"longest_edge": 128},
        "max_image_size": {"longest_edge": 64}, "do_image_splitting": True, "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3, "do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255,
        "resample": 1}))
    # 64 / 16 = 4x4 patches, pixel-shuffled by 2: 4 image tokens per tile (Idefics3Processor's default is 169)
    (path / "processor_config.json").write_text(json.dumps({"processor_class": "Idefics3Processor",
                                                            "image_seq_len": 4}))
    return path


def png_bytes(seed: int, size: tuple[int, int] = (128, 96)) -> bytes:
    """A random RGB PNG (width x height), different for every seed."""
    import io

    import numpy as np
    from PIL import Image

    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_vision_data(path: Path, n: int = 16, sizes: tuple[tuple[int, int], ...] = ((128, 96), (300, 50), (60, 90))) -> Path:
    """Chat lines, each with one image (sizes vary, so tile counts vary) under images/, and
    every fourth with a second user turn and reply (multi-turn)."""
    (path.parent / "images").mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i in range(n):
            (path.parent / "images" / f"{i}.png").write_bytes(png_bytes(i, sizes[i % len(sizes)]))
            color = COLORS[i % len(COLORS)]
            messages = [
                {"role": "user", "content": [{"type": "image", "path": f"images/{i}.png"},
                                             {"type": "text", "text": f"What colour is picture {i}?"}]},
                {"role": "assistant", "content": f"It is {color}."},
            ]
            if i % 4 == 3:
                messages += [{"role": "user", "content": "And its number?"},
                             {"role": "assistant", "content": f"Number {i}."}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path
