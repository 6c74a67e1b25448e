"""The tool-calling half of the chat recipe (issue #24): its conversations, rendered as JARVIS
renders them at inference, the held-out suite they are kept apart from, and its grading."""

from __future__ import annotations

import json
from dataclasses import replace
from fractions import Fraction

import pytest

from jarvis_prime.evaluation import argument_errors, grade_tool_reply, load_tool_suite, tool_suite_prompt
from jarvis_prime.models.tools import ToolCall, hermes_messages
from jarvis_prime.persona import load_prompts
from jarvis_prime.recipes.chat_model import RECIPES, tool_conversations
from jarvis_prime.recipes.tool_data import (ARITHMETIC, ARITHMETIC_WEIGHTS, ASKS_ARITHMETIC, CITIES, DATETIME, FACTS,
                                            REMEMBER, clock_wordings, draw_case, evaluate_expression, format_number, heldout_suite,
                                            jarvis_tools)

RECIPE = RECIPES["prime-135m-chat-v1"]
PERSONA = [{"messages": [{"role": "user", "content": "Introduce yourself briefly."},
                         {"role": "assistant", "content": "I am JARVIS. How can I help?"}]},
           {"messages": [{"role": "user", "content": "What is 2 plus 2?"},
                         {"role": "assistant", "content": "2 plus 2 is 4."}]}]


def test_the_shipped_suite_is_what_the_generator_draws():
    assert load_tool_suite() == json.loads(json.dumps(heldout_suite()))  # regenerate it with `python -m ...tool_data`


def test_heldout_wordings_never_appear_in_training():
    for op, (_, _, _, wordings) in ARITHMETIC.items():
        assert not set(wordings["heldout"]) & set(wordings["train"]), op
    assert not {w for w, _ in DATETIME["heldout"]} & {w for w, _ in clock_wordings("train")}
    assert not set(REMEMBER["heldout"]) & set(REMEMBER["train"])
    assert not {f[0] for f in FACTS["heldout"]} & {f[0] for f in FACTS["train"]}
    assert set(CITIES["heldout"]) - set(CITIES["train"])  # some cities are new
    trained = {m["content"] for messages, _ in tool_conversations(PERSONA, RECIPE) for m in messages
               if m["role"] == "user"}
    assert not trained & {c["user"] for c in load_tool_suite()["cases"] if c["category"] != "none"}


@pytest.mark.parametrize("seed", [0, 1])
def test_arithmetic_cases_carry_the_exact_result_and_a_final_answer_that_copies_it(seed):
    for i in range(200):
        case = draw_case(seed, "train", i, "arithmetic")
        expression = case["arguments"]["expression"]
        assert case["result"] == format_number(evaluate_expression(expression))
        assert case["result"] in case["answer"]
        assert expression.replace(" ", "") in case["expect"]["expression"]
    assert evaluate_expression("(3 + 4) * 2 ** 2 - 10 / 4") == 25.5
    assert format_number(Fraction(42386482, 5)) == "8477296.4"  # seed 1 drew it; a float wrote ...4000000004


def test_training_draws_the_missed_operations_more_often_and_the_suite_draws_evenly():
    """ARITHMETIC_WEIGHTS: subtraction, division and (a + b) * c, the held-out misses, come twice
    as often in training (6 of 11 draws instead of 3 of 8); the held-out split is unweighted."""
    def missed_share(split: str) -> float:
        expressions = [draw_case(0, split, i, "arithmetic")["arguments"]["expression"] for i in range(800)]
        missed = [e for e in expressions if " - " in e or e.startswith("(") or (" / " in e and not e.endswith("/ 100"))]
        return len(missed) / len(expressions)

    assert ARITHMETIC_WEIGHTS == {"sub": 2, "div": 2, "add_mul": 2}
    assert missed_share("train") > 0.48  # 6 / 11 = 0.55 expected
    assert missed_share("heldout") < 0.44  # 3 / 8 = 0.375 expected


def test_no_tool_turns_never_ask_for_arithmetic():
    """A persona prompt such as "What is 2 plus 2?" wants the calculator once tools are offered,
    so it is kept out of the no-tool turns, and out of the suite's no-tool cases."""
    for messages, _ in tool_conversations(PERSONA, RECIPE):
        answered = [m["content"] for m, reply in zip(messages, messages[1:])
                    if m["role"] == "user" and not reply.get("tool_calls")]
        assert not any(ASKS_ARITHMETIC.search(text) for text in answered)
    assert not any(ASKS_ARITHMETIC.search(c["user"]) for c in load_tool_suite()["cases"] if c["category"] == "none")


def test_no_tool_turns_draw_refusals_more_often():
    """The base model declines few unsafe requests, so its replies hold few refusals; a no-tool
    turn draws each of them `no_tool_weights["safety"]` times as often as another reply, so
    declining with tools offered is trained beside answering (a prompt the recipe's prompts do
    not hold counts 1)."""
    prompts = load_prompts()
    unsafe = next(p["prompt"] for p in prompts if p["category"] == "safety")
    questions = [p["prompt"] for p in prompts if p["category"] == "knowledge" and not ASKS_ARITHMETIC.search(p["prompt"])]
    persona = [{"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "A reply."}]}
               for text in [unsafe, *questions[:8], "Introduce yourself briefly."]]

    def unsafe_share(recipe) -> float:
        answered = [m["content"] for messages, _ in tool_conversations(persona, recipe)
                    for m, reply in zip(messages, messages[1:]) if m["role"] == "user" and reply.get("content") == "A reply."]
        assert len(answered) == dict(recipe.tool_examples)["none"] + dict(recipe.openers)["none"]
        return answered.count(unsafe) / len(answered)

    assert RECIPE.no_tool_weights == {"safety": 4}
    assert 0.2 < unsafe_share(RECIPE) < 0.42  # 4 / 13 = 0.31 expected
    assert unsafe_share(replace(RECIPE, no_tool_weights={})) < 0.17  # 1 / 10


def test_another_layout_deals_the_same_tool_cases_into_other_conversations():
    """`layout_seed` redraws only which exchanges share a tool list and their order: the tool
    cases stay those `seed` draws, so two layouts compare the same data."""
    def dealt(recipe) -> tuple[list[str], list[tuple[str, ...]]]:
        conversations = tool_conversations(PERSONA, recipe)
        calls = [m["tool_calls"][0]["id"] for messages, _ in conversations for m in messages if m.get("tool_calls")]
        return calls, [tuple(m["content"] for m in messages if m["role"] == "user") for messages, _ in conversations]

    calls, layout = dealt(RECIPE)
    other_calls, other_layout = dealt(replace(RECIPE, layout_seed=1))
    assert sorted(other_calls) == sorted(calls) and len(set(calls)) == len(calls)
    assert other_calls != calls and other_layout != layout


def test_training_asks_the_clock_with_and_without_a_place_in_the_same_words():
    """Half the training clock questions name a place, and each place wording is also asked
    without it, so only the place decides whether the call carries a zone."""
    cases = [draw_case(0, "train", i, "datetime") for i in range(400)]
    with_zone = [c for c in cases if c["arguments"]]
    assert 0.4 < len(with_zone) / len(cases) < 0.6
    no_place = {w for w, _ in clock_wordings("train", names_place=False)}
    for wording, _ in DATETIME["train"]:
        if " in {city}" in wording:
            assert wording.replace(" in {city}", "") in no_place, wording
    assert "What time is it right now?" in {c["question"] for c in cases}  # only "... right now in {city}?" is written
    for c in cases:
        assert bool(c["arguments"]) == any(city in c["question"] for city in CITIES["train"]), c["question"]
        assert c["arguments"].get("timezone") in (None, *CITIES["train"].values())


def test_recall_is_asked_in_several_ways():
    """Training asks for each remembered fact in several ways: with one question per fact, the
    held-out "What is my cat's name?" read as a fact to save (`remember`), not a question."""
    questions = [draw_case(0, "train", i, "recall")["question"] for i in range(400)]
    for fact in FACTS["train"]:
        assert len(fact[2]) >= 3 and set(fact[2]) <= set(questions), fact[0]
    assert not {q for f in FACTS["heldout"] for q in f[2]} & set(questions)


def test_conversations_offer_the_tools_jarvis_offers():
    counts = dict(RECIPE.tool_examples)
    conversations = tool_conversations(PERSONA, RECIPE)
    names = {tuple(t["function"]["name"] for t in tools) for _, tools in conversations}
    assert names == {("calculator", "current_datetime", "search_conversations", "remember", "recall"),
                     ("calculator", "current_datetime")}
    calls = [m["tool_calls"][0]["function"] for messages, _ in conversations for m in messages if m.get("tool_calls")]
    assert {c["name"] for c in calls} == {"calculator", "current_datetime", "remember", "recall"}
    openers = dict(RECIPE.openers)
    expected = sum(counts.values()) + sum(openers.values()) - counts["none"] - openers.get("none", 0)
    assert len(calls) == expected  # every drawn exchange is dealt out once
    for call in calls:  # every call is schema-valid for the tool it names
        schema = next(t["function"]["parameters"] for t in jarvis_tools()["tools"] if t["function"]["name"] == call["name"])
        assert argument_errors(json.loads(call["arguments"]), schema) == []


def test_several_exchanges_share_one_tool_list():
    """Each conversation holds up to `exchanges[store]` questions after its tool list; no memory
    tool is called where it is not offered, nor `recall` where the facts are already given."""
    counts = dict(RECIPE.tool_examples)
    conversations = tool_conversations(PERSONA, RECIPE)
    assert len(conversations) < sum(counts.values()) / 3
    replies = 0
    for messages, tools in conversations:
        offered = {t["function"]["name"] for t in tools}
        asked = [m for m in messages if m["role"] == "user"]
        assert 1 <= len(asked) <= RECIPE.exchanges[len(offered) == 5]
        called = {m["tool_calls"][0]["function"]["name"] for m in messages if m.get("tool_calls")}
        assert called <= offered
        if messages[0]["role"] == "system":
            assert "recall" not in called
        replies += sum(m["role"] == "assistant" and not m.get("tool_calls") for m in messages)
    assert replies == sum(counts.values()) + sum(dict(RECIPE.openers).values())  # an answer after each call, a reply to each "none" turn


def test_openers_ask_one_question_right_after_the_tool_list():
    """`recipe.openers` adds exchanges that are alone after their tool list, as a JARVIS question
    is: their cases are new draws (no exchange is trained twice), no-tool ones get no call."""
    recipe = replace(RECIPE, openers=(("none", 36), ("datetime-here", 30), ("recall", 20)))  # run I's
    conversations = tool_conversations(PERSONA, recipe)
    alone = [messages for messages, _ in conversations if sum(m["role"] == "user" for m in messages) == 1]
    openers = dict(recipe.openers)
    assert sum(not any(m.get("tool_calls") for m in messages) for messages in alone) >= openers["none"]
    clock = [m["tool_calls"][0]["function"]["arguments"] for messages in alone for m in messages
             if m.get("tool_calls") and m["tool_calls"][0]["function"]["name"] == "current_datetime"]
    assert clock.count("{}") >= openers["datetime-here"]  # clock questions that name no place: no time zone
    questions = [m["content"] for messages, _ in conversations for m in messages
                 if m["role"] == "user" and m["content"] not in {p["messages"][0]["content"] for p in PERSONA}]
    ids = [m["tool_calls"][0]["id"] for messages, _ in conversations for m in messages if m.get("tool_calls")]
    assert len(ids) == len(set(ids)) and questions
    recalls = [messages for messages, tools in conversations if len(messages) == 4 and len(tools) == 5
               and messages[1]["tool_calls"][0]["function"]["name"] == "recall"]
    assert len(recalls) >= openers["recall"]  # memory tools only where a store offers them


def test_no_tool_turns_skip_prompts_the_suite_asks():
    """A persona prompt that is also one of the suite's questions is never a no-tool turn (the
    data pipeline would drop the whole conversation holding it)."""
    suite_prompt = next(c["user"] for c in load_tool_suite()["cases"] if c["category"] == "none")
    persona = PERSONA + [{"messages": [{"role": "user", "content": suite_prompt},
                                       {"role": "assistant", "content": "A reply."}]}]
    users = {m["content"] for messages, _ in tool_conversations(persona, RECIPE) for m in messages if m["role"] == "user"}
    assert "Introduce yourself briefly." in users and suite_prompt not in users


@pytest.mark.parametrize("kind", ["tool-chat", "chat"])
def test_the_data_pipeline_drops_copies_of_suite_questions_not_the_tool_list(tmp_path, kind):
    """The chat recipe's pipeline ("tool-chat") and the feedback recipe's ("chat", what `jarvis
    improve` runs on exported replies that called tools): conversations that carry JARVIS's tool
    schemas (as eval_data/tool_suite.json does) stay; one that asks a held-out question goes."""
    from reactor_core.data.pipeline import clean
    from reactor_core.data.pipeline_config import PipelineConfig

    from jarvis_prime.recipes import data_pipeline

    data = tmp_path / "train.jsonl"
    rows = [{"messages": hermes_messages(messages, tools)} for messages, tools in tool_conversations(PERSONA, RECIPE)[:6]]
    heldout = next(c["user"] for c in load_tool_suite()["cases"] if c["category"] == "arithmetic")
    rows.append({"messages": [{"role": "user", "content": heldout}, {"role": "assistant", "content": "Copied."}]})
    if kind == "tool-chat":  # 13-word runs: a neighbour of a suite question stays (8-word runs drop it)
        rows.append({"messages": [{"role": "user", "content": "What is the boiling point of water in Fahrenheit?"},
                                  {"role": "assistant", "content": "212 degrees."}]})  # the JARVIS suite asks for Celsius
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = clean([data], tmp_path / "clean.jsonl", PipelineConfig(**data_pipeline(kind, tmp_path)))
    assert (summary.read - summary.kept, dict(summary.removed)) == (1, {"contaminated": 1})
    kept = [json.loads(line) for line in (tmp_path / "clean.jsonl").read_text().splitlines()]
    assert heldout not in {m["content"] for row in kept for m in row["messages"]}


def test_the_chat_recipes_pipeline_keeps_every_templated_opener(tmp_path):
    """Each opener (one exchange after the ~590-token tool list) is >= 0.95 alike to another of its
    template; "tool-chat" runs no near-dedup, so only exact repeats go (here the no-tool openers,
    which all draw PERSONA's one non-arithmetic turn)."""
    from reactor_core.data.pipeline import clean
    from reactor_core.data.pipeline_config import PipelineConfig

    from jarvis_prime.recipes import data_pipeline

    rows = [json.dumps({"messages": hermes_messages(messages, tools)}) for messages, tools in tool_conversations(PERSONA, RECIPE)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(row + "\n" for row in rows))
    summary = clean([data], tmp_path / "clean.jsonl", PipelineConfig(**data_pipeline("tool-chat", tmp_path)))
    assert summary.kept == len(set(rows)) and dict(summary.removed) == {"exact_duplicate": len(rows) - len(set(rows))}
    assert len(set(rows)) > len(rows) - dict(RECIPE.openers)["none"]  # every other opener is distinct


@pytest.mark.real_model
def test_training_rows_are_the_tokens_chat_with_tools_sends(pulled_model):
    """What Reactor Core renders for a training row (the tokenizer's chat template on the
    hermes_messages row) is, turn for turn, what PrimeModel renders for the same OpenAI
    messages when JARVIS's tool loop calls chat_with_tools: train and inference tokens match."""
    from transformers import AutoTokenizer

    from jarvis_prime import PrimeModel

    tokenizer = AutoTokenizer.from_pretrained(pulled_model.path)
    conversations = tool_conversations(PERSONA, RECIPE)
    samples = [c for c in conversations if any(m["role"] == "tool" for m in c[0])][:3] + conversations[-2:]
    with PrimeModel.from_pretrained(pulled_model.path, backend="llamacpp") as model:
        for messages, tools in samples:
            row = hermes_messages(messages, tools)
            trained = tokenizer.apply_chat_template(row, tokenize=False)
            # the prompt of each assistant turn, as the tool loop sends it
            for end in [i for i, m in enumerate(messages) if m["role"] == "assistant"]:
                sent = model.apply_chat_template(messages[:end], tools=tools, add_generation_prompt=True)
                assert trained.startswith(sent)
            assert trained == model.apply_chat_template(messages, tools=tools, add_generation_prompt=False)


def test_grading_a_reply():
    suite = load_tool_suite()
    case = next(c for c in suite["cases"] if c["category"] == "arithmetic" and c["store"])
    _, tools = tool_suite_prompt(suite, case)
    assert len(tools) == 5
    expression = case["expect"]["arguments"]["expression"][0]
    assert grade_tool_reply(case, tools, [ToolCall("calculator", json.dumps({"expression": expression}))]) == []
    assert grade_tool_reply(case, tools, []) == ["no call"]
    assert grade_tool_reply(case, tools, [ToolCall("recall", '{"query": "x"}')]) == ["called recall, not calculator"]
    assert grade_tool_reply(case, tools, [ToolCall("calculator", '{"expression": "1 + 1"}')])[0].startswith("unexpected")
    assert grade_tool_reply(case, tools, [ToolCall("calculator", '{"expr": "1"}')]) == [
        "missing 'expression'", "unknown argument 'expr'"]
    clock = next(c for c in suite["cases"] if c["category"] == "datetime" and c["expect"]["arguments"])
    zone = clock["expect"]["arguments"]["timezone"][0]
    assert grade_tool_reply(clock, tools, [ToolCall("current_datetime", json.dumps({"timezone": zone}))]) == []
    assert grade_tool_reply(clock, tools, [ToolCall("current_datetime", "{}")])
    none = next(c for c in suite["cases"] if c["category"] == "none")
    assert grade_tool_reply(none, tools, []) == []
    assert grade_tool_reply(none, tools, [ToolCall("calculator", "{}")]) == ["called calculator"]
