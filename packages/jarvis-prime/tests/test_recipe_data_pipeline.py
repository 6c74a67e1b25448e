"""The reasoning and vision recipes' data through Reactor Core's data pipeline (issue #25):
each recipe's Reactor Core config carries its `data_pipeline` block, and on a small sample
of the recipe's own generated data the pipeline removes the true problems (a planted exact
copy, a planted evaluation item) and keeps everything templated data repeats by design
(wordings shared with the held-out split, the same question about another image)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from jarvis_prime.errors import PrimeError
from jarvis_prime.recipes import DATA_KINDS, data_pipeline, eval_data_paths

pytest.importorskip("reactor_core")  # the [training] extra

from reactor_core.data.pipeline import clean  # noqa: E402
from reactor_core.data.pipeline_config import PipelineConfig  # noqa: E402


def removed(report: str | None) -> dict[int, str]:
    """Line number in the training file -> why the pipeline removed it."""
    rows = [json.loads(line) for line in Path(report).read_text().splitlines()] if report else []
    return {int(r["source"].rsplit(":", 1)[1]): r["kind"] for r in rows}


def append(path: Path, *records: dict) -> list[int]:
    """Add records to a JSONL file; their line numbers."""
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + [json.dumps(r) for r in records]) + "\n")
    return list(range(len(lines) + 1, len(lines) + 1 + len(records)))


def test_each_kind_is_a_valid_reactor_core_pipeline_and_an_unknown_one_is_refused(tmp_path):
    for kind in DATA_KINDS:
        config = PipelineConfig.model_validate(data_pipeline(kind, tmp_path, ["held-out.json"]))
        assert config.decontaminate.paths == eval_data_paths(tmp_path) + ["held-out.json"]
        assert config.dedup.exact and not config.scrub_pii
    # templated data: no near-duplicate pass, and only a whole evaluation text is a leak
    for kind in ("reasoning", "vision"):
        config = PipelineConfig.model_validate(data_pipeline(kind, tmp_path))
        assert not config.dedup.near and config.decontaminate.ngram == 64
    assert data_pipeline("chat", tmp_path) == {"kind": "chat", "dedup": {"threshold": 0.95},
                                               "decontaminate": {"paths": eval_data_paths(tmp_path)}, "scrub_pii": False}
    with pytest.raises(PrimeError, match="no data pipeline for 'sql'; kinds: chat, preference, tool-chat, reasoning, vision"):
        data_pipeline("sql", tmp_path)


def test_the_reasoning_recipes_reactor_config_carries_its_pipeline(tmp_path):
    from jarvis_prime.recipes.reasoning_model import RECIPES, stage_config

    recipe = RECIPES["prime-135m-reasoning-v1"]
    scored = tmp_path / "scored-questions.json"
    config = stage_config(recipe, recipe.stages[0], tmp_path / "base", tmp_path / "train.jsonl", tmp_path / "out",
                          eval_files=[scored])
    assert config.data_pipeline == PipelineConfig.model_validate(data_pipeline("reasoning", tmp_path, [scored]))
    assert str(scored) in config.data_pipeline.decontaminate.paths


def test_the_vision_recipes_reactor_config_carries_its_pipeline(tmp_path):
    from jarvis_prime.recipes.vision_data import build_vision_dataset
    from jarvis_prime.recipes.vision_model import RECIPES, reactor_config

    data = tmp_path / "data"
    build_vision_dataset(data, train=2, heldout=2, log=lambda message: None)
    config = reactor_config(RECIPES["prime-135m-vision-v1"], "prime-135m-vision-v1", tmp_path / "assembled", data,
                            tmp_path / "out")
    items = data / "heldout-items.json"
    assert config.data_pipeline == PipelineConfig.model_validate(data_pipeline("vision", data, [items]))
    assert len(json.loads(items.read_text())) == 2


def test_the_pipeline_removes_a_repeat_and_a_held_out_problem_from_reasoning_data(tmp_path):
    from jarvis_prime.recipes.reasoning_data import build_reasoning_dataset, load_problems
    from jarvis_prime.recipes.reasoning_model import write_scored_questions

    build_reasoning_dataset(tmp_path, train=150, heldout=20, log=lambda message: None)
    train = tmp_path / "train.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    heldout = [json.loads(line) for line in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    first_seen: dict[str, int] = {}
    repeats = set()  # the generator draws the same problem twice now and then (12 in 3000)
    for number, row in enumerate(rows, 1):
        key = json.dumps(row["messages"])
        repeats.update([number] if key in first_seen else [])
        first_seen.setdefault(key, number)
    # a held-out question told with other numbers: its wording, not its problem
    question = heldout[0]["messages"][0]["content"]
    numbers = [w for w in question.split() if w.isdigit()]
    assert numbers, question
    reworded = {**heldout[0], "messages": [{"role": "user", "content": question.replace(numbers[0], "9999", 1)},
                                           heldout[0]["messages"][1]]}
    copy, leaked, kept_wording = append(train, rows[3], heldout[0], reworded)
    scored = write_scored_questions(tmp_path / "scored-questions.json", load_problems(tmp_path / "heldout.jsonl"))

    summary = clean([train], tmp_path / "clean.jsonl", PipelineConfig.model_validate(data_pipeline("reasoning", tmp_path, [scored])))
    gone = removed(summary.report)
    assert gone == {copy: "exact_duplicate", leaked: "contaminated"} | {n: "exact_duplicate" for n in repeats}
    assert kept_wording not in gone and summary.kept == len(rows) + 3 - len(gone)


def test_the_pipeline_removes_a_repeat_and_a_held_out_item_from_vision_data_by_image(tmp_path):
    from jarvis_prime.recipes.vision_data import build_vision_dataset, write_eval_items

    build_vision_dataset(tmp_path, train=10, heldout=3, log=lambda message: None)
    train = tmp_path / "train.jsonl"
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    held = json.loads((tmp_path / "heldout.jsonl").read_text().splitlines()[0])

    def with_image(record: dict, image: str) -> dict:
        (_, text), reply = record["messages"][0]["content"], record["messages"][1]
        return {**record, "messages": [{"role": "user", "content": [{"type": "image", "path": image}, text]}, reply]}

    # the same picture drawn again under another name is the same image: keyed by its bytes
    shutil.copyfile(tmp_path / rows[2]["messages"][0]["content"][0]["path"], tmp_path / "images" / "again.png")
    other_image = rows[5]["messages"][0]["content"][0]["path"]
    copy, redrawn, leaked, same_question, held_question = append(
        train, rows[1], with_image(rows[2], "images/again.png"), held,
        with_image(rows[1], other_image),  # rows[1]'s question about another image
        with_image(held, other_image))  # the held-out question about a training image
    summary = clean([train], tmp_path / "clean.jsonl",
                    PipelineConfig.model_validate(data_pipeline("vision", tmp_path, [write_eval_items(tmp_path)])))
    assert removed(summary.report) == {copy: "exact_duplicate", redrawn: "exact_duplicate", leaked: "contaminated"}
    assert summary.kept == len(rows) + 2  # same_question and held_question stay
    assert {same_question, held_question}.isdisjoint(removed(summary.report))
