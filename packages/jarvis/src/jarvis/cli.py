"""`jarvis`: talk to JARVIS in the terminal."""

from __future__ import annotations

import logging
import time
from typing import Optional

import typer
from rich.console import Console

from jarvis import __version__
from jarvis.chatbots import DEFAULT_PERSONA, Chatbot, ChatbotConfig
from jarvis.memory import ConversationStore
from jarvis_prime import PrimeError

app = typer.Typer(
    name="jarvis",
    help="JARVIS: your own assistant, on PRIME models, offline.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

HELP = "/reset forgets the conversation, /exit (or Ctrl-D) leaves."


def _version(value: bool) -> None:
    if value:
        console.print(f"jarvis-ai-agent {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log which backend was picked and why."),
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")


def _reply(bot: Chatbot, text: str) -> None:
    for piece in bot.stream(text):
        console.print(piece, end="", markup=False, soft_wrap=True)
    console.print()


@app.command()
def chat(
    once: Optional[str] = typer.Option(None, "--once", help="Answer this one question and exit."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="PRIME model name or directory (default: $JARVIS_MODEL or prime-135m-chat-v1)."),
    backend: str = typer.Option("auto", help="auto | llamacpp | transformers."),
    quantization: Optional[str] = typer.Option(None, help="8bit | 4bit (default: the model's weights as shipped)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | mps."),
    system: Optional[str] = typer.Option(None, help=(
        "A system prompt / persona. Default: none, the JARVIS chat model needs none; for other models try "
        f"--system {DEFAULT_PERSONA!r}.")),
    max_new_tokens: int = typer.Option(256, help="Longest reply, in tokens."),
    temperature: float = typer.Option(0.0, help="0 is greedy decoding."),
    seed: Optional[int] = typer.Option(None, help="Sampling seed, for repeatable replies."),
    conversation: Optional[str] = typer.Option(None, "--conversation", "-c", help="Continue a saved conversation (see `jarvis conversations`)."),
    save: bool = typer.Option(True, help="Save the conversation in $JARVIS_HOME/jarvis.db (SQLite)."),
    backend_url: Optional[str] = typer.Option(None, help="An OpenAI-compatible endpoint instead of a local model, e.g. http://127.0.0.1:8001/v1 (prime serve)."),
    api_key: Optional[str] = typer.Option(None, envvar="JARVIS_API_KEY", help="Bearer key for --backend-url."),
    context_length: int = typer.Option(4096, help="With --backend-url: the server's context window, in tokens."),
) -> None:
    """Chat in the terminal with streamed replies (or one answer with --once)."""
    store = None
    try:
        store = ConversationStore() if save or conversation else None
        config = ChatbotConfig(
            backend=backend, quantization=quantization, device=device, system_prompt=system,
            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
            **({"model": model} if model else {}),
        )
        remote = None
        if backend_url:
            from jarvis.remote import RemoteModel

            remote = RemoteModel(backend_url, model=model, api_key=api_key, context_length=context_length)
        bot = Chatbot(config, model=remote, store=store, conversation=conversation)
        if once is not None:
            _reply(bot, once)
            _saved(bot)
            return
        with console.status(f"loading {config.model}"):
            loaded = bot.model
        console.print(f"[bold]JARVIS[/] on {loaded.name} {loaded.version} ({loaded.runtime.backend}). {HELP}")
        _interactive(bot)
        _saved(bot)
    except (PrimeError, ValueError, KeyError) as err:
        err_console.print(f"[bold red]error:[/] {err.args[0] if isinstance(err, KeyError) else err}")
        raise typer.Exit(code=1)
    finally:
        if store is not None:
            store.close()


def _saved(bot: Chatbot) -> None:
    if bot.store is not None and bot.conversation is not None:
        err_console.print(f"[dim]saved as conversation {bot.conversation} (jarvis chat -c {bot.conversation})[/]")


@app.command()
def conversations() -> None:
    """List saved conversations, newest first."""
    from rich.table import Table

    store = ConversationStore()
    table = Table("id", "updated", "messages", "model", "title")
    for c in store.list():
        table.add_row(c.id, time.strftime("%Y-%m-%d %H:%M", time.localtime(c.updated)), str(c.messages),
                      c.model or "-", c.title)
    console.print(table)
    store.close()


def _interactive(bot: Chatbot) -> None:
    while True:
        try:
            text = console.input("[bold cyan]you>[/] ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            bot.reset()
            console.print("[dim]conversation cleared[/]")
            continue
        if text.startswith("/"):
            console.print(f"[dim]unknown command {text}; {HELP}[/]")
            continue
        console.print("[bold green]jarvis>[/] ", end="")
        try:
            _reply(bot, text)
        except KeyboardInterrupt:  # stop this reply, keep the session
            console.print("\n[dim](interrupted)[/]")
        except (PrimeError, ValueError) as err:  # one bad turn does not end the chat
            console.print()
            err_console.print(f"[bold red]error:[/] {err}")


if __name__ == "__main__":
    app()
