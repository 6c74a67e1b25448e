"""Answer extraction and voting: the parts of self-consistency that need no model."""

from jarvis.reasoning import extract_answer, load_problems, majority, normalise, step_by_step_messages


def test_answers_are_read_from_the_answer_line_or_the_last_number():
    assert extract_answer("3 boxes of 4 is 12.\nAnswer: 12 pencils") == "12"
    assert extract_answer("First 5, then 7. So the total is 12") == "12"
    assert extract_answer("Answer: $1,200.00") == "1200"
    assert extract_answer("The answer is Carl.") == "carl"
    assert extract_answer("I am not sure.") is None
    assert extract_answer("The answer is \nnot clear, maybe 7") == "7", "an empty answer line falls back to numbers"


def test_normalise():
    assert normalise("The Green box.") == "green box"
    assert normalise("**Yes**") == "yes"
    assert normalise("2.50") == "2.5"
    assert normalise("3/4") != normalise("3/5") and normalise("10:30") != normalise("10:45"), "fractions and times stay whole"


def test_majority_vote():
    assert majority(["12", "11", "12", None]) == ("12", {"12": 2, "11": 1})
    assert majority(["a", "b"])[0] == "a", "ties go to the first answer reached"
    assert majority([None, None]) == (None, {})


def test_step_by_step_prompt_leaves_the_conversation_alone():
    messages = [{"role": "user", "content": "2+2?"}]
    prompted = step_by_step_messages(messages)
    assert prompted[-1]["content"].startswith("2+2?") and "Answer:" in prompted[-1]["content"]
    assert messages == [{"role": "user", "content": "2+2?"}]


def test_the_problem_set_is_well_formed():
    problems = load_problems()
    assert len(problems) >= 30
    assert {p["kind"] for p in problems} == {"arithmetic", "logic"}
    for p in problems:
        assert p["question"].strip() and normalise(p["answer"]) == p["answer"], p


def test_replies_are_read_by_the_reader_the_reasoning_model_is_scored_with():
    from jarvis_prime import answers

    assert extract_answer is answers.extract_answer, "one answer reader for jarvis, the recipe and the benchmark"
    assert extract_answer("<think>\nthe answer is 3\n3 + 1 = 4\n</think>\nThe answer is 4.") == "4"
    assert extract_answer("<think>\n3 + 1 = 4") == "4", "thinking that never closes is read whole"
