"""Image questions end to end: latency and accuracy per quantization, PrimeModel beside
what a user would otherwise pick.

    python -m jarvis_prime.recipes.vision_data data/vqa --train 0 --heldout 100
    python benchmarks/vision.py prime-135m-vision-v1 --data data/vqa/heldout.jsonl [-n 50]
        [--quants f16 q8_0 f32] [--max-new-tokens 16] [--repeats 3] [--out benchmarks/results/vision.json]

MODEL is a catalog/store name or a PRIME model directory of a `task: vision` model. Engines,
per quantization the model has (`--quants`; default: all of them):

  PrimeModel llama.cpp        a GGUF quantization (f16, q8_0, ...) with the mmproj prime.json names
  llama-cpp-python MTMD       the same two files through llama-cpp-python's own MTMDChatHandler
                              and Llama.create_chat_completion, used directly
  PrimeModel transformers     the safetensors weights (f32) through AutoModelForImageTextToText

Everything runs on the CPU, with as many threads as it has. Every engine gets the same
OpenAI-style messages (the image as a data: URL, the question as text), greedy decoding,
at most --max-new-tokens, the model's stop strings. Each engine answers one question
untimed first (warm-up), then the engines of a quantization take turns question by
question, each answering it --repeats times, so background noise on a small machine
spreads over all of them. Per question (the median of its repeats): the
image encoder alone (libmtmd's mtmd_encode_chunk, or the transformers model's
get_image_features, on the image as the engine preprocesses it), the time to the first
answer text (reading the image, encoding it, the prompt), and the whole answer. Medians
over the questions are reported, with accuracy overall and per category, scored as
`prime eval` scores VQA (`jarvis_prime.evaluation.score_vqa`).

PrimeModel's encoder timing reads the projector and the transformers model it loaded
(`_backend`): the same libmtmd context and weights that answer, not a second copy.

Target (issue 20): PrimeModel llama.cpp answers at >= 0.95x the speed of llama-cpp-python's
own handler (median whole-answer time, same quantization). Also counted: how many of each
llama.cpp engine's greedy replies are exactly transformers' (`agreement`). Prints a table;
writes JSON.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import json
import os
import platform
import statistics
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from rich.console import Console

from jarvis_prime.hardware import cpu_name
from jarvis_prime.tables import Col, print_table

RESULTS = Path(__file__).parent / "results" / "vision.json"
TARGET = 0.95
PRIME_LLAMA, RAW_LLAMA, PRIME_HF = "PrimeModel llama.cpp", "llama-cpp-python MTMD", "PrimeModel transformers"

Ask = Callable[[list[dict[str, Any]]], Iterator[str]]  # messages -> the answer's text pieces as they come
Encode = Callable[[bytes], float]  # image bytes -> seconds the image encoder took


@dataclass(frozen=True)
class Question:
    messages: list[dict[str, Any]]  # OpenAI-style: the image as an image_url data: URL
    image: bytes
    category: str
    answer: str


@dataclass
class Engine:
    name: str
    quantization: str
    backend: str
    ask: Ask
    encode: Encode
    close: Callable[[], None]


def load_questions(data: Path, n: int) -> list[Question]:
    """The first `n` records of a VQA JSONL as OpenAI messages with data: URLs (the form both a
    server and llama-cpp-python take), the reference answer turn dropped."""
    from jarvis_prime.evaluation import load_vqa_records
    from jarvis_prime.models.content import image_bytes, image_format

    questions = []
    for number, record in enumerate(load_vqa_records(data)[:n], start=1):
        turns = record["messages"][:-1] if record["messages"][-1]["role"] == "assistant" else record["messages"]
        image, messages = None, []
        for message in turns:
            content = message["content"]
            if isinstance(content, list):
                parts = []
                for part in content:
                    if part.get("type") == "image":
                        image = image_bytes(part.get("path", part.get("image")), f"{data}:{number}")
                        url = f"data:image/{image_format(image)};base64,{base64.b64encode(image).decode()}"
                        part = {"type": "image_url", "image_url": {"url": url}}
                    parts.append(part)
                content = parts
            messages.append({"role": message["role"], "content": content})
        if image is None:
            raise SystemExit(f"{data}:{number}: no image in the question")
        questions.append(Question(messages, image, record["category"], record["answer"]))
    if not questions:
        raise SystemExit(f"{data}: no VQA records")
    return questions


# -- engines -------------------------------------------------------------------------------

def mtmd_encoder(mtmd_ctx: Any) -> Encode:
    """Seconds libmtmd's encoder (vision tower + projector) takes for one image's chunks."""
    import llama_cpp.mtmd_cpp as mtmd

    from jarvis_prime.models.content import EncodedImage
    from jarvis_prime.models.mtmd import bitmaps, chunk_list, tokenized

    class Handler:  # what `bitmaps` needs: a bitmap from encoded bytes
        def _create_bitmap_from_bytes(self, data: bytes):
            bitmap = mtmd.mtmd_helper_bitmap_init_from_buf(mtmd_ctx, (ctypes.c_uint8 * len(data)).from_buffer(
                bytearray(data)), len(data), False)
            if not bitmap:
                raise ValueError("llama.cpp cannot decode the image")
            return bitmap

    def encode(image: bytes) -> float:
        with bitmaps(Handler(), [EncodedImage(image, "image")]) as maps, \
                tokenized(mtmd_ctx, mtmd.mtmd_default_marker().decode(), maps) as chunks:
            start = time.perf_counter()
            for chunk, ids in chunk_list(chunks):
                if ids is None and mtmd.mtmd_encode_chunk(mtmd_ctx, chunk) != 0:
                    raise RuntimeError("mtmd_encode_chunk failed")
            return time.perf_counter() - start

    return encode


def transformers_encoder(model: Any, processor: Any) -> Encode:
    """Seconds the transformers model's image features (vision tower + connector) take for one image."""
    import io

    import torch
    from PIL import Image

    def encode(image: bytes) -> float:
        pixels = processor.image_processor(images=[[Image.open(io.BytesIO(image)).convert("RGB")]],
                                           return_tensors="pt")
        with torch.inference_mode():
            start = time.perf_counter()
            model.get_image_features(pixel_values=pixels["pixel_values"].to(model.dtype),
                                     pixel_attention_mask=pixels.get("pixel_attention_mask"))
            return time.perf_counter() - start

    return encode


def prime_engine(path: Path, quantization: str, max_new_tokens: int) -> Engine:
    from jarvis_prime.evaluation import variant_runtime
    from jarvis_prime.manifest import read_manifest
    from jarvis_prime.models.prime_model import PrimeModel

    manifest = read_manifest(path)
    _, runtime = variant_runtime(manifest, quantization)
    model = PrimeModel.load(path, manifest, runtime)
    if not model.sees_images:
        model.close()
        raise SystemExit(f"{manifest.name} {quantization}: this variant cannot see images "
                         "(not a vision model, or a GGUF without its mmproj)")

    def ask(messages: list[dict[str, Any]]) -> Iterator[str]:
        return model.chat(messages, stream=True, max_new_tokens=max_new_tokens, temperature=0.0)

    if runtime.backend == "llamacpp":
        # The projector PrimeModel opened; the timing is libmtmd's own, whoever opened it.
        encode = mtmd_encoder(model._backend._vision.mtmd_ctx)
    else:
        encode = transformers_encoder(model._backend.model, model._backend.processor)
    name = PRIME_LLAMA if runtime.backend == "llamacpp" else PRIME_HF
    return Engine(name, quantization, runtime.backend, ask, encode, model.close)


def llama_cpp_python_engine(path: Path, quantization: str, max_new_tokens: int, n_ctx: int) -> Engine:
    """llama-cpp-python as its README shows it: Llama(chat_handler=MTMDChatHandler(mmproj)),
    create_chat_completion with image_url parts. Same files, threads and context as PrimeModel;
    sampling set to PrimeModel's greedy (no repeat penalty, min_p or top_k)."""
    from llama_cpp.llama_chat_format import MTMDChatHandler

    from jarvis_prime.manifest import read_manifest
    from jarvis_prime.models.llamacpp import open_llama
    from jarvis_prime.models.mtmd import route_mtmd_logs

    manifest = read_manifest(path)
    entry = manifest.quantizations[quantization]
    route_mtmd_logs()  # libmtmd's per-image lines, quiet as PrimeModel keeps them
    handler = MTMDChatHandler(clip_model_path=str(path / entry.mmproj), verbose=False, use_gpu=False)
    # open_llama is Llama() with llama.cpp's AMX repacking kept off (it segfaults), as PrimeModel opens it
    llama = open_llama(path / entry.file, chat_handler=handler, n_ctx=n_ctx, n_threads=os.cpu_count(), verbose=False)
    handler._init_mtmd_context(llama)

    def ask(messages: list[dict[str, Any]]) -> Iterator[str]:
        for chunk in llama.create_chat_completion(messages=messages, max_tokens=max_new_tokens, temperature=0.0,
                                                  top_k=0, min_p=0.0, repeat_penalty=1.0, stop=list(manifest.stop),
                                                  stream=True):
            yield chunk["choices"][0]["delta"].get("content") or ""

    return Engine(RAW_LLAMA, quantization, "llamacpp", ask, mtmd_encoder(handler.mtmd_ctx), llama.close)


def engines_for(path: Path, quantization: str, max_new_tokens: int, stack: ExitStack) -> list[Engine]:
    """PrimeModel and llama-cpp-python for a GGUF quantization; PrimeModel transformers for safetensors."""
    from jarvis_prime.manifest import read_manifest

    manifest = read_manifest(path)
    entry = manifest.quantizations.get(quantization)
    if entry is None:
        have = ", ".join(manifest.quantizations)
        raise SystemExit(f"{manifest.name} has no {quantization!r} quantization (have: {have})")
    prime = prime_engine(path, quantization, max_new_tokens)
    stack.callback(prime.close)
    if entry.format != "gguf":
        return [prime]
    if not entry.mmproj:
        raise SystemExit(f"{manifest.name} {quantization}: the GGUF names no mmproj; `prime export` writes one")
    raw = llama_cpp_python_engine(path, quantization, max_new_tokens, n_ctx=min(manifest.context_length, 4096))
    stack.callback(raw.close)
    return [prime, raw]


# -- measuring -----------------------------------------------------------------------------

def timed_answer(engine: Engine, question: Question) -> tuple[str, float, float]:
    """(reply, seconds to its first text, seconds to all of it)."""
    start = time.perf_counter()
    first, pieces = None, []
    for piece in engine.ask(question.messages):
        if piece and first is None:
            first = time.perf_counter() - start
        pieces.append(piece)
    total = time.perf_counter() - start
    return "".join(pieces).strip(), first if first is not None else total, total


def answer_once(engine: Engine, question: Question, repeats: int = 1) -> dict[str, Any]:
    """One question, `repeats` times: the median time to the first answer text, to the whole
    answer, and of the encoder alone. Greedy: every repeat gives the same reply."""
    from jarvis_prime.evaluation import score_vqa

    runs = [timed_answer(engine, question) for _ in range(repeats)]
    reply = runs[0][0]
    return {"category": question.category, "answer": question.answer, "reply": reply,
            "passed": score_vqa(question.category, question.answer, reply),
            "ttft_s": statistics.median(r[1] for r in runs), "answer_s": statistics.median(r[2] for r in runs),
            "image_encode_s": statistics.median(engine.encode(question.image) for _ in range(repeats))}


def summarize(engine: Engine, cases: list[dict[str, Any]]) -> dict[str, Any]:
    from jarvis_prime.evaluation import accuracy_by

    median = lambda key: statistics.median(c[key] for c in cases)  # noqa: E731
    return {"engine": engine.name, "quantization": engine.quantization, "backend": engine.backend,
            "image_encode_s": median("image_encode_s"), "ttft_s": median("ttft_s"), "answer_s": median("answer_s"),
            "accuracy": sum(c["passed"] for c in cases) / len(cases), "by_category": accuracy_by(cases, "category"),
            "cases": cases}


def measure(engines: list[Engine], questions: list[Question], repeats: int,
            log: Callable[[str], None]) -> list[dict[str, Any]]:
    for engine in engines:
        log(f"{engine.quantization}: warm-up {engine.name}")
        answer_once(engine, questions[0])
    cases: dict[str, list[dict[str, Any]]] = {e.name: [] for e in engines}
    for i, question in enumerate(questions, start=1):
        log(f"{engines[0].quantization}: question {i}/{len(questions)}")
        for engine in engines:  # engines take turns, question by question
            cases[engine.name].append(answer_once(engine, question, repeats))
    return [summarize(e, cases[e.name]) for e in engines]


def speed_ratios(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per GGUF quantization: PrimeModel's speed as a multiple of llama-cpp-python's (> 1 is faster)."""
    by = {(r["quantization"], r["engine"]): r for r in rows}
    out = {}
    for quantization in dict.fromkeys(r["quantization"] for r in rows):
        prime, raw = by.get((quantization, PRIME_LLAMA)), by.get((quantization, RAW_LLAMA))
        if prime and raw:
            out[quantization] = {"answer": raw["answer_s"] / prime["answer_s"], "ttft": raw["ttft_s"] / prime["ttft_s"]}
    return out


def agreement(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per llama.cpp row ("quantization engine"): how many greedy replies are exactly the
    transformers row's (the reference weights, f32), question by question; empty when
    transformers did not run."""
    reference = next((r for r in rows if r["engine"] == PRIME_HF), None)
    if reference is None:
        return {}
    replies = [c["reply"] for c in reference["cases"]]
    return {f"{r['quantization']} {r['engine']}": {"same": sum(c["reply"] == want for c, want in zip(r["cases"], replies)),
                                                  "of": len(replies)}
            for r in rows if r is not reference}


def print_report(console: Console, title: str, rows: list[dict[str, Any]], ratios: dict[str, dict[str, float]]) -> None:
    categories = sorted({c for r in rows for c in r["by_category"]})
    columns = [Col("quant", keep=True), Col("engine", keep=True),
               *(Col(name, justify="right") for name in ("image encode", "first token", "answer", "accuracy",
                                                                    *categories))]
    # tables.print_table: quantization and engine names are never cut; too narrow a terminal gets blocks
    print_table(console, columns, [
        [r["quantization"], r["engine"], f"{r['image_encode_s'] * 1000:.0f} ms", f"{r['ttft_s'] * 1000:.0f} ms",
         f"{r['answer_s'] * 1000:.0f} ms", f"{r['accuracy']:.0%}",
         *(f"{r['by_category'][c]:.0%}" if c in r["by_category"] else "-" for c in categories)] for r in rows],
        title=title)
    for row, agreed in agreement(rows).items():
        console.print(f"{row}: {agreed['same']}/{agreed['of']} greedy replies the same as {PRIME_HF} (f32)")
    for quantization, ratio in ratios.items():
        met = "[green]met" if ratio["answer"] >= TARGET else "[red]missed"
        console.print(f"{quantization}: PrimeModel / llama-cpp-python speed {ratio['answer']:.2f}x whole answer, "
                      f"{ratio['ttft']:.2f}x first token ({met}[/]: target >= {TARGET}x)")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="catalog/store name or PRIME model directory of a vision model")
    parser.add_argument("--data", type=Path, required=True,
                        help="VQA JSONL (python -m jarvis_prime.recipes.vision_data OUT --train 0 --heldout N)")
    parser.add_argument("-n", "--questions", type=int, default=50, help="questions (the file's first N)")
    parser.add_argument("--quants", nargs="+", help="quantizations to run (default: every one the model has)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="times each engine answers each question (median)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    from jarvis_prime.files import sha256_file
    from jarvis_prime.progress import quiet_build
    from jarvis_prime.store import resolve

    console = Console()
    local = resolve(args.model)
    quants = args.quants or list(local.manifest.quantizations)
    questions = load_questions(args.data, args.questions)
    rows: list[dict[str, Any]] = []
    with quiet_build(f"vision benchmark, {local.manifest.name}") as log:  # llama.cpp's own output captured
        for quantization in quants:
            log(f"{quantization}: loading")
            with ExitStack() as stack:
                engines = engines_for(local.path, quantization, args.max_new_tokens, stack)
                rows += measure(engines, questions, args.repeats, log)
    ratios = speed_ratios(rows)
    title = (f"image questions, {local.manifest.name} {local.manifest.version}, {len(questions)} questions, "
             f"greedy, <= {args.max_new_tokens} new tokens, medians of {args.repeats}")
    print_report(console, title, rows, ratios)
    result = {"model": local.manifest.name, "version": local.manifest.version, "data": str(args.data),
              "data_sha256": sha256_file(args.data), "questions": len(questions),
              "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "target_speed_ratio": TARGET,
              "machine": {"platform": platform.platform(), "processor": cpu_name(),
                          "cpus": os.cpu_count()},
              "rows": rows, "speed_ratios": ratios, "agreement": agreement(rows)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
