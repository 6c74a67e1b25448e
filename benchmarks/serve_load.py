"""`prime serve` under concurrent streaming clients, beside llama-cpp-python's own server.

    python benchmarks/serve_load.py [--model smollm2-135m-instruct] [--requests 4] [--max-tokens 64]
                                    [--clients 1 4 8 16] [--max-batch 16]

Both servers serve the same GGUF on loopback with the same thread count; for 1, 4, 8
and 16 concurrent clients (the official `openai` client, streaming, greedy), each client
sends --requests chat requests (its own question, so no two share a reply). Reported per
server and concurrency: aggregate completion tokens/s (streamed pieces, one per token,
over wall time), p50 / p95 time to first token, and errors. Targets (issue 23,
continuous batching on llama.cpp): at 8 clients >= 2.5x llama-cpp-python's aggregate
throughput and TTFT p50 <= 1 s; at 1 client >= 0.95x; 0 errors. `--transformers` adds
`prime serve --backend transformers` with and without batching of concurrent requests
(same model, safetensors weights). Writes benchmarks/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.console import Console

from jarvis_prime.hardware import cpu_name
from jarvis_prime.tables import Col, print_table

RESULTS = Path(__file__).parent / "results" / "serve_load.json"
SUBJECTS = ["a robot", "a dragon", "a lighthouse keeper", "a cat", "a baker", "a pilot", "a gardener", "a clock",
            "a river", "a violinist", "an astronaut", "a fox", "a librarian", "a whale", "a mountain", "a painter"]


def prompt(client: int) -> list[dict]:
    return [{"role": "user", "content": f"Write a long story about {SUBJECTS[client % len(SUBJECTS)]} who learns to paint."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:  # noqa: BLE001  (not up yet)
            time.sleep(0.2)
    raise TimeoutError(url)


def one_request(client, model: str, max_tokens: int, messages: list[dict]) -> tuple[float, int]:
    """(time to first token, streamed tokens) of one streaming chat request."""
    start = time.perf_counter()
    first, tokens = None, 0
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - start
            tokens += 1
    return first or time.perf_counter() - start, tokens


def load(base_url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=600)
    ttfts, tokens, errors = [], 0, 0

    def worker(index: int) -> None:
        nonlocal tokens, errors
        for _ in range(requests):
            try:
                ttft, n = one_request(client, model, max_tokens, prompt(index))
                ttfts.append(ttft)
                tokens += n
            except Exception:  # noqa: BLE001  (counted, reported)
                errors += 1

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    wall = time.perf_counter() - start
    ttfts.sort()
    return {"clients": clients, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "errors": errors,
            "ttft_p50_s": statistics.median(ttfts) if ttfts else None,
            "ttft_p95_s": ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))] if ttfts else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--max-batch", type=int, default=16, help="prime serve's slots (llama.cpp sequences)")
    parser.add_argument("--transformers", action="store_true",
                        help="also prime serve on transformers, batched (--max-batch 8) and not (--max-batch 1)")
    args = parser.parse_args()
    console = Console()
    load_before = os.getloadavg()  # another job on this machine shows here

    from jarvis_prime.manifest import matching_gguf
    from jarvis_prime.store import resolve

    local = resolve(args.model)
    quant = matching_gguf(local.manifest, None)
    gguf = local.path / local.manifest.quantizations[quant].file
    servers = {
        "prime serve": (lambda port: [sys.executable, "-m", "jarvis_prime.cli", "serve", args.model, "--backend",
                                      "llamacpp", "--port", str(port), "--context-length", "2048", "--max-queue", "64",
                                      "--max-batch", str(args.max_batch)],
                        "/health", args.model),
        "llama_cpp.server": (lambda port: [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--port",
                                           str(port), "--n_ctx", "2048", "--n_threads", str(args.threads)],
                             "/v1/models", str(gguf)),
    }
    if args.transformers:
        for label, batch in (("prime serve transformers batched", "8"), ("prime serve transformers max_batch=1", "1")):
            servers[label] = (lambda port, batch=batch: [
                sys.executable, "-m", "jarvis_prime.cli", "serve", args.model, "--backend", "transformers", "--port",
                str(port), "--context-length", "2048", "--max-queue", "64", "--max-batch", batch], "/health", args.model)
    results: dict[str, list[dict]] = {}
    for name, (command, ready_path, model_id) in servers.items():
        port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.Popen(command(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            wait_ready(f"http://127.0.0.1:{port}{ready_path}")
            base = f"http://127.0.0.1:{port}/v1"
            load(base, model_id, 1, 1, 8)  # warm-up
            results[name] = []
            for clients in args.clients:
                console.print(f"{name}: {clients} clients ...")
                results[name].append(load(base, model_id, clients, args.requests, args.max_tokens))
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    columns = [Col("server", keep=True), Col("clients", justify="right"), Col("tokens/s", justify="right"),
               Col("x llama_cpp.server", justify="right"), Col("TTFT p50", justify="right"),
               Col("TTFT p95", justify="right"), Col("errors", justify="right")]
    table = []
    for name, rows in results.items():
        for row, ref in zip(rows, results["llama_cpp.server"]):
            row["ratio"] = row["tokens_per_s"] / ref["tokens_per_s"]
            table.append([name, str(row["clients"]), f"{row['tokens_per_s']:.1f}", f"{row['ratio']:.2f}",
                          f"{row['ttft_p50_s']:.2f} s", f"{row['ttft_p95_s']:.2f} s", str(row["errors"])])
    print_table(console, columns, table, title=f"streaming chat load, {gguf.name}, {args.max_tokens} tokens a "
                                               f"request ({cpu_name()}, {args.threads} threads)")
    rows = {row["clients"]: row for row in results["prime serve"]}
    targets = {}
    if 8 in rows:
        targets["8 clients: >= 2.5x llama_cpp.server tokens/s"] = rows[8]["ratio"] >= 2.5
        targets["8 clients: TTFT p50 <= 1 s"] = rows[8]["ttft_p50_s"] <= 1.0
    if 1 in rows:
        targets["1 client: >= 0.95x llama_cpp.server tokens/s"] = rows[1]["ratio"] >= 0.95
    targets["0 errors"] = all(row["errors"] == 0 for row in results["prime serve"])
    for target, met in targets.items():
        console.print(f"{'[green]met' if met else '[red]missed'}[/]: {target}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"gguf": gguf.name, "cpu": cpu_name(), "load_before": load_before,
                                   "results": results, "targets": targets}, indent=2))
    console.print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
