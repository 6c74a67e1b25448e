"""`jarvis improve`: the flywheel. Feedback -> candidate -> gate -> new version.

Four stages, each recorded in `<run>/state.json` when it finishes, so a run that is
interrupted (Ctrl-C, a reboot) continues where it stopped when the command is run
again; training itself resumes from Reactor Core's checkpoints.

1. export    the feedback as SFT and DPO data (`jarvis.feedback`), personal data
             scrubbed unless `scrub_pii=False`; a seeded share of it is held out for
             the gate and never trained on.
2. train     `prime train MODEL --sft ... --dpo ...` in a child process (Reactor Core
             SFT, then DPO, from the current model's weights): the candidate.
3. evaluate  current and candidate on the same q8_0 GGUF path: the JARVIS suite (as
             JARVIS runs them, without a system prompt) and the held-out feedback
             (reply NLL, pair accuracy).
4. promote   only if the candidate is better: lower held-out reply NLL and/or higher
             pair accuracy, neither worse, and no lower JARVIS-suite score. It enters
             the model store as the next version of the same name, which every
             `jarvis chat` picks from then on; with `prime_url`, a running `prime
             serve` is hot-swapped to it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from jarvis.feedback import ExportReport, collect, write_jsonl
from jarvis.memory import ConversationStore, jarvis_home
from jarvis_prime import PrimeError
from jarvis_prime.evaluation import feedback_scores, load_variant, record, run_jarvis_suite
from jarvis_prime.export import export_gguf
from jarvis_prime.files import atomic_write
from jarvis_prime.progress import Log
from jarvis_prime.store import import_path, resolve
STAGES = ("export", "train", "evaluate", "promote")


@dataclass
class ImproveConfig:
    model: str
    work_dir: Path | None = None  # default $JARVIS_HOME/improve
    holdout_fraction: float = 0.2
    max_steps: int | None = None  # per training stage; quick runs and tests cap it
    scrub_pii: bool = True  # e-mails, phone/card numbers, IPs, tokens -> placeholders before training
    prime_url: str | None = None  # a `prime serve` to hot-swap, e.g. http://127.0.0.1:8001
    prime_admin_key: str | None = None  # its --admin-key (swaps take the admin key, not the API key)
    jarvis_url: str | None = None  # a `jarvis serve` to switch, e.g. http://127.0.0.1:8000
    jarvis_admin_key: str | None = None  # its --admin-key
    fresh: bool = False  # start a new run even if one is unfinished

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"`holdout_fraction` must be in (0, 1), got {self.holdout_fraction}")


def _run_dir(config: ImproveConfig) -> Path:
    """The newest unfinished run for this model, or a new one."""
    root = Path(config.work_dir or jarvis_home() / "improve")
    root.mkdir(parents=True, exist_ok=True)
    runs = sorted(p for p in root.iterdir() if (p / "state.json").is_file())
    if runs and not config.fresh:
        state = _load_state(runs[-1])
        if state["model"] == config.model and "promote" not in state["done"]:
            return runs[-1]
    stamp, copy = time.strftime("run-%Y%m%d-%H%M%S"), 1
    run = root / stamp
    while run.exists():  # runs started in the same second (--fresh): run-...-02, -03, sorted after the first
        copy += 1
        run = root / f"{stamp}-{copy:02d}"
    run.mkdir()
    _save_state(run, {"model": config.model, "done": {}})
    return run


def _save_state(run: Path, state: dict[str, Any]) -> None:
    """Atomic and fsynced (`atomic_write`): after a crash or a power loss state.json is
    the previous state or this one, never empty or half written."""
    atomic_write(run / "state.json", json.dumps(state, indent=1))


def _load_state(run: Path) -> dict[str, Any]:
    """The run's state; an empty or damaged state.json (what a power loss left before it
    was fsynced, or a hand edit) is an error naming it. Guessing which stages finished
    could train or promote twice; the run's files stay, and `--fresh` starts a new run
    from all the feedback, which stays in the conversation store."""
    path = run / "state.json"
    try:
        text = path.read_text(encoding="utf-8")
        state = json.loads(text) if text.strip() else None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        problem = f"is not valid JSON ({err})"
    else:
        if (isinstance(state, dict) and isinstance(state.get("model"), str) and isinstance(state.get("done"), dict)
                and set(state["done"]) <= set(STAGES)):
            return state
        problem = "is empty" if state is None else 'is not an improve state ({"model": ..., "done": {stage: ...}})'
    raise PrimeError(f"{path} {problem}, so which stages of that run finished is unknown. Its files stay in {run}; "
                     "`jarvis improve --fresh` starts a new run from all your feedback")


def improve(config: ImproveConfig, store: ConversationStore | None = None, log: Log = print) -> dict[str, Any]:
    """Run (or resume) one flywheel turn; returns the state with every stage's result."""
    run = _run_dir(config)
    state = _load_state(run)
    log(f"run {run}")
    steps: dict[str, Callable[[], dict[str, Any]]] = {
        "export": lambda: _export(config, run, store),
        "train": lambda: _train(config, run, log),
        "evaluate": lambda: _evaluate(config, run, state["done"]["train"], log),
        "promote": lambda: _promote(config, state["done"]["train"], state["done"]["evaluate"], log),
    }
    for number, stage in enumerate(STAGES, start=1):
        if stage in state["done"]:
            log(f"{number}/4 {stage}: done earlier")
            continue
        log(f"{number}/4 {stage}")
        state["done"][stage] = steps[stage]()
        _save_state(run, state)
    state["run"] = str(run)
    return state


# -- 1. export -------------------------------------------------------------------------------


def _export(config: ImproveConfig, run: Path, store: ConversationStore | None) -> dict[str, Any]:
    own = store is None
    store = store or ConversationStore()
    report = ExportReport()
    try:
        # the model improved here is a text chat model: feedback on image turns stays for `export-data`
        records = collect(store, scrub=config.scrub_pii, report=report, images=False)
    finally:
        if own:
            store.close()
    held_keys = holdout_keys(sorted({r.key for r in records}), config.holdout_fraction,
                             must_cover=[{r.key for r in records if r.kind == kind} for kind in ("sft", "dpo")])
    counts = {}
    for kind in ("sft", "dpo"):
        mine = [r for r in records if r.kind == kind]
        write_jsonl(run / f"train-{kind}.jsonl", [r.data for r in mine if r.key not in held_keys])
        write_jsonl(run / f"heldout-{kind}.jsonl", [r.data for r in mine if r.key in held_keys])
        counts[kind] = {"train": sum(r.key not in held_keys for r in mine), "heldout": sum(r.key in held_keys for r in mine)}
    if not (counts["sft"]["heldout"] or counts["dpo"]["heldout"]) or not (counts["sft"]["train"] or counts["dpo"]["train"]):
        raise PrimeError(f"not enough feedback to train and judge a candidate ({report.sft} SFT examples, "
                         f"{report.dpo} DPO pairs): rate, correct or regenerate more replies, then run again")
    return {"private_skipped": report.private_skipped, "unusable": report.unusable,
            "image_records_skipped": report.image_records_skipped, "tool_pairs_skipped": report.tool_pairs_skipped,
            "pii_scrubbed": config.scrub_pii,
            **counts}


def _unit(key: str) -> float:
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) / 2**256


def holdout_keys(keys: list[str], fraction: float, must_cover: list[set[str]] = ()) -> set[str]:
    """The replies held out to judge candidates: a fixed hash threshold on each reply's
    key, so a reply stays on its side as feedback grows, and every record one reply
    yields (its SFT example and its DPO pair) is on the same side.

    Each set in `must_cover` (the keys with SFT data, the keys with DPO data) gets at
    least one held-out key when it has two or more, and keeps at least one for training.
    """
    held = {k for k in keys if _unit(k) < fraction}
    for group in [set(keys), *must_cover]:
        if len(group) >= 2 and not held & group:
            held.add(min(group, key=_unit))
    for group in [set(keys), *must_cover]:
        if len(group) >= 2 and group <= held:
            held.discard(max(group, key=_unit))
    return held


# -- 2. train --------------------------------------------------------------------------------


def _train(config: ImproveConfig, run: Path, log: Log) -> dict[str, Any]:
    """`prime train` in a child process: its memory (torch, the model) is gone when it ends."""
    command = [sys.executable, "-m", "jarvis_prime.cli", "train", config.model, "--work-dir", str(run / "train")]
    for kind in ("sft", "dpo"):
        path = run / f"train-{kind}.jsonl"
        if path.stat().st_size:
            command += [f"--{kind}", str(path)]
    if config.max_steps:
        command += ["--max-steps", str(config.max_steps)]
    log("  " + " ".join(command[1:]))
    if subprocess.run(command).returncode != 0:
        raise PrimeError("training the candidate failed (see above); run `jarvis improve` again to resume")
    return json.loads((run / "train" / "candidate.json").read_text())


# -- 3. evaluate -----------------------------------------------------------------------------


def _evaluate(config: ImproveConfig, run: Path, candidate: dict[str, Any], log: Log) -> dict[str, Any]:
    held = {kind: [json.loads(line) for line in (run / f"heldout-{kind}.jsonl").read_text().splitlines() if line.strip()]
            for kind in ("sft", "dpo")}
    results = {}
    for label, path in (("current", candidate["from"]), ("candidate", candidate["model_dir"])):
        local = resolve(path)
        model = load_variant(local.path, "q8_0")
        try:
            log(f"  {label}: {local.manifest.name} {local.manifest.version}")
            suite = run_jarvis_suite(model, system_prompt=None)
            results[label] = {"suite": suite["score"], **feedback_scores(model, held["sft"], held["dpo"])}
        finally:
            model.close()
    results["promote"], results["reasons"] = gate(results["current"], results["candidate"])
    log(gate_table(results))
    return results


def gate(current: dict[str, float], candidate: dict[str, float]) -> tuple[bool, list[str]]:
    """(promote?, why): better on held-out feedback, worse on nothing."""
    reasons, better, worse = [], False, False
    if "reply_nll" in current:
        d = candidate["reply_nll"] - current["reply_nll"]
        better, worse = better or d < 0, worse or d > 0
        reasons.append(f"held-out reply NLL {current['reply_nll']:.3f} -> {candidate['reply_nll']:.3f}")
    if "pair_accuracy" in current:
        d = candidate["pair_accuracy"] - current["pair_accuracy"]
        better, worse = better or d > 0, worse or d < 0
        reasons.append(f"held-out pair accuracy {current['pair_accuracy']:.0%} -> {candidate['pair_accuracy']:.0%}")
    if candidate["suite"] < current["suite"]:
        worse = True
    reasons.append(f"JARVIS suite {current['suite']:.0%} -> {candidate['suite']:.0%}")
    return better and not worse, reasons


def gate_table(results: dict[str, Any]) -> str:
    rows = [("metric", "current", "candidate", "better is")]
    for key, label, direction in (("suite", "JARVIS suite score", "higher"), ("reply_nll", "held-out reply NLL", "lower"),
                                  ("pair_accuracy", "held-out pair accuracy", "higher")):
        if key in results["current"]:
            rows.append((label, f"{results['current'][key]:.3f}", f"{results['candidate'][key]:.3f}", direction))
    width = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  " + "  ".join(cell.ljust(width[i]) for i, cell in enumerate(row)) for row in rows]
    verdict = "PROMOTE" if results["promote"] else "KEEP the current model"
    return "\n".join(lines + [f"  gate: {verdict} ({'; '.join(results['reasons'])})"])


# -- 4. promote ------------------------------------------------------------------------------


def _promote(config: ImproveConfig, candidate: dict[str, Any], evaluation: dict[str, Any], log: Log) -> dict[str, Any]:
    if not evaluation["promote"]:
        log(f"  kept {candidate['name']} {candidate['from_version']}")
        return {"promoted": False}
    current = resolve(candidate["from"])
    local = import_path(candidate["model_dir"], name=candidate["name"], version=candidate["version"], task="chat",
                        base=current.manifest.base, log=log, force=True)
    export_gguf(local.path, ["q8_0", "q4_k_m"], log=log)
    record(local.path, "improve", {"from_version": candidate["from_version"], **{k: evaluation[k] for k in ("current", "candidate")}})
    log(f"  promoted {candidate['name']} {candidate['version']}: JARVIS uses it from the next chat")
    swapped = {}
    if config.prime_url:
        swapped["prime"] = _hot_swap(config.prime_url.rstrip("/") + "/admin/models", config.prime_admin_key,
                                     candidate["name"], log)
    if config.jarvis_url:
        swapped["jarvis"] = _hot_swap(config.jarvis_url.rstrip("/") + "/api/model", config.jarvis_admin_key,
                                      candidate["name"], log)
    return {"promoted": True, "version": candidate["version"], "path": str(local.path), "hot_swapped": swapped}


def _hot_swap(url: str, admin_key: str | None, name: str, log: Log) -> bool:
    """Ask a running server (`prime serve` /admin/models, `jarvis serve` /api/model, each
    started with --admin-key) to switch to the promoted version; requests in flight
    finish on the old one."""
    headers = {"Content-Type": "application/json"}
    if admin_key:
        headers["Authorization"] = f"Bearer {admin_key}"
    request = urllib.request.Request(url, method="POST", headers=headers, data=json.dumps({"model": name}).encode())
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            answer = json.loads(response.read())
    except (urllib.error.URLError, OSError) as err:
        log(f"  could not switch {url}: {err}; restart it to serve the new version")
        return False
    log(f"  {url} now serves {answer['model']} {answer['version']}")
    return True
