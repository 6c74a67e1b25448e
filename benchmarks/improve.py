"""`jarvis improve` at the issue's scale: a few hundred feedback turns, timed per stage.

    python benchmarks/improve.py [--turns 300] [--model prime-135m-chat-v1]

Seeds a private JARVIS home with `--turns` conversations on jarvis-prime's JARVIS
prompts, replies written by the current model itself, and feedback in a plausible mix:
60 % thumbs-up, 25 % corrected (the reply prefixed with the butler's "Certainly, sir."),
15 % regenerated at temperature 0.8 with the new reply preferred. Then runs `jarvis
improve` in a private model store (symlinks to yours: nothing is promoted into your
store) and reports each stage's wall time against the issue's target (<= 20 min for
the whole command), and the gate's numbers. Writes benchmarks/results/improve.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.progress import track
from rich.table import Table

from jarvis.memory import ConversationStore
from jarvis_prime import PrimeModel
from jarvis_prime.store import models_root, resolve

RESULTS = Path(__file__).parent / "results" / "improve.json"
TARGET_S = 20 * 60


def seed(home: Path, model: PrimeModel, turns: int) -> dict[str, int]:
    prompts = json.loads(resources.files("jarvis_prime").joinpath("recipes/data/jarvis_prompts.json").read_text())["prompts"]
    store = ConversationStore(home / "jarvis.db")
    counts = {"thumbs_up": 0, "corrected": 0, "regenerated": 0}
    label = f"{model.name}@{model.version}"
    for i in track(range(turns), description="seeding feedback"):
        question = prompts[i % len(prompts)]["prompt"] + ("" if i < len(prompts) else " Please keep it short.")
        messages = [{"role": "user", "content": question}]
        reply = model.chat(messages, max_new_tokens=48, temperature=0.0).strip() or "I am not sure."
        cid = store.create()
        store.add(cid, "user", question)
        mid = store.add(cid, "assistant", reply, model=label)
        kind = i % 20
        if kind < 12:
            store.rate(mid, 1)
            counts["thumbs_up"] += 1
        elif kind < 17:
            store.rate(mid, -1)
            store.correct(mid, f"Certainly, sir. {reply}")
            counts["corrected"] += 1
        else:
            again = model.chat(messages, max_new_tokens=48, temperature=0.8, seed=i).strip()
            if again and again != reply:
                store.rate(store.add_alternative(mid, again, model=label), 1)
                counts["regenerated"] += 1
    store.close()
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--model", default="prime-135m-chat-v1")
    args = parser.parse_args()
    console = Console()
    current = resolve(args.model)
    work = Path(tempfile.mkdtemp(prefix="jarvis-improve-bench-"))
    (work / "prime" / "models").mkdir(parents=True)
    for path in models_root().iterdir():
        if (path / "prime.json").is_file():
            (work / "prime" / "models" / path.name).symlink_to(path)
    (work / "jarvis").mkdir()
    with PrimeModel.from_pretrained(current.path, backend="llamacpp") as model:
        counts = seed(work / "jarvis", model, args.turns)

    env = {**os.environ, "JARVIS_PRIME_HOME": str(work / "prime"), "JARVIS_HOME": str(work / "jarvis"),
           "JARVIS_MODEL": args.model}
    stages: dict[str, float] = {}
    stage, mark, start = None, time.perf_counter(), time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "jarvis.cli", "improve"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    log = []
    for line in process.stdout:
        log.append(line)
        for number, name in enumerate(("export", "train", "evaluate", "promote"), start=1):
            if line.startswith(f"{number}/4 {name}"):
                if stage:
                    stages[stage] = time.perf_counter() - mark
                stage, mark = name, time.perf_counter()
                console.print(f"[dim]{name} ...[/]")
    process.wait()
    total = time.perf_counter() - start
    if stage:
        stages[stage] = time.perf_counter() - mark
    (work / "improve.log").write_text("".join(log))
    if process.returncode != 0:
        console.print("".join(log[-40:]))
        raise SystemExit(f"jarvis improve failed; log: {work / 'improve.log'}")
    state_path = next((work / "jarvis" / "improve").glob("*/state.json"))
    state = json.loads(state_path.read_text())

    table = Table(title=f"jarvis improve on {args.turns} feedback turns ({counts})")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for name, seconds in stages.items():
        table.add_row(name, f"{seconds:.0f}")
    table.add_row("total", f"{total:.0f} (target <= {TARGET_S})")
    console.print(table)
    evaluation = state["done"]["evaluate"]
    console.print(f"current   {evaluation['current']}\ncandidate {evaluation['candidate']}")
    console.print(f"gate: {'PROMOTE' if evaluation['promote'] else 'KEEP'} ({'; '.join(evaluation['reasons'])})")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"turns": args.turns, "feedback": counts, "stages_s": stages, "total_s": total,
                                   "target_s": TARGET_S, "export": state["done"]["export"],
                                   "evaluate": evaluation, "work_dir": str(work)}, indent=2))
    console.print(f"wrote {RESULTS} (work dir {work})")


if __name__ == "__main__":
    main()
