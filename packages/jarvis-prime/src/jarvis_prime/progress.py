"""How long jobs (pull, export, training, `jarvis improve`) report their steps: a
`Log` callback that takes one line of text; the CLI prints it, library callers may drop it.

A build (the first `jarvis chat` merges, converts and quantizes the default model)
runs code that writes to the terminal on its own: llama.cpp logs every tensor to file
descriptor 2 from C, transformers and the gguf writer draw tqdm bars. `quiet_build`
turns that into one spinner naming the current step, keeps everything else in a
temporary file and shows its tail only when the build fails; `-v` (INFO logging on
`jarvis_prime`) lets it all through, live.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator

Log = Callable[[str], None]

FAILURE_TAIL_LINES = 40  # of the captured log, shown when a build fails

_active: Log | None = None  # the display of the quiet_build in progress; nested builds report to it


def verbose() -> bool:
    """Whether the user asked for details (`-v`): native logs then go to the terminal live."""
    return logging.getLogger("jarvis_prime").isEnabledFor(logging.INFO)


@contextlib.contextmanager
def captured_stderr() -> Iterator[Callable[[], str]]:
    """Send file descriptor 2 (C libraries) and sys.stderr (Python code, llama-cpp-python's log
    callback among it, even where sys.stderr is not fd 2) to a temporary file.

    Yields a function returning what was written so far, for error messages. With
    `verbose()` nothing is captured (the output is on screen) and the function returns "".
    """
    if verbose():
        yield lambda: ""
        return
    with tempfile.TemporaryFile(mode="w+b") as sink:
        with contextlib.suppress(ValueError, OSError):  # a closed sys.stderr must not stop the build
            sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        text = open(sink.fileno(), "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)
        try:
            with contextlib.redirect_stderr(text):
                yield lambda: _read(sink, text)
        finally:
            text.close()
            os.dup2(saved, 2)
            os.close(saved)


def _read(sink, text) -> str:
    """All of the file so far; pread leaves the offset fd 2 shares with it where it is."""
    text.flush()
    return os.pread(sink.fileno(), os.fstat(sink.fileno()).st_size, 0).decode(errors="replace")


def log_tail(text: str, lines: int = FAILURE_TAIL_LINES) -> str:
    """The last `lines` lines of a captured log; of a progress bar's `\\r` redraws only the last."""
    kept = [line.rsplit("\r", 1)[-1].rstrip() for line in text.split("\n")]  # not splitlines: it splits at \r
    return "\n".join([line for line in kept if line][-lines:])


@contextlib.contextmanager
def quiet_build(title: str, *, echo: bool = False) -> Iterator[Log]:
    """One spinner on the terminal's stderr for a long build; yields the `Log` its steps report to.

    Everything else written to stderr meanwhile (llama.cpp, tqdm bars, warnings) is captured
    and, if the build raises, its last lines are printed before the error propagates. With
    `echo`, each step also stays on screen as a line. With `verbose()` nothing is captured
    and the steps are plain lines between the native output. Nested calls report to the
    outer display.
    """
    global _active
    if _active is not None:
        yield _active
        return
    from rich.console import Console

    if verbose():
        plain = Console(stderr=True, highlight=False, soft_wrap=True)
        yield lambda message: plain.print(f"{title}: {message}", markup=False)
        return
    terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    with terminal, captured_stderr() as captured:
        console = Console(file=terminal, highlight=False, soft_wrap=True)
        with _spinner(console, title) as update:
            def log(message: str) -> None:
                update(f"{title}: {message}")
                if echo:
                    console.print(f"  {message}", markup=False)

            _active = log
            try:
                yield log
            except Exception:
                tail = log_tail(captured())
                if tail:
                    console.print(f"{title} failed; the last lines of its log:\n{tail}", markup=False)
                raise
            finally:
                _active = None


@contextlib.contextmanager
def _spinner(console, title: str) -> Iterator[Log]:
    """A transient spinner that, unlike `console.status`, leaves sys.stdout and sys.stderr alone
    (a Live display redirects them above itself, which would put the captured output back on screen)."""
    from rich.live import Live
    from rich.spinner import Spinner

    spinner = Spinner("dots", text=title)
    with Live(spinner, console=console, transient=True, redirect_stdout=False, redirect_stderr=False,
              refresh_per_second=8):
        yield lambda text: spinner.update(text=text)
