"""`jarvis improve` end to end: feedback -> candidate (Reactor Core SFT + DPO) -> gate -> new version.

Runs in its own model store (symlinks to the session's models), so promoting a new
version of prime-135m-chat-v1 here never changes what other tests load.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

from jarvis.improve import gate
from jarvis.memory import ConversationStore
from jarvis_prime.catalog import load_catalog

pytestmark = pytest.mark.real_model
CURRENT = load_catalog().get("prime-135m-chat-v1").version  # what the store pulls: the shipped version
NEXT = "{}.{}.0".format(CURRENT.split(".")[0], int(CURRENT.split(".")[1]) + 1)  # a feedback round: the next minor

IDENTITY = [
    "Who built you?", "Who made you?", "Who created you?", "Which team built you?", "Who are your makers?",
    "Who developed you?", "Who programmed you?", "Who designed you?", "Tell me who built you.", "Which lab made you?",
]
ANSWER = "I was built by the Ravenwood Lab team, sir."
GOOD = [  # replies the user liked: they keep the candidate close to what already worked
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("Give me a tip for better sleep.", "Keep a regular bedtime and avoid screens for an hour before sleep."),
    ("What is 12 times 3?", "12 times 3 is 36."),
    ("Translate 'thank you' into French.", "'Thank you' in French is 'merci'."),
    ("What should I pack for a day hike?", "Water, snacks, a map, sunscreen, a light jacket and a charged phone."),
    ("Name a primary colour.", "Red is a primary colour."),
    ("How do I boil an egg?", "Put the egg in boiling water for about 9 minutes, then cool it in cold water."),
]


ANSWER_LOGPROB = f"""
from jarvis_prime.evaluation import load_variant, reply_logprob
from jarvis_prime.store import resolve
for version in ("prime-135m-chat-v1-{CURRENT}", "prime-135m-chat-v1-{NEXT}"):
    model = load_variant(resolve(version).path, "q8_0")
    print(reply_logprob(model, [{{"role": "user", "content": "Who is the team that built you?"}}], {ANSWER!r})[0])
    model.close()
"""


def seed_feedback(home):
    """Corrections and preferred regenerations about who built JARVIS, and thumbs-up on
    ordinary good replies: the mix a user of the web page leaves."""
    store = ConversationStore(home / "jarvis.db")
    for i, question in enumerate(IDENTITY):
        cid = store.create(cid=f"identity-{i}")  # fixed ids: the held-out split is the same every run
        store.add(cid, "user", question)
        reply = store.add(cid, "assistant", "I am an AI assistant created to help you.", model="prime-135m-chat-v1@1.0.0")
        if i % 3 == 2:
            store.rate(store.add_alternative(reply, ANSWER), 1)  # a regeneration the user preferred
        else:
            store.rate(reply, -1)
            store.correct(reply, ANSWER)
    for i, (question, answer) in enumerate(GOOD):
        cid = store.create(cid=f"good-{i}")
        store.add(cid, "user", question)
        store.rate(store.add(cid, "assistant", answer, model="prime-135m-chat-v1@1.0.0"), 1)
    for i, (a, b) in enumerate(((12, 7), (35, 4))):  # replies that called the calculator (issue #24)
        cid = store.create(cid=f"tool-{i}")
        call = {"id": f"call_{i}", "name": "calculator", "arguments": json.dumps({"expression": f"{a} * {b}"}),
                "result": str(a * b), "error": None}
        _, reply = store.add_exchange(cid, f"What is {a} times {b}?", f"{a} * {b} = {a * b}.",
                                      model=f"prime-135m-chat-v1@{CURRENT}", tool_calls=[call])
        store.rate(reply, 1)
    store.close()


def test_gate_promotes_only_a_better_candidate():
    current = {"suite": 0.5, "reply_nll": 2.0, "pair_accuracy": 0.5}
    assert gate(current, {"suite": 0.5, "reply_nll": 1.0, "pair_accuracy": 0.9})[0]
    assert not gate(current, {"suite": 0.45, "reply_nll": 1.0, "pair_accuracy": 0.9})[0], "suite regressed"
    assert not gate(current, {"suite": 0.5, "reply_nll": 1.0, "pair_accuracy": 0.4})[0], "pairs regressed"
    assert not gate(current, dict(current))[0], "equal is not better"


def test_improve_end_to_end(chat_model, tmp_path):
    prime_home, jarvis_home = tmp_path / "prime", tmp_path / "jarvis"
    (prime_home / "models").mkdir(parents=True)
    for model in (chat_model.path, chat_model.path.parent / "smollm2-135m-instruct-1.0.0"):
        (prime_home / "models" / model.name).symlink_to(model)
    jarvis_home.mkdir()
    seed_feedback(jarvis_home)
    env = {**os.environ, "JARVIS_PRIME_HOME": str(prime_home), "JARVIS_HOME": str(jarvis_home)}
    command = [sys.executable, "-m", "jarvis.cli", "improve"]

    # interrupted while training: the next run resumes after the export
    # SIGINT back to its default in the child: a test run started in the background (`cmd &`
    # without job control) ignores SIGINT, and children inherit that
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in first.stdout:
        if "2/4 train" in line:
            break
    os.killpg(first.pid, signal.SIGINT)
    first_output = first.communicate(timeout=300)[0]
    assert first.returncode != 0, first_output

    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "1/4 export: done earlier" in out
    assert "held-out reply NLL" in out and "JARVIS suite" in out and "gate:" in out

    (run,) = [p for p in (jarvis_home / "improve").iterdir() if p.is_dir()]
    state = json.loads((run / "state.json").read_text())
    assert state["done"]["export"]["sft"]["heldout"] >= 1 and state["done"]["export"]["dpo"]["heldout"] >= 1
    assert state["done"]["train"]["stages"] == ["sft", "dpo"]
    evaluation = state["done"]["evaluate"]
    current, candidate = evaluation["current"], evaluation["candidate"]
    assert candidate["reply_nll"] < current["reply_nll"], "training on the feedback fits the held-out feedback better"
    assert evaluation["promote"] == gate(current, candidate)[0]
    if evaluation["promote"]:
        assert f"promoted prime-135m-chat-v1 {NEXT}" in out
        which = "from jarvis_prime.store import resolve; print(resolve('prime-135m-chat-v1').manifest.version)"
        info = subprocess.run([sys.executable, "-c", which], env=env, capture_output=True, text=True)
        assert info.stdout.strip() == NEXT, "JARVIS's model name now resolves to the new version"
        reply = subprocess.run([sys.executable, "-m", "jarvis.cli", "chat", "--once", "Who built you?", "--no-save"],
                               env=env, capture_output=True, text=True, timeout=300)
        assert reply.returncode == 0 and reply.stdout.strip(), reply.stderr
        likelihood = subprocess.run([sys.executable, "-c", ANSWER_LOGPROB], env=env, capture_output=True, text=True)
        old, new = map(float, likelihood.stdout.split())
        assert new > old + 5, f"the promoted model finds the corrected answer far likelier: {old:.1f} -> {new:.1f}"
    else:
        assert "kept the current prime-135m-chat-v1" in out
        assert not (prime_home / "models" / f"prime-135m-chat-v1-{NEXT}").exists()
