"""How long jobs (pull, export, training, `jarvis improve`) report their steps: a
`Log` callback that takes one line of text; the CLI prints it, library callers may drop it."""

from collections.abc import Callable

Log = Callable[[str], None]
