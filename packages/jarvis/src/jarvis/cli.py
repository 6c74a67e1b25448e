"""`jarvis`: talk to JARVIS in the terminal."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from jarvis.chatbots import DEFAULT_PERSONA, Chatbot, ChatbotConfig, Thought, ToolUse
from jarvis.memory import ConversationStore, PrivateConversationError
from jarvis.version import __version__
from jarvis_prime import PrimeError
from jarvis_prime.progress import quiet_build
from jarvis_prime.store import resolve

app = typer.Typer(
    name="jarvis",
    help="JARVIS: your own assistant, on PRIME models, offline.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)  # errors stay greppable: no hard wraps

HELP = ("/good and /bad rate the last reply, /correct TEXT fixes it, /retry regenerates it, "
        "/think asks the reasoning model (self-consistency when none is installed), /show-thinking shows "
        "the last reply's folded thinking, /image PATH [QUESTION] shows JARVIS an image, "
        "/remember TEXT saves a fact for later conversations (`jarvis memory list`), "
        "/reset starts over, /exit (or Ctrl-D) leaves.")

memory_app = typer.Typer(help="What JARVIS remembers across conversations: list it, forget a fact.",
                         no_args_is_help=True)
app.add_typer(memory_app, name="memory")


def _version(value: bool) -> None:
    if value:
        console.print(f"jarvis-ai-agent {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log which backend was picked and why, and show llama.cpp's and transformers' own output."),
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")


def _reply(bot: Chatbot, text: str, images: list[bytes] | None = None) -> None:
    _print_stream(bot.stream(text, images or ()))


def folded_thinking(thinking: str) -> str:
    """A thinking model's reasoning folded to one line: its first line, and how many there are."""
    lines = [line for line in thinking.strip().splitlines() if line.strip()]
    first = lines[0].strip() if lines else ""
    first = first if len(first) <= 72 else first[:71] + "\u2026"
    return f"thought: {first} ({len(lines)} line{'s' if len(lines) != 1 else ''} of thinking; /show-thinking)"


def _print_stream(pieces) -> None:
    """The reply as it comes; a thinking model's reasoning is not printed as it streams but
    counted under a spinner, then folded to one dim line above the answer; each tool call is
    one dim line (`⚙ calculator(expression="12*7") → 84`)."""
    thought: list[str] = []
    status = None
    answered = False
    midline = False  # answer text printed since the last line break
    try:
        for piece in pieces:
            if isinstance(piece, Thought):
                thought.append(piece)
                lines = "".join(thought).count("\n") + 1
                if status is None:
                    status = console.status("thinking")
                    status.start()
                status.update(f"thinking ({lines} line{'s' if lines != 1 else ''})")
                continue
            if status is not None:
                status.stop()
            if not answered and thought:
                console.print(folded_thinking("".join(thought)), style="dim", markup=False, highlight=False)
            answered = True
            if isinstance(piece, ToolUse):
                console.print(("\n" if midline else "") + piece, style="dim", markup=False, highlight=False,
                              soft_wrap=True)
                midline = False
                continue
            console.print(piece, end="", markup=False, soft_wrap=True)
            midline = midline or bool(piece)
    finally:
        if status is not None:
            status.stop()
    if thought and not answered:
        console.print(folded_thinking("".join(thought)), style="dim", markup=False, highlight=False)
        console.print("[dim](no answer: the reply ran out of tokens while thinking; raise --max-new-tokens or "
                      "set --thinking-budget)[/]", end="")
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
    conversation: Optional[str] = typer.Option(None, "--conversation", "-c", help="Continue a saved conversation (see `jarvis history`)."),
    save: bool = typer.Option(True, help="Save the conversation in $JARVIS_HOME/jarvis.db (SQLite)."),
    backend_url: Optional[str] = typer.Option(None, help="An OpenAI-compatible endpoint instead of a local model, e.g. http://127.0.0.1:8001/v1 (prime serve)."),
    api_key: Optional[str] = typer.Option(None, envvar="JARVIS_API_KEY", help="Bearer key for --backend-url."),
    context_length: int = typer.Option(4096, help="With --backend-url: the server's context window, in tokens."),
    reasoning: bool = typer.Option(False, "--reasoning", help="Answer every message by step-by-step self-consistency (like /think)."),
    samples: int = typer.Option(5, help="Samples voted on by --reasoning and /think (self-consistency)."),
    thinking_budget: Optional[int] = typer.Option(None, "--thinking-budget", min=0, help=(
        "Thinking models: most tokens of reasoning before JARVIS makes the model answer (0: answer without "
        "thinking). Default: no limit but --max-new-tokens; /think on a reasoning model: 3 x --max-new-tokens.")),
    reasoning_model: Optional[str] = typer.Option(None, "--reasoning-model", metavar="NAME", help=(
        "The model /think and --reasoning ask (default: $JARVIS_REASONING_MODEL, then the catalog's reasoning "
        "model that is installed; none: self-consistency on the chat model).")),
    image: Optional[list[Path]] = typer.Option(None, "--image", metavar="PATH", help=(
        "Show JARVIS this image with the first message (repeatable, up to 4). A chat model that cannot see "
        "hands the turn to the vision model.")),
    vision_model: Optional[str] = typer.Option(None, "--vision-model", metavar="NAME", help=(
        "PRIME model name or directory for image turns the chat model cannot see (default: $JARVIS_VISION_MODEL, "
        "then the catalog's vision model that is here, prime-135m-vision-v1 first).")),
    tools: bool = typer.Option(True, "--tools/--no-tools", help=(
        "Let the model call JARVIS's tools (calculator, clock, search of past conversations, memory, and yours: "
        "$JARVIS_TOOLS or the `jarvis.tools` entry points): with --backend-url, or a local model made to call tools "
        "(its chat template renders tools, or prime.json says `tools: true`); other local models run without.")),
    max_tool_steps: int = typer.Option(4, min=1, help="Rounds of tool calls in one reply before JARVIS stops the model."),
) -> None:
    """Chat in the terminal with streamed replies (or one answer with --once).

    A thinking model's thinking is folded to one dim line above its answer (/show-thinking prints it);
    only the answer is kept as the reply."""
    from jarvis.vision import MAX_IMAGES_PER_MESSAGE, read_image

    store = None
    try:
        if len(image or ()) > MAX_IMAGES_PER_MESSAGE:
            raise ValueError(f"{len(image)} --image files; at most {MAX_IMAGES_PER_MESSAGE} per message")
        images = [read_image(path, f"--image {path}") for path in image or ()]  # checked before any model loads
        store = ConversationStore() if save or conversation else None
        config = ChatbotConfig(
            backend=backend, quantization=quantization, device=device, system_prompt=system,
            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, reasoning_samples=samples,
            thinking_budget=thinking_budget, tools=tools, max_tool_steps=max_tool_steps,
            **({"model": model} if model else {}), **({"vision_model": vision_model} if vision_model else {}),
            **({"reasoning_model": reasoning_model} if reasoning_model else {}),
        )
        remote = None
        if backend_url:
            from jarvis.remote import RemoteModel

            remote = RemoteModel(backend_url, model=model, api_key=api_key, context_length=context_length)
        bot = Chatbot(config, model=remote, store=store, conversation=conversation)
        loaded = bot.model if remote is not None else _load(bot)
        if once is not None:
            if images:
                _load_vision(bot)
                _reply(bot, once, images)
            else:
                _think(bot, once) if reasoning else _reply(bot, once)
            _saved(bot)
            return
        console.print(f"[bold]JARVIS[/] on {loaded.name} {loaded.version} ({loaded.runtime.backend}). {HELP}")
        _interactive(bot, reasoning, images)
        _saved(bot)
    except (PrimeError, ValueError, KeyError) as err:
        err_console.print(f"[bold red]error:[/] {err.args[0] if isinstance(err, KeyError) else err}")
        raise typer.Exit(code=1)
    finally:
        if store is not None:
            store.close()


def _load(bot: Chatbot):
    """The local model, built into the store on first use (merge, convert, quantize: a minute or
    two) behind one spinner; llama.cpp's and transformers' own output is shown with -v or on failure."""
    with quiet_build(f"loading {bot.config.model}") as log:
        resolve(bot.config.model, log=log)
        return bot.model


def _load_vision(bot: Chatbot) -> None:
    """The vision model, if this turn needs one, behind one spinner (a first use may build it)."""
    if getattr(bot.model, "sees_images", False):
        return
    from jarvis.vision import pick_vision_model

    name = pick_vision_model(bot.config.vision_model)  # none here: the error says what to pull
    with quiet_build(f"loading {name} (sees the image)") as log:
        resolve(name, log=log)
        bot.vision_model


def _saved(bot: Chatbot) -> None:
    if bot.store is not None and bot.conversation is not None:
        err_console.print(f"[dim]saved as conversation {bot.conversation} (jarvis chat -c {bot.conversation})[/]")


@app.command()
def history(
    conversation: Optional[str] = typer.Argument(None, help="Show this conversation (default: list them all)."),
    private: Optional[bool] = typer.Option(None, "--private/--public", help="Mark the conversation private (never exported as training data) or public."),
    delete: bool = typer.Option(False, "--delete", help="Delete the conversation."),
) -> None:
    """List saved conversations, newest first, or show one with its feedback."""
    from rich.markup import escape

    from jarvis_prime.tables import Col, print_table

    store = ConversationStore()
    try:
        if conversation is None:
            columns = [Col("id", keep=True), Col("updated"), Col("messages"), Col("model", keep=True), Col("private"),
                       Col("title")]
            print_table(console, columns, [
                [c.id, time.strftime("%Y-%m-%d %H:%M", time.localtime(c.updated)), str(c.messages),
                 escape(c.model or "-"), "yes" if c.private else "", escape(c.title)]
                for c in store.list()])
            return
        if delete:
            store.get(conversation)
            store.delete(conversation)
            console.print(f"deleted {conversation}")
            return
        if private is not None:
            store.update(conversation, private=private)
        info = store.get(conversation)
        console.print(f"[bold]{info.title}[/] ({info.id}{', private' if info.private else ''})")
        for m in store.stored_messages(conversation):
            marks = {1: " [green]+1[/]", -1: " [red]-1[/]"}.get(m.rating, "") + (" [yellow]corrected[/]" if m.corrected else "")
            marks += "".join(f" [cyan]image {sha[:12]}[/]" for sha in m.images)
            console.print(f"[bold]{m.role}[/] #{m.id}{marks}: ", end="")
            console.print(m.content, markup=False)
    except KeyError as err:
        err_console.print(f"[bold red]error:[/] {err.args[0]}")
        raise typer.Exit(code=1)
    finally:
        store.close()


@app.command("export-data")
def export_data(
    sft: Optional[Path] = typer.Option(None, "--sft", help="Write SFT examples (thumbs-up and corrected replies) here, JSONL."),
    dpo: Optional[Path] = typer.Option(None, "--dpo", help="Write DPO pairs (correction vs original, preferred vs regenerated) here, JSONL."),
    scrub_pii: bool = typer.Option(False, "--scrub-pii", help="Replace e-mails, phone/card numbers, IPs and tokens with placeholders."),
) -> None:
    """Turn your feedback into reactor-core training data (private conversations are skipped).

    Image turns become multimodal SFT records; their images are written beside the JSONL (images/<sha256>.png)."""
    from jarvis.feedback import export_data as export

    store = ConversationStore()
    try:
        report = export(store, sft_path=sft, dpo_path=dpo, scrub=scrub_pii)
    except ValueError as err:
        err_console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(code=1)
    finally:
        store.close()
    console.print(f"{report.sft} SFT examples, {report.dpo} DPO pairs from {report.conversations} conversations "
                  f"({report.private_skipped} private skipped, {report.duplicates} duplicates dropped)")
    if report.images or report.image_records_skipped:
        console.print(f"{report.images} images written beside the SFT file (images/); "
                      f"{report.image_records_skipped} DPO pairs about images left out (preference data is text only)")
    if report.tool_pairs_skipped:
        console.print(f"{report.tool_pairs_skipped} DPO pairs about replies that called tools left out (the SFT "
                      "records keep their calls)")
    for path in report.files:
        console.print(f"  wrote {path}")


@app.command()
def improve(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="The model to improve (default: $JARVIS_MODEL or prime-135m-chat-v1)."),
    holdout: float = typer.Option(0.2, help="Share of the feedback held out to judge the candidate."),
    max_steps: Optional[int] = typer.Option(None, min=1, help="Cap on optimizer steps per training stage (quick runs)."),
    scrub_pii: bool = typer.Option(True, "--scrub-pii/--no-scrub-pii", help=(
        "Replace e-mails, phone/card numbers, IPs and tokens in the training data with placeholders "
        "(--no-scrub-pii trains on the feedback as written).")),
    prime_url: Optional[str] = typer.Option(None, help="A running `prime serve` (http://127.0.0.1:8001) to hot-swap to the new version."),
    prime_admin_key: Optional[str] = typer.Option(None, envvar="PRIME_ADMIN_KEY", help="Its --admin-key (swaps take the admin key)."),
    jarvis_url: Optional[str] = typer.Option(None, help="A running `jarvis serve` (http://127.0.0.1:8000) to switch to the new version."),
    jarvis_admin_key: Optional[str] = typer.Option(None, envvar="JARVIS_ADMIN_KEY", help="Its --admin-key."),
    fresh: bool = typer.Option(False, help="Start a new run instead of resuming an unfinished one."),
) -> None:
    """Train a better JARVIS on your feedback: export, train (SFT + DPO), evaluate, promote if better."""
    from jarvis.chatbots.chatbot import _default_model
    from jarvis.improve import ImproveConfig, improve as run_improve

    try:
        config = ImproveConfig(model=model or _default_model(), holdout_fraction=holdout, max_steps=max_steps,
                               scrub_pii=scrub_pii, prime_url=prime_url, prime_admin_key=prime_admin_key,
                               jarvis_url=jarvis_url, jarvis_admin_key=jarvis_admin_key, fresh=fresh)
        state = run_improve(config, log=lambda message: console.print(message, markup=False, highlight=False))
    except (PrimeError, ValueError) as err:
        err_console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(code=1)
    except KeyboardInterrupt:
        err_console.print("interrupted: run `jarvis improve` again to continue where it stopped")
        raise typer.Exit(code=130)
    promoted = state["done"]["promote"]
    if promoted["promoted"]:
        console.print(f"[green]promoted[/] {config.model} {promoted['version']}")
    else:
        console.print(f"[yellow]kept[/] the current {config.model}: the candidate was not better")


@app.command()
def serve(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="PRIME model name or directory (default: $JARVIS_MODEL or prime-135m-chat-v1)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; anything but loopback needs an API key."),
    port: int = typer.Option(8000, help="Port."),
    api_key: Optional[str] = typer.Option(None, envvar="JARVIS_API_KEY", help="Require `Authorization: Bearer KEY` on the API (the page asks for it)."),
    admin_key: Optional[str] = typer.Option(None, envvar="JARVIS_ADMIN_KEY", help="Turns on POST /api/model (switch models), which then takes this key, not the API key; without one it is off."),
    allow_model_paths: bool = typer.Option(False, "--allow-model-paths", help="Let /api/model load any directory holding a prime.json, not only catalog or store names."),
    backend: str = typer.Option("auto", help="auto | llamacpp | transformers."),
    quantization: Optional[str] = typer.Option(None, help="8bit | 4bit."),
    system: Optional[str] = typer.Option(None, help="A system prompt / persona for new conversations."),
    max_new_tokens: int = typer.Option(256, help="Longest reply, in tokens."),
    max_queue: int = typer.Option(16, min=1, help="Replies in progress at once (4 generating, the rest waiting); beyond: 429."),
    thinking_budget: Optional[int] = typer.Option(None, "--thinking-budget", min=0, help=(
        "Thinking models: most tokens of reasoning before the model is made to answer (the page folds the thinking).")),
) -> None:
    """Serve the chat page and its JSON API (http://127.0.0.1:8000 by default)."""
    from jarvis.web.server import serve as run_server
    from jarvis.web.settings import WebConfig

    try:
        chat = ChatbotConfig(backend=backend, quantization=quantization, system_prompt=system,
                             max_new_tokens=max_new_tokens, thinking_budget=thinking_budget,
                             **({"model": model} if model else {}))
        config = WebConfig(chat=chat, host=host, port=port, api_key=api_key, admin_key=admin_key,
                           allow_model_paths=allow_model_paths, max_queue=max_queue)
        console.print(f"JARVIS on http://{host}:{port} (model {chat.model}; Ctrl-C stops)")
        run_server(config)
    except (PrimeError, ValueError) as err:
        err_console.print(f"[bold red]error:[/] {err}")
        raise typer.Exit(code=1)


def _think(bot: Chatbot, text: str) -> None:
    """/think: the reasoning model when there is one, else self-consistency; it says which."""
    from jarvis.reasoning import pick_reasoning_model, reasoning_models_to_pull

    thinker = pick_reasoning_model(bot.config.reasoning_model)
    thinks_itself = getattr(getattr(bot.model, "manifest", None), "thinking", None) is not None
    if thinks_itself or thinker is None:
        label = f"thinking ({bot.model.name})" if thinks_itself else \
            f"reasoning ({bot.config.reasoning_samples} samples)"
        with console.status(label):
            result = bot.reason(text)
    else:
        with quiet_build(f"loading {thinker} (the reasoning model)") as log:
            resolve(thinker, log=log)
            bot.reasoning_model
        with console.status(f"thinking ({thinker})"):
            result = bot.reason(text)
    if result.method == "reasoning model":
        if result.thinking:
            console.print(folded_thinking(result.thinking), style="dim", markup=False, highlight=False)
        if result.truncated:
            console.print("[dim](no answer: the reply ran out of tokens while thinking; raise --max-new-tokens or "
                          "--thinking-budget)[/]")
        else:
            console.print(result.reply, markup=False)
        console.print(f"[dim]thought by the reasoning model {result.model}[/]", highlight=False)
        return
    console.print(result.reply, markup=False)
    total = len(result.samples)
    pulls = " or ".join(f"`prime pull {name}`" for name in reasoning_models_to_pull()[:1])
    console.print(f"[dim]no reasoning model installed{f' ({pulls} adds one)' if pulls else ''}: "
                  f"self-consistency on {result.model}, {total} samples[/]", highlight=False)
    if result.answer is None:
        console.print(f"[dim]no sample reached a final answer ({total} tried)[/]")
    else:
        console.print(f"[dim]answer {result.answer}: {result.votes[result.answer]} of {total} samples agree[/]")


def _interactive(bot: Chatbot, reasoning: bool = False, images: list[bytes] | None = None) -> None:
    """`images` go with the next message (--image, then each /image)."""
    pending: list[bytes] = list(images or ())
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
        if text == "/show-thinking":
            if bot.last_thinking:
                console.print(bot.last_thinking, style="dim", markup=False, highlight=False)
            else:
                console.print("[dim]the last reply had no thinking[/]")
            continue
        if text == "/remember" or text.startswith("/remember "):
            _remember(bot, text[len("/remember"):].strip())
            continue
        if text == "/reset":
            bot.reset()
            console.print("[dim]conversation cleared[/]")
            continue
        if text in ("/good", "/bad") or text.startswith("/correct"):
            _feedback(bot, text)
            continue
        if text.startswith("/think"):
            question = text[len("/think"):].strip()
            if not question:
                console.print("[dim]usage: /think QUESTION[/]")
                continue
            _run(lambda: _think(bot, question))
            continue
        if text == "/image" or text.startswith("/image "):
            question = _attach(text[len("/image"):].strip(), pending)
            if question and pending:
                console.print("[bold green]jarvis>[/] ", end="")
                _run(lambda: _image_turn(bot, question, pending))
            continue
        if text == "/retry":
            console.print("[bold green]jarvis>[/] ", end="")
            _run(lambda: _print_stream(bot.regenerate()))
            continue
        if text.startswith("/"):
            console.print(f"[dim]unknown command {text}; {HELP}[/]")
            continue
        if pending:
            console.print("[bold green]jarvis>[/] ", end="")
            _run(lambda: _image_turn(bot, text, pending))
            continue
        if reasoning:
            _run(lambda: _think(bot, text))
            continue
        console.print("[bold green]jarvis>[/] ", end="")
        _run(lambda: _reply(bot, text))


def _attach(arguments: str, pending: list[bytes]) -> str:
    """`/image PATH [QUESTION]`: the image joins `pending` (checked now); returns the question.
    A path with spaces goes in quotes."""
    from jarvis.vision import MAX_IMAGES_PER_MESSAGE, read_image

    if arguments[:1] in ("'", '"') and arguments.find(arguments[0], 1) > 0:
        end = arguments.find(arguments[0], 1)
        path, question = arguments[1:end], arguments[end + 1:].strip()
    else:
        path, _, question = arguments.partition(" ")
    if not path:
        console.print("[dim]usage: /image PATH [QUESTION] (without a question, the image goes with your next message)[/]")
        return ""
    if len(pending) >= MAX_IMAGES_PER_MESSAGE:
        err_console.print(f"[bold red]error:[/] at most {MAX_IMAGES_PER_MESSAGE} images per message")
        return ""
    try:
        pending.append(read_image(Path(path).expanduser(), path))
    except ValueError as err:
        err_console.print(f"[bold red]error:[/] {err}")
        return ""
    if not question.strip():
        console.print(f"[dim]{len(pending)} image(s) attached: they go with your next message[/]")
    return question.strip()


def _image_turn(bot: Chatbot, text: str, pending: list[bytes]) -> None:
    """One message with the pending images; they are used up only once the reply is given."""
    _load_vision(bot)
    _reply(bot, text, pending)
    pending.clear()


def _run(turn) -> None:
    try:
        turn()
    except KeyboardInterrupt:  # stop this reply, keep the session
        console.print("\n[dim](interrupted)[/]")
    except (PrimeError, ValueError) as err:  # one bad turn does not end the chat
        console.print()
        err_console.print(f"[bold red]error:[/] {err}")


def _remember(bot: Chatbot, text: str) -> None:
    """/remember TEXT: the user saves a fact (never from a private conversation)."""
    if not text:
        console.print("[dim]usage: /remember A FACT JARVIS SHOULD KNOW IN LATER CONVERSATIONS[/]")
        return
    try:
        fact, new = bot.remember(text)
    except PrivateConversationError:
        err_console.print("[dim]not saved: this conversation is private, and private conversations never feed memory[/]")
        return
    except ValueError as err:
        err_console.print(f"[bold red]error:[/] {err}")
        return
    console.print(f"[dim]{'remembered' if new else 'already remembered'} as fact {fact.id} "
                  f"(`jarvis memory forget {fact.id}` removes it)[/]")


@memory_app.command("list")
def memory_list() -> None:
    """Every fact JARVIS remembers, newest first, with where it came from."""
    from rich.markup import escape

    from jarvis_prime.tables import Col, print_table

    store = ConversationStore()
    try:
        facts = store.facts()
    finally:
        store.close()
    if not facts:
        console.print("nothing remembered yet (/remember TEXT in `jarvis chat`, or the model's remember tool)")
        return
    columns = [Col("id", keep=True), Col("saved"), Col("by"), Col("conversation", keep=True), Col("fact")]
    print_table(console, columns, [
        [str(f.id), time.strftime("%Y-%m-%d %H:%M", time.localtime(f.created)), "you" if f.source == "user" else "jarvis",
         (f"{f.conversation_id}#{f.message_id}" if f.message_id else f.conversation_id) if f.conversation_id else "-",
         escape(f.text)] for f in facts])


@memory_app.command("forget")
def memory_forget(fact_id: int = typer.Argument(..., metavar="ID", help="The fact's id (`jarvis memory list`).")) -> None:
    """Delete a remembered fact."""
    store = ConversationStore()
    try:
        fact = store.forget(fact_id)
    except KeyError as err:
        err_console.print(f"[bold red]error:[/] {err.args[0]}")
        raise typer.Exit(code=1)
    finally:
        store.close()
    console.print(f"forgot {fact.id}: {fact.text}", markup=False, soft_wrap=True)


def _feedback(bot: Chatbot, command: str) -> None:
    if bot.store is None or bot.last_reply_id is None:
        err_console.print("[dim]no saved reply to give feedback on (feedback needs --save)[/]")
        return
    if command == "/good":
        bot.store.rate(bot.last_reply_id, 1)
    elif command == "/bad":
        bot.store.rate(bot.last_reply_id, -1)
    else:
        text = command[len("/correct"):].strip()
        if not text:
            err_console.print("[dim]usage: /correct THE REPLY JARVIS SHOULD HAVE GIVEN[/]")
            return
        bot.store.correct(bot.last_reply_id, text)
        bot.history[-1] = {"role": "assistant", "content": text}
    console.print("[dim]noted: it becomes training data with `jarvis export-data`[/]")


if __name__ == "__main__":
    app()
