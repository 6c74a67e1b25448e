"""llama.cpp's own `convert_hf_to_gguf.py`, run in a child process: the Hugging Face -> GGUF
step for what our writer (`writer.py`) does not cover, a vision model's text GGUF and its
projector (`--mmproj`: the image encoder and connector libmtmd runs).

Why llama.cpp's converter and not a second one of ours: it is written against the
llama.cpp it ships with (tensor names, projector metadata, tokenizer quirks), and
llama-cpp-python's sdist carries the one matching the installed library
(`make llama-cpp-converter` unpacks it into the venv; LLAMA_CPP_CONVERT_HF names another).

The converter runs in a child process (it imports torch and reads the whole model; a crash
there must not take the caller down) on a *view* of the model directory: symlinks to the
files prime.json lists and the caller has verified, so it reads nothing unverified, and a
config.json whose `text_config.architectures` names the text model when the directory's
does not (transformers' Idefics3 `save_pretrained` leaves it out; the converter needs it to
pick the text class). Its output goes to a log file, shown (the tail) only when it fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from jarvis_prime.errors import ExportError
from jarvis_prime.progress import Log, log_tail, verbose

CONVERTER_ENV = "LLAMA_CPP_CONVERT_HF"
# The text model class llama.cpp's converter registers for Idefics3 / SmolVLM's Llama text model.
IDEFICS3_TEXT_ARCHITECTURE = "VLlama3ForCausalLM"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # what the converter writes itself; the rest is quantize.py's

# Runs the converter's main() with one argv. sentencepiece is stubbed when missing: the Llama
# converter imports it before it looks for tokenizer.model, and byte-level BPE models (SmolLM2,
# Llama 3) never use it; a SentencePiece model without it then fails inside the converter, loudly.
_DRIVER = """
import importlib.machinery, importlib.util, os, sys, types
if importlib.util.find_spec("sentencepiece") is None:
    stub = types.ModuleType("sentencepiece")
    stub.__spec__ = importlib.machinery.ModuleSpec("sentencepiece", None)
    stub.SentencePieceProcessor = None
    sys.modules["sentencepiece"] = stub
converter = sys.argv[1]
sys.path.insert(0, os.path.dirname(converter))
import convert_hf_to_gguf
sys.argv = [converter, *sys.argv[2:]]
convert_hf_to_gguf.main()
"""


def find_converter() -> Path:
    """LLAMA_CPP_CONVERT_HF, else the convert_hf_to_gguf.py `make llama-cpp-converter` unpacked
    into this environment for the installed llama-cpp-python; ExportError saying how to get one."""
    named = os.environ.get(CONVERTER_ENV)
    if named:
        if not Path(named).is_file():
            raise ExportError(f"{CONVERTER_ENV}={named}: no such file (it should name llama.cpp's convert_hf_to_gguf.py)")
        return Path(named)
    try:
        from importlib.metadata import version

        installed = version("llama-cpp-python")
    except Exception:  # noqa: BLE001 - not installed: say so below
        installed = None
    if installed:
        bundled = Path(sys.prefix) / "share" / f"llama-cpp-python-{installed}" / "vendor/llama.cpp/convert_hf_to_gguf.py"
        if bundled.is_file():
            return bundled
    raise ExportError(
        "llama.cpp's convert_hf_to_gguf.py is needed to export this model (vision models: the text GGUF and the "
        f"mmproj) and was not found: run `make llama-cpp-converter` (unpacks the one matching llama-cpp-python "
        f"{installed or '(not installed)'} into {sys.prefix}/share), or set {CONVERTER_ENV} to a "
        "convert_hf_to_gguf.py from the llama.cpp your llama-cpp-python bundles")


def converter_view(model_dir: Path, files: list[str], view: Path) -> Path:
    """A folder of symlinks to `files` (relative paths the caller verified) of `model_dir`,
    with config.json rewritten when its text model's class is missing (see module docstring)."""
    view.mkdir(parents=True, exist_ok=True)
    for rel in files:
        (view / rel).parent.mkdir(parents=True, exist_ok=True)
        (view / rel).symlink_to((model_dir / rel).resolve())
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config")
    if isinstance(text, dict) and not text.get("architectures") and config.get("model_type") in ("idefics3", "smolvlm"):
        config["text_config"] = {**text, "architectures": [IDEFICS3_TEXT_ARCHITECTURE]}
        (view / "config.json").unlink()
        (view / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return view


def convert_hf(model_dir: Path, out: Path, outtype: str, *, mmproj: bool = False, label: str | None = None,
               log: Log = lambda message: None) -> None:
    """`convert_hf_to_gguf.py model_dir [--mmproj] --outtype outtype --outfile out` in a child
    process; ExportError (naming `label`, default the folder's name) with the tail of its log when
    it fails or writes nothing."""
    if outtype not in OUTTYPES:
        raise ExportError(f"llama.cpp's converter writes {', '.join(OUTTYPES)}, not {outtype!r}")
    converter = find_converter()
    what = "projector (mmproj)" if mmproj else "text model"
    log(f"writing the {outtype} {what} GGUF with llama.cpp's converter")
    args = [sys.executable, "-c", _DRIVER, str(converter), str(model_dir), *(["--mmproj"] if mmproj else []),
            "--outtype", outtype, "--outfile", str(out)]
    if verbose():  # -v: the converter's own output, live
        done = subprocess.run(args, stdin=subprocess.DEVNULL)
        captured = ""
    else:
        with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as sink:
            done = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT)
            sink.seek(0)
            captured = sink.read()
    if done.returncode != 0 or not out.is_file():
        raise ExportError(f"llama.cpp's converter ({converter}) could not write the {outtype} {what} GGUF of "
                          f"{label or model_dir.name} (exit code {done.returncode}):\n{log_tail(captured)}")
