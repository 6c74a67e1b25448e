"""reactor_core.data with images (#20): multimodal chat lines, read and checked at validation.

Every image here is a real file PIL writes in the test (PNG, JPEG, a transparent PNG),
and every bad one is crafted for real: a truncated JPEG, a PNG with a broken checksum,
a PNG whose header claims 10^10 pixels, a symlink pointing out of the data folder.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from reactor_core.data import (
    DataFormatError,
    DataValidationError,
    ImageError,
    ImageLimits,
    load_chat_file,
    parse_record,
    tokenize_dataset,
)


def png(size: tuple[int, int] = (8, 6), color: tuple[int, ...] = (200, 30, 40), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg(size: tuple[int, int] = (64, 48)) -> bytes:
    """A JPEG with real entropy-coded data (noise), so cutting it loses pixels."""
    buffer = io.BytesIO()
    Image.effect_noise(size, 64).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose IHDR (checksum fixed up) claims width x height pixels."""
    data = bytearray(png())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def user(*parts: dict) -> dict:
    return {"role": "user", "content": list(parts)}


def image(path: str) -> dict:
    return {"type": "image", "path": path}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def reply(value: str = "A red square.") -> dict:
    return {"role": "assistant", "content": value}


def line(*messages: dict) -> str:
    return json.dumps({"messages": list(messages)})


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A dataset folder with good images under images/, and a secret beside it."""
    folder = tmp_path / "data"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "red.png").write_bytes(png())
    (folder / "images" / "noise.jpg").write_bytes(jpeg())
    (tmp_path / "secret.png").write_bytes(png(color=(1, 2, 3)))
    return folder


def test_path_base64_and_data_url_images_are_read_counted_and_loaded_in_order(data_dir):
    blue = png((5, 7), (10, 20, 250))
    b64 = base64.b64encode(blue).decode()
    path = write_lines(data_dir / "train.jsonl", [
        line(user(text("What colour is this?"), image("images/red.png")), reply("Red.")),
        line({"role": "system", "content": "Be brief."},
             user(image("images/noise.jpg"), text("and this?"), {"type": "image", "base64": b64}),
             reply("Noise, then blue.")),
        line(user({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}}), reply("Blue.")),
        line(user(text("No picture here.")), reply("Fine.")),
    ])
    examples, report = load_chat_file(path)

    assert [len(e.images) for e in examples] == [1, 2, 1, 0]
    assert (report.examples, report.images) == (4, 4)
    assert report.summary() == f"{path}: 4 examples with 4 images from 4 lines"
    red, noise, blue_part = examples[0].images[0], *examples[1].images
    assert (red.width, red.height, red.format, red.data) == (8, 6, "PNG", None)
    assert red.path == str((data_dir / "images" / "red.png").resolve())
    assert (noise.format, blue_part.format, blue_part.data) == ("JPEG", "PNG", blue)
    assert examples[2].images[0].sha256 == blue_part.sha256  # same bytes, base64 or data URL

    messages, images = examples[1].processor_inputs()
    assert messages == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and this?"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Noise, then blue."}]},
    ]
    assert [(i.mode, i.size) for i in images] == [("RGB", (64, 48)), ("RGB", (5, 7))]
    assert images[1].getpixel((0, 0)) == (10, 20, 250)
    _, [red_image] = examples[0].processor_inputs()
    assert red_image.getpixel((7, 5)) == (200, 30, 40)


def test_a_part_list_without_images_is_plain_text(data_dir):
    path = write_lines(data_dir / "train.jsonl", [
        line(user(text("Hello, "), text("world.")), {"role": "assistant", "content": [text("Hi.")]}),
    ])
    [example], report = load_chat_file(path)
    assert example.to_dicts() == [{"role": "user", "content": "Hello, world."},
                                  {"role": "assistant", "content": "Hi."}]
    assert (report.images, example.images) == (0, ())


def test_a_transparent_png_is_laid_on_white_like_the_hf_processors_do(data_dir):
    clear = png((4, 4), (0, 0, 0, 0), mode="RGBA")  # transparent black
    (data_dir / "images" / "clear.png").write_bytes(clear)
    path = write_lines(data_dir / "train.jsonl", [line(user(image("images/clear.png")), reply())])
    [example], _ = load_chat_file(path)
    _, [rgb] = example.processor_inputs()
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255)


def test_an_image_changed_after_validation_is_refused_when_loaded(data_dir):
    path = write_lines(data_dir / "train.jsonl", [line(user(image("images/red.png")), reply())])
    [example], _ = load_chat_file(path)
    (data_dir / "images" / "red.png").write_bytes(png(color=(0, 255, 0)))
    with pytest.raises(ImageError, match=f"^{path}:1: .*red.png: the image changed since the data was validated"):
        example.processor_inputs()
    (data_dir / "images" / "red.png").unlink()
    with pytest.raises(ImageError, match=f"^{path}:1: .*red.png: cannot read the image: No such file"):
        example.processor_inputs()


def test_the_same_image_line_twice_is_a_duplicate(data_dir):
    good = line(user(text("Colour?"), image("images/red.png")), reply("Red."))
    examples, report = load_chat_file(write_lines(data_dir / "train.jsonl", [good, good]))
    assert (len(examples), report.duplicates, report.images) == (1, 1, 1)


def test_an_image_part_outside_a_data_file_is_refused():
    """parse_record alone has no folder a path could be relative to."""
    with pytest.raises(DataFormatError, match=r"messages\[0\].content\[0\]: image parts are read only"):
        parse_record({"messages": [user(image("x.png")), reply()]})


def bad_lines(data_dir: Path) -> list[tuple[str, str | None, str]]:
    """(JSONL line, expected issue kind or None for a good line, expected reason start)."""
    images = data_dir / "images"
    (images / "fake.png").write_text("this is not a PNG\n")
    (images / "cut.jpg").write_bytes(jpeg()[:600])
    broken = bytearray(png((16, 16)))
    broken[-20] ^= 0xFF  # inside IDAT: the chunk's CRC no longer matches
    (images / "crc.png").write_bytes(bytes(broken))
    (images / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    (images / "big.png").write_bytes(png((2000, 1000)))  # 2 M pixels, a few KB
    (images / "out.png").symlink_to(data_dir.parent / "secret.png")
    red = image("images/red.png")
    c = "messages[0].content"
    return [
        (line(user(text("Colour?"), red), reply()), None, ""),
        (line(user(image("images/missing.png")), reply()), "missing_image",
         f"{c}[0].path: image file 'images/missing.png' not found in {data_dir}"),
        (line(user(image("images")), reply()), "missing_image", f"{c}[0].path: 'images' is not a file"),
        (line(user(image("/etc/passwd")), reply()), "unsafe_image_path", f"{c}[0].path: '/etc/passwd' is absolute"),
        (line(user(image("../secret.png")), reply()), "unsafe_image_path",
         f"{c}[0].path: '../secret.png' climbs out with '..'"),
        (line(user(image("images/out.png")), reply()), "unsafe_image_path",
         f"{c}[0].path: 'images/out.png' resolves outside the data file's folder"),
        (line(user({"type": "image", "base64": "bm90IGFuIGltYWdl!!"}), reply()), "bad_image",
         f"{c}[0].base64: not valid base64"),
        (line(user({"type": "image", "base64": base64.b64encode(b"plain text").decode()}), reply()),
         "bad_image", f"{c}[0].base64: not an image PIL can read"),
        (line(user(image("images/fake.png")), reply()), "bad_image", f"{c}[0].path: not an image PIL can read"),
        (line(user(image("images/cut.jpg")), reply()), "bad_image", f"{c}[0].path: corrupt or truncated image"),
        (line(user(image("images/crc.png")), reply()), "bad_image", f"{c}[0].path: corrupt or truncated image"),
        (line(user(image("images/bomb.png")), reply()), "image_too_large",
         f"{c}[0].path: too many pixels, a possible decompression bomb (Image size (10000000000 pixels)"),
        (line(user(image("images/big.png")), reply()), "image_too_large",
         f"{c}[0].path: the image is 2000 x 1000 = 2,000,000 pixels, over max_image_pixels 1,000,000"),
        (line(user({"type": "image", "base64": base64.b64encode(b"x" * 60_000).decode()}), reply()),
         "image_too_large", f"{c}[0].base64: the image is 60,000 bytes, over max_image_bytes 50,000"),
        (line(user({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}), reply()),
         "remote_image", f"{c}[0].image_url.url: only data: URLs are read"),
        (line(user(text("hi")), {"role": "assistant", "content": [red]}), "misplaced_image",
         "messages[1].content[0]: an image part in the assistant turn"),
        (line({"role": "system", "content": [red]}, user(text("hi")), reply()), "misplaced_image",
         f"{c}[0]: an image part in the system turn"),
        (line(user(red, text("a")), reply(), user(red, red), reply()), "too_many_images",
         "messages[2].content[1]: image 3 of the example, over max_images_per_example 2"),
        (line(user({"type": "video", "path": "v.mp4"}), reply()), "bad_content_part",
         f"{c}[0]: unknown part type 'video'"),
        (line(user({"type": "image", "path": "images/red.png", "base64": "AAAA"}), reply()), "bad_image",
         f"{c}[0]: an image part needs exactly one of 'path' or 'base64'"),
        (line(user(text("Colour?"), red, red), reply("Red, twice.")), None, ""),
    ]


LIMITS = ImageLimits(max_images_per_example=2, max_bytes=50_000, max_pixels=1_000_000)


def test_every_bad_image_is_an_issue_at_its_line_naming_the_field(data_dir):
    cases = bad_lines(data_dir)
    path = write_lines(data_dir / "train.jsonl", [case[0] for case in cases])
    with pytest.raises(DataValidationError) as err:
        load_chat_file(path, image_limits=LIMITS)
    expected = [(n, kind, reason) for n, (_, kind, reason) in enumerate(cases, start=1) if kind]
    assert [(i.line, i.kind) for i in err.value.issues] == [(n, kind) for n, kind, _ in expected]
    for issue, (n, _, reason) in zip(err.value.issues, expected):
        assert str(issue).startswith(f"{path}:{n}: {reason}"), str(issue)


def test_skip_keeps_the_good_image_lines_and_counts_the_rest(data_dir):
    cases = bad_lines(data_dir)
    path = write_lines(data_dir / "train.jsonl", [case[0] for case in cases])
    examples, report = load_chat_file(path, on_bad_example="skip", image_limits=LIMITS)
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:{len(cases)}"]
    assert (report.examples, report.images, report.skipped) == (2, 3, len(cases) - 2)
    assert report.counts == {"bad_content_part": 1, "bad_image": 6, "image_too_large": 3, "misplaced_image": 2,
                             "missing_image": 2, "remote_image": 1, "too_many_images": 1, "unsafe_image_path": 3}
    assert report.summary().startswith(f"{path}: 2 examples with 3 images from {len(cases)} lines; 19 bad lines")


def test_the_default_limits_keep_pils_decompression_bomb_guard(data_dir):
    (data_dir / "images" / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    path = write_lines(data_dir / "train.jsonl", [line(user(image("images/bomb.png")), reply())])
    with pytest.raises(DataValidationError) as err:
        load_chat_file(path)
    assert [i.kind for i in err.value.issues] == ["image_too_large"]
    assert ImageLimits().max_pixels == Image.MAX_IMAGE_PIXELS


def test_text_tokenization_reports_image_examples_instead_of_rendering_them(data_dir, tokenizer):
    """A text tokenizer's template would print the parts' repr into the prompt."""
    path = write_lines(data_dir / "train.jsonl", [
        line(user(text("Colour?"), image("images/red.png")), reply("Red.")),
        line(user(text("Hello")), reply("Hi.")),
    ])
    examples, _ = load_chat_file(path)
    with pytest.raises(DataValidationError, match=rf"{path}:1: 1 image\(s\): text-only training cannot use them"):
        tokenize_dataset(examples, tokenizer, max_seq_length=256)
    kept, issues = tokenize_dataset(examples, tokenizer, max_seq_length=256, on_bad_example="skip")
    assert [e.source for e in kept] == [f"{path}:2"]
    assert [(i.line, i.kind) for i in issues] == [(1, "has_images")]
    with pytest.raises(ValueError, match="use processor_inputs"):
        examples[0].to_dicts()


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match="`max_images_per_example` must be positive, got 0"):
        ImageLimits(max_images_per_example=0)


# SmolVLM's (Idefics3's) own chat template: it reads every content as a list of parts.
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def test_processor_inputs_feed_an_idefics3_processor(data_dir, tokenizer, tmp_path):
    """What the vision recipe will do next: the messages render through SmolVLM's template
    (system and reply strings included) and the processor expands each image placeholder."""
    from transformers import AutoTokenizer, Idefics3ImageProcessorPil, Idefics3Processor

    tokenizer.save_pretrained(tmp_path / "tok")  # a copy: the session's tokenizer stays as it is
    vlm_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    vlm_tokenizer.add_special_tokens({"additional_special_tokens": [
        "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]})
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(size={"longest_edge": 128}, max_image_size={"longest_edge": 64}),
        tokenizer=vlm_tokenizer, chat_template=SMOLVLM_TEMPLATE, image_seq_len=4)
    (data_dir / "images" / "wide.png").write_bytes(png((80, 40), (255, 0, 0)))
    path = write_lines(data_dir / "train.jsonl", [
        line({"role": "system", "content": "Be brief."}, user(image("images/wide.png"), text("Colour?")), reply("Red."))])
    [example], _ = load_chat_file(path)

    messages, images = example.processor_inputs()
    rendered = processor.apply_chat_template(messages, tokenize=False)
    assert rendered == ("<|im_start|>System: Be brief.<end_of_utterance>\nUser:<image>Colour?<end_of_utterance>\n"
                        "Assistant: Red.<end_of_utterance>\n")
    batch = processor(text=rendered, images=[images], return_tensors="pt")
    # 80 x 40 -> 128 x 64 -> two 64 x 64 tiles plus the global view, 4 tokens each
    assert tuple(batch["pixel_values"].shape) == (1, 3, 3, 64, 64)
    assert int((batch["input_ids"] == vlm_tokenizer.convert_tokens_to_ids("<image>")).sum()) == 12
    assert batch["pixel_values"][0, 2, :, 32, 32].tolist() == [1.0, -1.0, -1.0]  # red, normalized
