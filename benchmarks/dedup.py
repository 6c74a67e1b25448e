"""Near-duplicate removal at scale: MLForge, the numpy fallback and datasketch's MinHashLSH.

    python benchmarks/dedup.py [--records 1000000] [--threshold 0.8] [--num-perm 128]
                               [--methods mlforge,python,datasketch] [--datasketch-records N]

A generated corpus of short conversations (a user turn of 6-14 words and a reply of
25-60, words drawn Zipf-like from a 5,000-word vocabulary, so unrelated records share
common n-grams the way real text does). 10 % of the records are planted copies of an
earlier original with 0-10 words replaced and sometimes re-cased and re-punctuated,
which spreads their true Jaccard (word 3-gram shingles, computed exactly for each
planted pair) across the threshold. The corpus is generated batch by batch, in every
method's own process (peak RSS is its own), and never held: only a ring of recent
originals to copy from.

All three use word 3-gram shingles of the lower-cased text, `num_perm` permutations
(seed 1, datasketch's "legacy" a*x+b mod 2^61-1 scheme, the one MLForge implements) and
datasketch's way of choosing LSH bands and rows: its own 0.5/0.5 weights for datasketch;
Reactor Core checks each candidate against the threshold, so its bands lean to recall
(0.1/0.9; `reactor_core.data.dedup.lsh_params`).
mlforge and python are Reactor Core's `Deduplicator` (exact keys off, so only the
near-duplicate path is timed) on the two kernel backends; datasketch is MinHash
(`update_batch`, its permutations given once) + MinHashLSH, query then insert, as its
users write it. A record is reported as a duplicate of the kept record it names
(datasketch: of a candidate LSH returns; it checks no threshold itself).

Measured: records/s of the dedup stage alone (text in, verdicts out; generation is not
timed), peak RSS, and precision and recall of the found pairs against the planted truth
(a true pair: a planted copy whose exact Jaccard with its original is >= threshold).
Targets (issue #25): mlforge >= 20x datasketch's records/s at equal or better recall;
memory bounded by the index, not the corpus. Writes benchmarks/results/dedup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "dedup.json"
BATCH = 4096
PLANTED_SHARE = 0.10
VOCAB = 5000
RING = 20000  # recent originals a copy may come from
WORD = re.compile(r"[0-9a-z\x80-\U0010ffff]+")


def vocabulary(seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ne", "ra", "so", "tu", "vi", "ze", "po", "an", "el", "is", "on", "ur", "ba", "de",
                 "gi", "ho", "ju"]
    words: set[str] = set()
    while len(words) < VOCAB:
        words.add("".join(rng.choice(syllables, rng.integers(1, 4))))
    return sorted(words)


def corpus(n: int, seed: int = 1):
    """Yield (texts, planted) batches: planted maps a record's index to (original, exact Jaccard)."""
    words = np.array(vocabulary())
    p = 1.0 / (np.arange(VOCAB) + 10.0)
    p /= p.sum()
    rng = np.random.default_rng(seed)
    ring: deque[tuple[int, list[str], int]] = deque(maxlen=RING)  # (index, words, user length)
    i = 0
    while i < n:
        size = min(BATCH, n - i)
        pool = words[rng.choice(VOCAB, size * 90, p=p)].tolist()  # Zipf-like draws, taken in order
        draws = rng.random(size * 4).tolist()
        at = 0
        texts, planted = [], {}
        for k in range(size):
            if ring and draws[4 * k] < PLANTED_SHARE:
                j, original, user_len = ring[int(draws[4 * k + 1] * len(ring))]
                copy = list(original)
                for _ in range(int(draws[4 * k + 2] * 11)):  # 0-10 words replaced
                    copy[int(rng.integers(len(copy)))] = pool[at]
                    at += 1
                text = render(copy, user_len)
                if draws[4 * k + 3] < 0.5:
                    text = text.capitalize().replace(" ", ", ", 1) + "!"
                planted[i] = (j, jaccard(original, copy))
            else:
                user_len = 6 + int(draws[4 * k + 1] * 9)
                reply_len = 25 + int(draws[4 * k + 2] * 36)
                w = pool[at:at + user_len + reply_len]
                at += user_len + reply_len
                ring.append((i, w, user_len))
                text = render(w, user_len)
            texts.append(text)
            i += 1
        yield texts, planted


def render(w: list[str], user_len: int) -> str:
    return " ".join(w[:user_len]) + "?\n" + " ".join(w[user_len:]) + "."


def grams3(w: list[str]) -> set[tuple[str, str, str]]:
    return set(zip(w, w[1:], w[2:]))


def jaccard(a: list[str], b: list[str]) -> float:
    x, y = grams3(a), grams3(b)
    return len(x & y) / len(x | y)


# --------------------------------------------------------------------------------------
# One method, in its own process
# --------------------------------------------------------------------------------------


def run_reactor(backend: str, args):
    from reactor_core.data.dedup import Deduplicator, signatures
    from reactor_core.data.native import backend as kernels_for
    from reactor_core.data.pipeline_config import DedupConfig

    kernels = kernels_for(backend)
    config = DedupConfig(exact=False, threshold=args.threshold, num_perm=args.num_perm)
    dedup = Deduplicator(config, kernels)
    seconds, found, start, truth = 0.0, [], 0, {}
    for texts, planted in corpus(args.records):
        truth.update(planted)
        t0 = time.perf_counter()
        sigs = signatures(texts, config, kernels, threads=args.threads)
        verdicts = dedup.index.add(sigs)
        seconds += time.perf_counter() - t0
        found += [(start + k, int(v)) for k, v in enumerate(verdicts) if v >= 0]
        start += len(texts)
    return seconds, found, truth


def run_datasketch(args):
    from datasketch import MinHash, MinHashLSH

    from reactor_core.data.dedup import lsh_params, permutations

    a, b = permutations(args.num_perm, 1)
    perms = (a, b)
    lsh = MinHashLSH(threshold=args.threshold, num_perm=args.num_perm, params=lsh_params(args.threshold, args.num_perm, 0.5))
    seconds, found, start, truth = 0.0, [], 0, {}
    for texts, planted in corpus(args.records):
        truth.update(planted)
        t0 = time.perf_counter()
        for k, text in enumerate(texts):
            w = WORD.findall(text.lower())
            shingles = [" ".join(w[s:s + 3]).encode() for s in range(max(len(w) - 2, 1))]
            m = MinHash(num_perm=args.num_perm, seed=1, permutations=perms, scheme="legacy")
            m.update_batch(shingles)
            hits = lsh.query(m)
            if hits:
                copy_of = planted.get(start + k)
                found.append((start + k, copy_of[0] if copy_of and copy_of[0] in hits else min(hits)))
            else:
                lsh.insert(start + k, m, check_duplication=False)
        seconds += time.perf_counter() - t0
        start += len(texts)
    return seconds, found, truth


def score(found: list[tuple[int, int]], truth: dict[int, tuple[int, float]], args) -> dict:
    """Precision and recall of found pairs against the planted truth."""
    positives = {i for i, (_, j) in truth.items() if j >= args.threshold}
    correct = sum(1 for i, o in found if i in truth and truth[i][0] == o and truth[i][1] >= args.threshold)
    near_miss = sum(1 for i, o in found if i in truth and truth[i][0] == o and truth[i][1] < args.threshold)
    return {"found_pairs": len(found), "true_pairs": len(positives), "correct": correct,
            "below_threshold_copies_found": near_miss,
            "precision": correct / len(found) if found else 1.0,
            "recall": correct / len(positives) if positives else 1.0,
            "planted": len(truth)}


def child(args) -> None:
    if args.method == "datasketch":
        seconds, found, truth = run_datasketch(args)
    else:
        seconds, found, truth = run_reactor("native" if args.method == "mlforge" else "python", args)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # KiB -> GiB (Linux)
    result = {"method": args.method, "records": args.records, "seconds": seconds,
              "records_per_s": args.records / seconds, "peak_rss_gb": peak} | score(found, truth, args)
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--datasketch-records", type=int, default=None,
                        help="Run datasketch on fewer records (said in the table); default: --records.")
    parser.add_argument("--threshold", type=float, default=0.8)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--methods", default="mlforge,python,datasketch",
                        help="mlforge-threads: MinHash on every core (the others use one)")
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.method:
        return child(args)

    from rich.console import Console
    from rich.table import Table

    from reactor_core.data.dedup import lsh_params
    try:
        from jarvis_prime.hardware import cpu_name
        cpu = cpu_name()
    except ImportError:
        cpu = platform.processor() or platform.machine()
    console = Console(width=170)
    results = {}
    for method in args.methods.split(","):
        records = args.datasketch_records if method == "datasketch" and args.datasketch_records else args.records
        console.print(f"[bold]{method}[/]: {records:,} records ...")
        command = [sys.executable, __file__, "--method", method.removesuffix("-threads"), "--records", str(records),
                   "--threshold", str(args.threshold), "--num-perm", str(args.num_perm),
                   "--threads", "0" if method.endswith("-threads") else "1"]
        out = subprocess.run(command, capture_output=True, text=True, env=os.environ)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{method} failed:\n{out.stdout}\n{out.stderr}")
        results[method] = json.loads(line.removeprefix("RESULT ")) | {"threads": os.cpu_count() if method.endswith(
            "-threads") else 1}
        console.print(results[method])
    bands, rows = lsh_params(args.threshold, args.num_perm)
    ds_bands, ds_rows = lsh_params(args.threshold, args.num_perm, 0.5)
    table = Table(title=f"near-duplicate removal: word 3-grams, {args.num_perm} permutations, threshold "
                        f"{args.threshold} (bands x rows: Reactor Core {bands} x {rows}, datasketch {ds_bands} x "
                        f"{ds_rows}), {cpu}")
    for column in ("method", "records", "records/s", "vs datasketch", "peak RSS GiB", "precision", "recall",
                   "found / true pairs"):
        table.add_column(column, justify="left" if column == "method" else "right")
    base = results.get("datasketch", {}).get("records_per_s")
    for method, r in results.items():
        note = " (subsampled)" if method == "datasketch" and r["records"] != args.records else ""
        note += f" ({r['threads']} threads)" if r["threads"] > 1 else ""
        table.add_row(method + note, f"{r['records']:,}", f"{r['records_per_s']:,.0f}",
                      f"{r['records_per_s'] / base:.1f}x" if base else "-", f"{r['peak_rss_gb']:.2f}",
                      f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['found_pairs']:,} / {r['true_pairs']:,}")
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "processor": cpu, "cpus": os.cpu_count()},
        "settings": {"records": args.records, "threshold": args.threshold, "num_perm": args.num_perm,
                     "bands_rows": {"reactor_core": [bands, rows], "datasketch": [ds_bands, ds_rows]}, "shingles": "word 3-grams", "planted_share": PLANTED_SHARE},
        "results": results,
        "speedup_vs_datasketch": {m: r["records_per_s"] / base for m, r in results.items()} if base else None,
    }, indent=1) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
