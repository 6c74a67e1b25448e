"""llama.cpp's own `convert_hf_to_gguf.py`, run in a child process: every Hugging Face ->
GGUF step of `prime export`, a text model's full-precision GGUF and a vision model's
projector (`--mmproj`: the image encoder and connector libmtmd runs).

Why llama.cpp's converter and not one of ours: it is written against the llama.cpp it
ships with (architectures, tensor names and layouts, tokenizer kinds and their
pre-tokenizers, projector metadata), and llama-cpp-python's sdist carries the one matching
the installed library (`make llama-cpp-converter` unpacks it into the venv;
LLAMA_CPP_CONVERT_HF names another). Every architecture it converts exports here.

The converter runs in a child process (it imports torch and reads the whole model; a crash
there must not take the caller down) on a *view* of the model directory: symlinks to the
files prime.json lists and the caller has verified, so it reads nothing unverified, with
two files written for it:

- config.json, when a vision model's `text_config.architectures` is missing (transformers'
  Idefics3 `save_pretrained` leaves it out; the converter needs it to pick the text class);
- tokenizer_config.json, whose `chat_template` is the PRIME directory's chat_template.jinja
  (the converter prefers tokenizer_config's template to the .jinja file; the GGUF must carry
  the template the model was trained and is served with).

What PRIME adds to the converter's output goes through two small hooks in the child (see
`_DRIVER`), never an edited converter: the end-of-turn token (`tokenizer.ggml.eot_token_id`)
from prime.json's `stop` when it differs from the tokenizer's EOS, and `tokenizer_pre`, a
pre-tokenizer name given by the user (`prime export --tokenizer-pre`) for a byte-level BPE
tokenizer the converter does not recognise. The converter's output goes to a log file,
shown (the tail) only when it fails.
"""

from __future__ import annotations

import ast
import json
import os
import re
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
# converter imports it before it looks for tokenizer.model, and tokenizer.json models (byte-level
# BPE like Llama 3, or byte-fallback BPE like Llama 2's) never use it; a model that ships only a
# tokenizer.model then fails inside the converter, loudly (and the error says to install it).
# Two hooks (PRIME_SPECIAL_TOKENS, PRIME_TOKENIZER_PRE; see the module docstring) wrap the
# converter's own functions; nothing else of it changes.
_DRIVER = """
import importlib, importlib.machinery, importlib.util, json, os, sys, types
if importlib.util.find_spec("sentencepiece") is None:
    stub = types.ModuleType("sentencepiece")
    stub.__spec__ = importlib.machinery.ModuleSpec("sentencepiece", None)
    stub.SentencePieceProcessor = None
    sys.modules["sentencepiece"] = stub
converter = sys.argv[1]
sys.path.insert(0, os.path.dirname(converter))
import convert_hf_to_gguf
gguf = convert_hf_to_gguf.gguf
extra = json.loads(os.environ.get("PRIME_SPECIAL_TOKENS") or "{}")
if extra:
    add_to_gguf = gguf.SpecialVocab.add_to_gguf
    def add_with_prime_tokens(self, gw, quiet=False):
        add_to_gguf(self, gw, quiet=quiet)
        for kind, token_id in extra.items():
            getattr(gw, "add_" + kind + "_token_id")(token_id)
    gguf.SpecialVocab.add_to_gguf = add_with_prime_tokens
pre = os.environ.get("PRIME_TOKENIZER_PRE")
if pre:
    text_model = getattr(convert_hf_to_gguf, "TextModel", None) or importlib.import_module("conversion").TextModel
    text_model.get_vocab_base_pre = lambda self, tokenizer: pre
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
        "llama.cpp's convert_hf_to_gguf.py writes every GGUF export (text models, and vision models' mmproj) and "
        f"was not found: run `make llama-cpp-converter` (unpacks the one matching llama-cpp-python "
        f"{installed or '(not installed)'} into {sys.prefix}/share), or set {CONVERTER_ENV} to a "
        "convert_hf_to_gguf.py from the llama.cpp your llama-cpp-python bundles")


def converter_architectures(converter: Path) -> tuple[str, ...]:
    """The Hugging Face architectures (config.json `architectures`) this converter converts to a
    text GGUF, read from its sources without importing them (that would import torch): the
    `TEXT_MODEL_MAP` of its `conversion/` package, or, in a one-file converter, its
    `ModelBase.register(...)` names. Empty when neither is found (the converter then decides)."""
    package = converter.parent / "conversion" / "__init__.py"
    if package.is_file():
        for node in ast.parse(package.read_text(encoding="utf-8")).body:
            target = node.target if isinstance(node, ast.AnnAssign) else (
                node.targets[0] if isinstance(node, ast.Assign) else None)
            if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP" and node.value is not None:
                return tuple(sorted(ast.literal_eval(node.value)))
    registered = re.findall(r"register\(([^)]*)\)", converter.read_text(encoding="utf-8"))
    return tuple(sorted({name for args in registered for name in re.findall(r'"(\w+)"', args)}))


def text_architecture(config: dict) -> list[str]:
    """The architecture the converter picks its text model class by (`[name]`, or `[]`): a
    multimodal config's `text_config.architectures`, else `architectures`; for an Idefics3 /
    SmolVLM config without the former, the Llama text class llama.cpp registers for it."""
    text = config.get("text_config")
    if isinstance(text, dict):
        if text.get("architectures"):
            return list(text["architectures"][:1])
        if config.get("model_type") in ("idefics3", "smolvlm"):
            return [IDEFICS3_TEXT_ARCHITECTURE]
    return _architectures(config)[:1]


def _architectures(config: dict) -> list[str]:
    value = config.get("architectures")
    return list(value) if isinstance(value, list) else []


def chat_template(model_dir: Path) -> str:
    """The PRIME directory's chat template: chat_template.jinja, else tokenizer_config.json's."""
    template_file = model_dir / "chat_template.jinja"
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")
    config = model_dir / "tokenizer_config.json"
    template = json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.is_file() else None
    if not isinstance(template, str) or not template:
        raise ExportError(f"{model_dir}: no chat template (chat_template.jinja or tokenizer_config.json)")
    return template


def converter_view(model_dir: Path, files: list[str], view: Path) -> Path:
    """A folder of symlinks to `files` (relative paths the caller verified) of `model_dir`,
    with config.json rewritten when its text model's class is missing and tokenizer_config.json
    carrying the directory's chat template (see module docstring)."""
    view.mkdir(parents=True, exist_ok=True)
    for rel in files:
        (view / rel).parent.mkdir(parents=True, exist_ok=True)
        (view / rel).symlink_to((model_dir / rel).resolve())
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config")
    if isinstance(text, dict) and not text.get("architectures") and config.get("model_type") in ("idefics3", "smolvlm"):
        config["text_config"] = {**text, "architectures": text_architecture(config)}
        _replace(view / "config.json", config)
    has_template = (model_dir / "chat_template.jinja").is_file() or (model_dir / "tokenizer_config.json").is_file()
    if has_template:
        tokenizer_config = model_dir / "tokenizer_config.json"
        settings = json.loads(tokenizer_config.read_text(encoding="utf-8")) if tokenizer_config.is_file() else {}
        try:
            _replace(view / "tokenizer_config.json", {**settings, "chat_template": chat_template(model_dir)})
        except ExportError:
            pass  # no template anywhere: the GGUF has none either (a base model)
    return view


def _replace(path: Path, content: dict) -> None:
    path.unlink(missing_ok=True)  # a symlink to the model's own file: never written through
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False), encoding="utf-8")


def convert_hf(model_dir: Path, out: Path, outtype: str, *, mmproj: bool = False, label: str | None = None,
               special_tokens: dict[str, int] | None = None, tokenizer_pre: str | None = None,
               log: Log = lambda message: None) -> None:
    """`convert_hf_to_gguf.py model_dir [--mmproj] --outtype outtype --outfile out` in a child
    process; ExportError (naming `label`, default the folder's name) with the tail of its log when
    it fails or writes nothing. `general.name` stays the converter's own: llama.cpp keys per-model
    token rules on it (a name containing "phi3" makes it expect Phi-3's SentencePiece tokens). `special_tokens` (kind -> id, e.g. {"eot": 7}) are written after
    the converter's own; `tokenizer_pre` replaces its pre-tokenizer detection (module docstring)."""
    if outtype not in OUTTYPES:
        raise ExportError(f"llama.cpp's converter writes {', '.join(OUTTYPES)}, not {outtype!r}")
    converter = find_converter()
    what = "projector (mmproj)" if mmproj else "text model"
    log(f"writing the {outtype} {what} GGUF with llama.cpp's converter")
    args = [sys.executable, "-c", _DRIVER, str(converter), str(model_dir), *(["--mmproj"] if mmproj else []),
            "--outtype", outtype, "--outfile", str(out)]
    env = {**os.environ, "PRIME_SPECIAL_TOKENS": json.dumps(special_tokens or {}),
           "PRIME_TOKENIZER_PRE": tokenizer_pre or ""}
    if verbose():  # -v: the converter's own output, live
        done = subprocess.run(args, stdin=subprocess.DEVNULL, env=env)
        captured = ""
    else:
        with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as sink:
            done = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, env=env)
            sink.seek(0)
            captured = sink.read()
    if done.returncode != 0 or not out.is_file():
        raise ExportError(f"llama.cpp's converter ({converter}) could not write the {outtype} {what} GGUF of "
                          f"{label or model_dir.name} (exit code {done.returncode}):\n{log_tail(captured)}")
