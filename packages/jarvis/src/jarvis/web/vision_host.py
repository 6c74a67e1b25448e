"""`VisionHost`: the page's vision model, loaded when the first image turn needs it.

Image turns the chat model cannot see go to it (`Chatbot.vision_model`); a server whose
users never send an image never loads it. One load at a time; a failed load is retried
on the next image turn (the error, e.g. what to `prime pull`, goes to that turn)."""

from __future__ import annotations

import threading
from typing import Any, Callable


class VisionHost:
    def __init__(self, load: Callable[[], Any], model: Any | None = None) -> None:
        """`load` makes the model; `model` is one already loaded (the caller's to close)."""
        self._load, self._model, self._owned = load, model, model is None
        self._lock = threading.Lock()

    def get(self) -> Any:
        with self._lock:
            if self._model is None:
                self._model = self._load()
            return self._model

    def close(self) -> None:
        with self._lock:
            if self._model is not None and self._owned:
                self._model.close()
            self._model = None
