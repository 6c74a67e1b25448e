"""reactor_core.data: formats, validation, assistant-only labels, packing.

The packing tests run a real (tiny, random) Llama: a packed row must give every example
exactly the logits it gets alone, with both the sdpa and the eager attention kernels.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch

from reactor_core.data import (
    IGNORE_INDEX,
    ChatExample,
    ChatTemplateError,
    DataFormatError,
    DataIssue,
    DataValidationError,
    Message,
    TokenizedExample,
    collate_packed,
    collate_padded,
    load_chat_file,
    pack_examples,
    parse_record,
    split_examples,
    tokenize_chat,
    tokenize_dataset,
)
from reactor_core.files import sha256_file


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def write_jsonl(path: Path, lines: list[str | dict]) -> Path:
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def labelled_runs(example: TokenizedExample) -> list[list[int]]:
    """The maximal runs of consecutive labelled tokens, as token ids."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            assert label == token, "a label must be the token at its own position"
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


# --------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------


def test_chat_messages_are_read_as_is():
    record = chat(("system", "S"), ("user", "U"), ("assistant", "A"))
    assert parse_record(record) == (
        Message("system", "S"), Message("user", "U"), Message("assistant", "A"),
    )


def test_sharegpt_speakers_become_roles():
    record = {"conversations": [
        {"from": "system", "value": "S"},
        {"from": "human", "value": "U1"},
        {"from": "gpt", "value": "A1"},
        {"from": "human", "value": "U2"},
        {"from": "gpt", "value": "A2"},
    ]}
    assert parse_record(record) == (
        Message("system", "S"), Message("user", "U1"), Message("assistant", "A1"),
        Message("user", "U2"), Message("assistant", "A2"),
    )


def test_alpaca_with_and_without_input():
    assert parse_record({"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}) == (
        Message("user", "Translate.\n\nBonjour"), Message("assistant", "Hello"),
    )
    for record in (
        {"instruction": "Say hi.", "output": "Hi"},
        {"instruction": "Say hi.", "input": "", "output": "Hi"},
    ):
        assert parse_record(record) == (Message("user", "Say hi."), Message("assistant", "Hi"))


@pytest.mark.parametrize(
    ("record", "kind"),
    [
        ([1, 2], "bad_format"),
        ({"text": "hello"}, "bad_format"),
        ({"messages": [], "conversations": []}, "bad_format"),
        (chat(("tool", "x"), ("assistant", "A")), "bad_tool_call"),  # a result with no call before it
        ({"conversations": [{"from": "function", "value": "x"}]}, "unknown_role"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
         "non_string_content"),
        ({"messages": [{"role": "user", "content": []}, {"role": "assistant", "content": "A"}]},
         "bad_content_part"),
        ({"instruction": "I", "output": 7}, "non_string_content"),
        (chat(("user", "U"), ("assistant", "  \n")), "empty_assistant"),
        ({"instruction": "I", "output": ""}, "empty_assistant"),
        (chat(("system", "S"), ("user", "U")), "no_assistant"),
    ],
)
def test_bad_records_are_rejected_with_their_kind(record, kind):
    with pytest.raises(DataFormatError) as err:
        parse_record(record)
    assert err.value.kind == kind
    assert isinstance(err.value, ValueError)


# --------------------------------------------------------------------------------------
# Validation of a whole file
# --------------------------------------------------------------------------------------

GOOD_1 = chat(("user", "What is 2+2?"), ("assistant", "4"))
GOOD_2 = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
BAD_LINES = [
    json.dumps(GOOD_1),                                              # 1
    '{"messages": [{"role": "user", "content": "unterminated"}',     # 2 bad JSON
    "",                                                              # 3 blank
    json.dumps(chat(("tool", "{}"), ("assistant", "ok"))),           # 4 a tool result, no call
    json.dumps(chat(("user", "Q"), ("assistant", ""))),              # 5 empty assistant
    json.dumps(chat(("system", "S"), ("user", "Q"))),                # 6 no assistant
    json.dumps({"messages": [{"role": "user", "content": None},
                             {"role": "assistant", "content": "A"}]}),  # 7 non-string content
    json.dumps(GOOD_2),                                              # 8
    "   ",                                                           # 9 blank
    # 10: the same conversation as line 1, written as Alpaca: a duplicate after conversion
    json.dumps({"instruction": "What is 2+2?", "output": "4"}),
]
EXPECTED_ISSUES = {
    2: ("bad_json", "bad JSON: "),
    4: ("bad_tool_call", "messages[0]: a tool result with no assistant tool_calls before it"),
    5: ("empty_assistant", "messages[1]: empty assistant turn"),
    6: ("no_assistant", "no assistant turn"),
    7: ("non_string_content", "messages[0].content must be a string, got null"),
}


def test_every_bad_line_is_reported_as_file_line_reason(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", BAD_LINES)
    with pytest.raises(DataValidationError) as err:
        load_chat_file(path)
    error = err.value
    assert [(i.line, i.kind) for i in error.issues] == [
        (line, kind) for line, (kind, _) in EXPECTED_ISSUES.items()
    ]
    message = str(error)
    for line, (_, reason) in EXPECTED_ISSUES.items():
        assert f"{path}:{line}: {reason}" in message
    assert error.report.counts == {kind: 1 for kind, _ in EXPECTED_ISSUES.values()}
    assert message.splitlines()[0].startswith(f"5 problems in {path} (")


def test_skip_keeps_the_valid_examples_and_counts_the_rest(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", BAD_LINES)
    examples, report = load_chat_file(path, on_bad_example="skip")
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:8"]
    assert examples[0].messages == parse_record(GOOD_1)
    assert examples[1].messages == parse_record(GOOD_2)
    assert (report.lines, report.examples, report.skipped, report.duplicates) == (10, 2, 5, 1)
    assert report.counts == {kind: 1 for kind, _ in EXPECTED_ISSUES.values()}
    assert [i.line for i in report.issues] == list(EXPECTED_ISSUES)
    assert report.summary() == (
        f"{path}: 2 examples from 10 lines; 1 duplicates dropped; 5 bad lines skipped "
        "(bad_json: 1, bad_tool_call: 1, empty_assistant: 1, no_assistant: 1, "
        "non_string_content: 1)"
    )


def test_a_clean_file_with_blank_lines_and_duplicates(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ["", json.dumps(GOOD_1), "", json.dumps(GOOD_1),
                                                  json.dumps(GOOD_2), "", ""])
    examples, report = load_chat_file(path)
    assert [e.source for e in examples] == [f"{path}:2", f"{path}:5"]
    assert (report.examples, report.skipped, report.duplicates, report.issues) == (2, 0, 1, [])


def test_the_printed_list_is_capped_but_every_issue_is_kept(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [json.dumps(GOOD_1)] + ["not json"] * 25)
    with pytest.raises(DataValidationError) as err:
        load_chat_file(path)
    assert len(err.value.issues) == 25
    listed = [line for line in str(err.value).splitlines() if line.startswith(f"  {path}:")]
    assert len(listed) == 20
    assert listed[0] == f"  {path}:2: bad JSON: Expecting value at column 1"
    assert str(err.value).endswith("  ... and 5 more")


def test_a_file_with_nothing_usable_fails_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ["not json", ""])
    with pytest.raises(DataValidationError) as err:
        load_chat_file(path, on_bad_example="skip")
    assert [str(i) for i in err.value.issues] == [
        f"{path}:1: bad JSON: Expecting value at column 1",
        f"{path}:0: no usable examples in the file",
    ]


def test_invalid_utf8_is_one_issue_not_a_crash(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(json.dumps(GOOD_1).encode() + b'\n{"messages": "\xff"}\n')
    examples, report = load_chat_file(path, on_bad_example="skip")
    assert len(examples) == 1
    assert [(i.line, i.kind) for i in report.issues] == [(2, "bad_encoding")]


def test_unknown_on_bad_example_is_rejected(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD_1])
    with pytest.raises(ValueError, match="'ignore'"):
        load_chat_file(path, on_bad_example="ignore")


def test_sha256_file(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD_1, GOOD_2])
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------
# Train/validation split
# --------------------------------------------------------------------------------------


def numbered_examples(n: int) -> list[ChatExample]:
    return [
        ChatExample((Message("user", f"q{i}"), Message("assistant", f"a{i}")), f"f:{i + 1}")
        for i in range(n)
    ]


def test_split_is_seeded_disjoint_and_sized():
    examples = numbered_examples(100)
    train, val = split_examples(examples, val_fraction=0.1, seed=7)
    assert (len(train), len(val)) == (90, 10)
    assert {e.source for e in train}.isdisjoint(e.source for e in val)
    assert sorted(train + val, key=examples.index) == examples
    assert train == sorted(train, key=examples.index), "each half keeps the input order"
    assert split_examples(examples, val_fraction=0.1, seed=7) == (train, val)
    assert split_examples(examples, val_fraction=0.1, seed=8)[1] != val


def test_split_edges():
    examples = numbered_examples(5)
    assert split_examples(examples, val_fraction=0.0, seed=0) == (examples, [])
    train, val = split_examples(examples, val_fraction=0.01, seed=0)
    assert (len(train), len(val)) == (4, 1), "a positive fraction holds out at least one"
    with pytest.raises(ValueError, match="val_fraction"):
        split_examples(examples, val_fraction=1.0, seed=0)
    with pytest.raises(ValueError, match="1 example"):
        split_examples(examples[:1], val_fraction=0.5, seed=0)


# --------------------------------------------------------------------------------------
# Tokenization and assistant-only labels
# --------------------------------------------------------------------------------------

MULTI_TURN = ChatExample(
    parse_record(chat(
        ("system", "You answer in one word."),
        ("user", "Capital of France?"),
        ("assistant", "Paris."),
        ("user", "And of Italy?"),
        ("assistant", "Rome, of course."),
    )),
    "chat.jsonl:3",
)


def test_only_assistant_replies_and_their_end_marker_are_labelled(tokenizer):
    example = tokenize_chat(MULTI_TURN, tokenizer)

    # The ids are exactly what the template renders and tokenizes for inference.
    rendered = tokenizer.apply_chat_template(MULTI_TURN.to_dicts(), tokenize=True, return_dict=True)
    assert example.input_ids == list(rendered["input_ids"])
    assert example.source == "chat.jsonl:3"

    # ChatML: "<|im_start|>assistant\n{reply}<|im_end|>\n". Learnt: the reply and
    # <|im_end|>. Not learnt: the header before it, the "\n" separator after it.
    runs = [tokenizer.decode(run) for run in labelled_runs(example)]
    assert runs == ["Paris.<|im_end|>", "Rome, of course.<|im_end|>"]

    newline = tokenizer.convert_tokens_to_ids("Ċ")  # byte-level BPE's "\n"
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode([newline]) == "\n"
    for i, label in enumerate(example.labels):
        if label == im_end:
            assert example.input_ids[i + 1] == newline
            assert example.labels[i + 1] == IGNORE_INDEX
    header = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    for i in range(len(example.input_ids) - len(header) + 1):
        if example.input_ids[i:i + len(header)] == header:
            assert example.labels[i:i + len(header)] == [IGNORE_INDEX] * len(header)

    unlabelled = tokenizer.decode([t for t, l in zip(example.input_ids, example.labels)
                                   if l == IGNORE_INDEX])
    assert unlabelled == (
        "<|im_start|>system\nYou answer in one word.<|im_end|>\n"
        "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n\n"
        "<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n\n"
    )


def test_the_default_system_message_is_not_labelled(tokenizer):
    example = tokenize_chat(ChatExample(parse_record(GOOD_1), "f:1"), tokenizer)
    assert "SmolLM" in tokenizer.decode(example.input_ids)  # the template added it
    assert [tokenizer.decode(run) for run in labelled_runs(example)] == ["4<|im_end|>"]


class WithTemplate:
    """The tokenizer, rendering with another chat template."""

    def __init__(self, tokenizer, chat_template: str) -> None:
        self.tokenizer, self.chat_template = tokenizer, chat_template

    def apply_chat_template(self, messages, **kwargs):
        kwargs["chat_template"] = self.chat_template
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)


def test_a_template_that_breaks_the_prefix_property_is_reported(tokenizer):
    # Rewrites the start of the text as the conversation grows, so no prompt is a
    # prefix of what follows (real templates do this when they strip past reasoning).
    counting = WithTemplate(tokenizer, (
        "{{ messages | length }} messages\n{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ))
    with pytest.raises(ChatTemplateError, match="not a prefix"):
        tokenize_chat(MULTI_TURN, counting)

    opener = ChatExample(parse_record(chat(("assistant", "Hi, I'm here."), ("user", "ok"))), "f:4")
    with pytest.raises(ChatTemplateError, match="opens with an assistant turn"):
        tokenize_chat(opener, tokenizer)
    _, issues = tokenize_dataset(
        [opener, ChatExample(parse_record(GOOD_1), "f:5")], tokenizer, max_seq_length=512,
        on_bad_example="skip",
    )
    assert [(i.path, i.line, i.kind) for i in issues] == [("f", 4, "template_mismatch")]


def test_an_over_long_example_is_an_issue_at_its_line(tmp_path, tokenizer):
    long_reply = " ".join(["word"] * 80)
    path = write_jsonl(tmp_path / "train.jsonl", [
        GOOD_1, "", chat(("user", "Talk."), ("assistant", long_reply)), GOOD_2,
    ])
    examples, _ = load_chat_file(path)
    n_tokens = len(tokenize_chat(examples[1], tokenizer))
    assert n_tokens > 64

    with pytest.raises(DataValidationError) as err:
        tokenize_dataset(examples, tokenizer, max_seq_length=64)
    reason = f"example is {n_tokens} tokens, longer than max_seq_length 64"
    assert [str(i) for i in err.value.issues] == [f"{path}:3: {reason}"]
    assert f"{path}:3: {reason}" in str(err.value)
    assert err.value.report.counts == {"too_long": 1}

    kept, issues = tokenize_dataset(examples, tokenizer, max_seq_length=64, on_bad_example="skip")
    assert [e.source for e in kept] == [f"{path}:1", f"{path}:4"]
    assert issues == [DataIssue(str(path), 3, reason, "too_long")]


# --------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------


def random_examples(n: int, max_len: int, seed: int) -> list[TokenizedExample]:
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        length = rng.randint(2, max_len)
        ids = [rng.randrange(3, 1000) for _ in range(length)]
        labels = [IGNORE_INDEX] + [t if rng.random() < 0.5 else IGNORE_INDEX for t in ids[1:]]
        examples.append(TokenizedExample(ids, labels, f"f:{i + 1}"))
    return examples


def reference_first_fit_decreasing(lengths: list[int], size: int) -> list[list[int]]:
    """The textbook O(n * rows) version, to check the tree-based one against."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, room in enumerate(free) if room >= lengths[i]), len(rows))
        if row == len(rows):
            rows.append([])
            free.append(size)
        rows[row].append(i)
        free[row] -= lengths[i]
    return rows


def test_packing_fits_places_every_example_once_and_is_first_fit_decreasing():
    examples = random_examples(300, max_len=64, seed=0)
    rows = pack_examples(examples, 64)

    assert all(sum(len(e) for e in row) <= 64 for row in rows)
    assert sorted(e.source for row in rows for e in row) == sorted(e.source for e in examples)
    by_source = {e.source: i for i, e in enumerate(examples)}
    expected = reference_first_fit_decreasing([len(e) for e in examples], 64)
    assert [[by_source[e.source] for e in row] for row in rows] == expected
    assert pack_examples(examples, 64) == rows, "deterministic"

    with pytest.raises(ValueError, match="f:1"):
        pack_examples(examples[:1], len(examples[0]) - 1)


def test_collate_packed_restarts_positions_and_pads_as_its_own_segment():
    examples = random_examples(40, max_len=30, seed=1)
    rows = pack_examples(examples, 48)
    batch = collate_packed(rows, 48, pad_id=2)

    for tensor in (batch.input_ids, batch.labels, batch.position_ids):
        assert tensor.shape == (len(rows), 48)
    assert batch.attention_mask is None
    for b, row in enumerate(rows):
        lengths = [len(e) for e in row]
        pad = 48 - sum(lengths)
        expected_positions = [p for n in lengths + ([pad] if pad else []) for p in range(n)]
        assert batch.position_ids[b].tolist() == expected_positions
        ids = [t for e in row for t in e.input_ids]
        assert batch.input_ids[b].tolist() == ids + [2] * pad
        assert batch.labels[b].tolist() == [t for e in row for t in e.labels] + [IGNORE_INDEX] * pad
    assert batch.num_tokens == sum(len(e) for e in examples)
    assert batch.num_loss_tokens == sum(l != IGNORE_INDEX for e in examples for l in e.labels)


def test_collate_padded_pads_to_the_longest_and_masks_the_padding():
    examples = random_examples(3, max_len=20, seed=2)
    batch = collate_padded(examples, pad_id=2)
    width = max(len(e) for e in examples)
    assert batch.input_ids.shape == (3, width)
    for b, e in enumerate(examples):
        pad = width - len(e)
        assert batch.attention_mask[b].tolist() == [1] * len(e) + [0] * pad
        assert batch.labels[b].tolist() == e.labels + [IGNORE_INDEX] * pad
        assert batch.position_ids[b].tolist() == list(range(width))
    assert batch.num_tokens == sum(len(e) for e in examples)


# A packed row must compute each example exactly as if it ran alone.

CONVERSATIONS = [
    chat(("user", "What is the capital of France?"), ("assistant", "Paris.")),
    chat(("system", "Be brief."), ("user", "Name a prime."), ("assistant", "Seven."),
         ("user", "Another?"), ("assistant", "Eleven.")),
    {"instruction": "Write a haiku about rain.", "output": "Soft rain on the roof\nthe gutter"},
]


@pytest.fixture(scope="module")
def conversation_tokens(tokenizer) -> list[TokenizedExample]:
    examples = [ChatExample(parse_record(r), f"c:{i + 1}") for i, r in enumerate(CONVERSATIONS)]
    tokenized, _ = tokenize_dataset(examples, tokenizer, max_seq_length=256)
    return tokenized


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def tiny_llama(request, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, dtype=torch.float32, attn_implementation=request.param
    )
    assert model.config._attn_implementation == request.param
    return model.eval()


@torch.no_grad()
def alone_logits(model, example: TokenizedExample) -> torch.Tensor:
    ids = torch.tensor([example.input_ids])
    return model(input_ids=ids, use_cache=False).logits[0]  # (T, vocab)


@torch.no_grad()
def test_packed_row_gives_each_example_its_own_logits(tiny_llama, conversation_tokens, tokenizer):
    examples = conversation_tokens
    width = sum(len(e) for e in examples) + 7  # room for a padding segment too
    rows = pack_examples(examples, width)
    assert len(rows) == 1 and len(rows[0]) == 3
    batch = collate_packed(rows, width, tokenizer.pad_token_id)

    assert batch.model_inputs()["attention_mask"] is None
    assert batch.model_inputs()["use_cache"] is False
    logits = tiny_llama(**batch.model_inputs()).logits[0]  # (T, vocab)
    start = 0
    for example in rows[0]:
        inside = logits[start:start + len(example)]
        assert (inside - alone_logits(tiny_llama, example)).abs().max() < 1e-4, example.source
        start += len(example)

    # The control: the same row with one running position (a naive concatenation) lets
    # later examples attend to earlier ones, and their logits change. If positions did
    # not restart, the check above would fail like this.
    naive = tiny_llama(
        input_ids=batch.input_ids, position_ids=torch.arange(width)[None], use_cache=False,
    ).logits[0]
    first, second = rows[0][0], rows[0][1]
    second_naive = naive[len(first):len(first) + len(second)]
    assert (second_naive - alone_logits(tiny_llama, second)).abs().max() > 1e-2


@torch.no_grad()
def test_padded_batch_gives_each_example_its_own_logits(tiny_llama, conversation_tokens, tokenizer):
    batch = collate_padded(conversation_tokens, tokenizer.pad_token_id)
    logits = tiny_llama(**batch.model_inputs()).logits  # (B, T, vocab)
    for b, example in enumerate(conversation_tokens):
        diff = logits[b, :len(example)] - alone_logits(tiny_llama, example)
        assert diff.abs().max() < 1e-4, example.source


@pytest.mark.parametrize("on_bad_example", ["error", "skip"])
def test_deep_nesting_and_huge_integers_are_line_issues_not_crashes(tmp_path, on_bad_example):
    """json.loads raises RecursionError on `[[[[...` thousands deep and ValueError on an
    integer over Python's 4,300-digit limit: each must be a `file:line` bad_json issue
    (counted and skipped in skip mode), never an exception without a line."""
    deep = "[" * 100_000 + "]" * 100_000
    deep_in_record = '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    huge = '{"messages": [{"role": "user", "content": "hi"}], "n": ' + "9" * 5000 + "}"
    path = write_jsonl(tmp_path / "train.jsonl", [json.dumps(GOOD_1), deep, huge, deep_in_record, json.dumps(GOOD_2)])
    if on_bad_example == "error":
        with pytest.raises(DataValidationError) as err:
            load_chat_file(path)
        assert [(i.line, i.kind) for i in err.value.issues] == [(2, "bad_json"), (3, "bad_json"), (4, "bad_json")]
        assert f"{path}:2: bad JSON: nested too deeply" in str(err.value)
        assert f"{path}:3: bad JSON: " in str(err.value) and "digits" in str(err.value)
    else:
        examples, report = load_chat_file(path, on_bad_example="skip")
        assert [e.source for e in examples] == [f"{path}:1", f"{path}:5"]
        assert (report.skipped, report.counts) == (3, {"bad_json": 3})
