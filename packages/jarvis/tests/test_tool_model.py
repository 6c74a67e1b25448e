"""The shipped chat model with JARVIS's tools (issue #24): it calls the calculator for
arithmetic and answers with the result, through the real tool loop and calculator, on
questions worded as in no training example (jarvis_prime's held-out tool suite)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jarvis.chatbots import Chatbot, ChatbotConfig, ToolUse
from jarvis.memory import ConversationStore
from jarvis_prime.evaluation import load_tool_suite

# Issue #24's target (>= 90 % end to end), met by the shipped 1.1.0 (11 of these 12 in
# benchmarks/tool_suite.py: "844 split 4 ways" -> 844 * 4).
pytestmark = pytest.mark.real_model
CASES = 12  # held-out arithmetic questions: two greedy replies each, well under a minute


def test_jarvis_chat_answers_arithmetic_with_the_calculator(chat_model):
    result = subprocess.run([sys.executable, "-m", "jarvis.cli", "chat", "--once", "what is 12 times 7?"],
                            capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert result.returncode == 0, result.stderr
    assert "calculator(" in result.stdout and "84" in result.stdout.split("calculator(", 1)[1], result.stdout


def test_held_out_arithmetic_is_answered_right_end_to_end(chat_model, tmp_path):
    from jarvis_prime import PrimeModel

    cases = [c for c in load_tool_suite()["cases"] if c["category"] == "arithmetic"][:CASES]
    store = ConversationStore(tmp_path / "jarvis.db")
    right, replies = 0, []
    with PrimeModel.from_pretrained(chat_model.path, backend="llamacpp") as model:
        assert model.calls_tools  # prime.json: tools: true
        for case in cases:
            bot = Chatbot(ChatbotConfig(max_new_tokens=64), model=model, store=store)
            pieces = list(bot.stream(case["user"]))
            answer = "".join(p for p in pieces if not isinstance(p, ToolUse))
            used = [p.result.call.name for p in pieces if isinstance(p, ToolUse)]
            replies.append((case["user"], used, answer))
            right += "calculator" in used and case["result"] in answer.replace(",", "")
    store.close()
    assert right >= 0.9 * len(cases), replies
