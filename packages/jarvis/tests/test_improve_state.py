"""`jarvis improve`'s run state and the data it trains on, without a model.

The model is one the store does not have, so stage 1 (export) runs for real and stage 2
(`prime train` in a child process) stops at once with "unknown model": what these tests
look at is written by then.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from jarvis.cli import app
from jarvis.improve import ImproveConfig, _save_state, improve
from jarvis.memory import ConversationStore
from jarvis_prime import PrimeError

MODEL = "no-such-model"  # the store has none: training stops right after the export
EMAIL, PHONE, TOKEN = "tony.stark@starkindustries.com", "+1 212-555-0187", "sk-live9f8e7d6c5b4a3210ffee"


@pytest.fixture
def homes(tmp_path, monkeypatch):
    """Empty model store, and a JARVIS_HOME whose feedback names an e-mail address,
    a phone number and an API key."""
    monkeypatch.setenv("JARVIS_PRIME_HOME", str(tmp_path / "prime"))
    monkeypatch.setenv("JARVIS_HOME", str(tmp_path / "jarvis"))
    store = ConversationStore(tmp_path / "jarvis" / "jarvis.db")
    for i in range(6):
        cid = store.create(cid=f"pii-{i}")
        store.add(cid, "user", f"Remind me: my e-mail is {EMAIL}, my number {PHONE}, key {TOKEN} ({i}).")
        reply = store.add(cid, "assistant", f"Noted, I will write to {EMAIL} ({i}).")
        if i % 2:
            store.rate(reply, 1)
        else:
            store.correct(reply, f"Noted: {EMAIL}, {PHONE} ({i}).")
    store.close()
    return tmp_path


def runs(home):
    return sorted(p for p in (home / "jarvis" / "improve").iterdir() if p.is_dir())


def exported(run):
    return "".join((run / f"{split}-{kind}.jsonl").read_text() for split in ("train", "heldout") for kind in ("sft", "dpo"))


def improve_cli(*args):
    result = CliRunner().invoke(app, ["improve", "--model", MODEL, *args])
    assert result.exit_code == 1 and "training the candidate failed" in result.output, result.output
    return result.output


def test_improve_scrubs_personal_data_unless_told_not_to(homes):
    assert "--no-scrub-pii" in CliRunner().invoke(app, ["improve", "--help"]).output
    improve_cli()
    scrubbed = exported(runs(homes)[-1])
    assert "[EMAIL]" in scrubbed and "[PHONE]" in scrubbed and "[SECRET]" in scrubbed
    assert EMAIL not in scrubbed and PHONE not in scrubbed and TOKEN not in scrubbed, "by default none reaches training"

    improve_cli("--fresh", "--no-scrub-pii")  # the same second: run-...-02
    first, second = runs(homes)
    as_written = exported(second)
    assert EMAIL in as_written and PHONE in as_written and TOKEN in as_written
    assert json.loads((second / "state.json").read_text())["done"]["export"]["pii_scrubbed"] is False
    assert EMAIL not in exported(first), "the first run's data is left as it was"


# Writes a bigger state.json with improve's own _save_state under a file-size limit
# below its size: the kernel kills the process (SIGXFSZ, which Python ignores unless
# told otherwise) in the middle of the write.
CRASH = textwrap.dedent("""
    import json, resource, signal, sys
    from pathlib import Path
    from jarvis.improve import _save_state
    run = Path(sys.argv[1])
    state = json.loads((run / "state.json").read_text())
    state["done"]["train"] = {"log": "x" * 200_000}
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    _save_state(run, state)
""")


def test_a_crash_while_state_json_is_written_keeps_the_previous_state(homes):
    """A real process dies mid-write (the kernel's file-size limit kills it, a crash on
    cue), and the next `jarvis improve` resumes from the state before it."""
    improve_cli()
    (run,) = runs(homes)
    before = (run / "state.json").read_bytes()
    assert "export" in json.loads(before)["done"]

    crash = subprocess.run([sys.executable, "-c", CRASH, str(run)], capture_output=True, text=True)
    assert crash.returncode == -signal.SIGXFSZ, crash.stderr
    assert 4096 in [p.stat().st_size for p in run.iterdir()], "it died with the new state half written"
    assert (run / "state.json").read_bytes() == before, "state.json is the previous state, whole"

    output = improve_cli()
    assert "1/4 export: done earlier" in output and "2/4 train" in output
    assert runs(homes) == [run], "the same run resumed"


def test_state_json_is_flushed_to_disk_before_and_after_the_rename(homes, monkeypatch):
    """Power loss cannot be caused in a test, so the test records the system calls: the
    new state's bytes are fsynced before the rename, and the folder after it (else the
    rename itself may not survive). Without them a power cut could leave an empty state.json."""
    run = homes / "run"
    run.mkdir()
    calls, fsync, replace = [], os.fsync, os.replace

    def record_fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        calls.append(("fsync", path, open(path, "rb").read() if os.path.isfile(path) else None))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", lambda src, dst: (calls.append(("replace", str(src), str(dst))), replace(src, dst)))
    state = {"model": MODEL, "done": {"export": {"sft": 3}}}
    _save_state(run, state)
    (_, tmp, data), rename, (_, folder, _) = calls
    assert json.loads(data) == state, "the whole new state was on disk before the rename"
    assert rename == ("replace", tmp, str(run / "state.json"))
    assert folder == str(run)


DAMAGED = {
    "empty (a power cut before the data reached the disk)": (b"", "is empty"),
    "cut short": (b'{"model": "no-such-model", "done": {"exp', "is not valid JSON"),
    "not text": (b"\xff\xfe\x00", "is not valid JSON"),
    "not a state": (b'["export"]', "is not an improve state"),
    "an unknown stage": (b'{"model": "no-such-model", "done": {"deploy": {}}}', "is not an improve state"),
}


@pytest.mark.parametrize("content, problem", DAMAGED.values(), ids=DAMAGED.keys())
def test_a_damaged_state_json_is_an_error_naming_it_and_fresh_starts_over(homes, content, problem):
    run = homes / "jarvis" / "improve" / "run-20260101-000000"
    run.mkdir(parents=True)
    (run / "state.json").write_bytes(content)
    (run / "train-sft.jsonl").write_text("{}\n")

    result = CliRunner().invoke(app, ["improve", "--model", MODEL])
    assert result.exit_code == 1
    assert f"{run / 'state.json'} {problem}" in result.output and "--fresh" in result.output, result.output
    with pytest.raises(PrimeError, match="which stages of that run finished is unknown"):
        improve(ImproveConfig(model=MODEL))

    output = improve_cli("--fresh")
    assert "1/4 export" in output and "done earlier" not in output
    assert len(runs(homes)) == 2, "a new run beside the damaged one"
    assert (run / "state.json").read_bytes() == content and (run / "train-sft.jsonl").read_text() == "{}\n", \
        "the damaged run is left as it was"
