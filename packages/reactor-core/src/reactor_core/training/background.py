"""`Trainer.train_async`: a run in a child process, its events on the caller's event loop.

A process, not a thread: loading tokenizers and weights holds the GIL for hundreds of
milliseconds at a time, which would stall every other task of the app. Events and the
result come back over a queue; a shared multiprocessing Event reaches the child's loop
and stops it at a step boundary.
"""

from __future__ import annotations

import asyncio
import inspect
import multiprocessing
import pickle
import queue
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from reactor_core.training.config import TrainingConfig
from reactor_core.training.events import EventCallback, TrainResult
from reactor_core.training.recipes import build_recipe

_CONTEXT = multiprocessing.get_context("spawn")  # fork would copy a live torch runtime


def shared_event():
    """An Event that `run_in_child` passes on to the child: setting it here stops the run there."""
    return _CONTEXT.Event()


async def run_in_child(config: TrainingConfig, data_path: str | Path | None, on_event: EventCallback | None,
                       stop) -> TrainResult:
    """`setup(data_path)` + `train()` of `config`'s recipe in a child process.

    `on_event` (sync or async) runs on the event loop. `stop` comes from `shared_event`.
    Cancelling the awaiting task stops the run the same way as setting `stop`.
    """
    events = _CONTEXT.Queue()
    child = _CONTEXT.Process(target=_train_in_child, args=(config.to_dict(), data_path, events, stop), daemon=True)
    with _main_not_reimported():
        child.start()
    loop = asyncio.get_running_loop()
    try:
        while True:
            try:
                kind, payload = await loop.run_in_executor(None, events.get, True, 0.2)
            except queue.Empty:
                if child.exitcode is None:
                    continue
                try:  # the result may have landed just after the timeout
                    kind, payload = events.get(timeout=1.0)
                except queue.Empty:
                    raise RuntimeError(f"training process exited with code {child.exitcode}") from None
            if kind == "event":
                if on_event is not None and inspect.isawaitable(outcome := on_event(payload)):
                    await outcome
            elif kind == "error":
                raise payload
            else:
                return payload
    finally:
        # Whatever ended the wait (done, error, our caller cancelled): the child stops at
        # its next step boundary. Keep draining the queue so its feeder thread can exit.
        stop.set()
        await loop.run_in_executor(None, _join_draining, child, events, 60.0)


_MAIN_LOCK = threading.Lock()


@contextmanager
def _main_not_reimported() -> Iterator[None]:
    """Start a spawned child without it importing the caller's `__main__`.

    spawn re-imports the parent's main script (or `-m` module) in the child, so that
    objects defined there can be unpickled. This child needs none (it gets a config dict
    and reactor_core functions), and re-running a script that calls `train_async` at top
    level, without an `if __name__ == "__main__":` guard, would start training again in
    the child and die in multiprocessing's bootstrapping check. `Process.start()` reads
    `__main__.__spec__` and `__file__` once, synchronously; they are hidden for that call.
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    with _MAIN_LOCK:
        saved = {name: main.__dict__[name] for name in ("__spec__", "__file__") if name in main.__dict__}
        main.__dict__["__spec__"] = None
        main.__dict__.pop("__file__", None)
        try:
            yield
        finally:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


def _train_in_child(config: dict[str, Any], data_path: str | Path | None, events, stop) -> None:
    """Entry point of the child process."""
    recipe = build_recipe(TrainingConfig.model_validate(config), on_event=lambda e: events.put(("event", e)),
                          progress=False, stop=stop)
    try:
        recipe.setup(data_path)
        events.put(("result", recipe.train()))
    except BaseException as err:
        events.put(("error", _picklable(err)))


def _join_draining(child, events, timeout: float) -> None:
    """Join the child while emptying its queue; a child blocked on a full pipe never exits."""
    deadline = time.monotonic() + timeout
    while child.is_alive() and time.monotonic() < deadline:
        try:
            events.get(timeout=0.1)
        except queue.Empty:
            pass
    if child.is_alive():
        child.kill()  # SIGKILL: SIGTERM would read as a preemption and checkpoint first
    child.join()


def _picklable(err: BaseException) -> BaseException:
    """The exception itself when it survives pickling, else its text in a RuntimeError."""
    try:
        return pickle.loads(pickle.dumps(err))
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")
